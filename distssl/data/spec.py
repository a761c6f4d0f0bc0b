"""The value of a data key (``data.labeled``, ``data.unlabeled``): one shard set, or several with weights.

Below both the config schema (distssl.config) and the shard-set index (distssl.data.index), which each
read it, so neither imports the other for it.
"""
from __future__ import annotations

from typing import Any, Optional

from distssl.errors import ConfigError


class DataSpec:
    """Annotation of a key that takes one shard set or several, each with an optional weight:
    ``s3://a/unlabeled``; ``[s3://a/unlabeled, s3://b/unlabeled]`` (every sample once per epoch);
    ``{s3://a/unlabeled: 3, s3://b/unlabeled: 1}`` or ``[{path: ..., weight: 3}, ...]`` (each set's
    share of the samples drawn). Stored as the string for one unweighted set, else as a list of
    ``{path, weight}``."""
    type_name = "shard set(s)"

    @staticmethod
    def coerce_value(key: str, value: Any) -> Any:
        return _coerce_sources(key, value)


def data_sources(spec: Any) -> list[tuple[str, Optional[float]]]:
    """A DataSpec value (as stored, or in any form the config accepts) as [(path, weight or None), ...]."""
    spec = _coerce_sources("data spec", spec)
    if isinstance(spec, str):
        return [(spec, None)] if spec else []
    return [(d["path"], d["weight"]) for d in spec]


def _coerce_sources(key: str, value: Any) -> Any:
    if isinstance(value, str) or value is None:
        return value or ""
    if isinstance(value, dict):
        value = [{"path": k, "weight": w} for k, w in value.items()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: expected a shard set, a list of them, or a mapping of shard set -> weight, "
                          f"got {value!r}")
    items = []
    for i, v in enumerate(value):
        if isinstance(v, str):
            v = {"path": v, "weight": None}
        if not isinstance(v, dict) or set(v) - {"path", "weight"} or not isinstance(v.get("path"), str):
            raise ConfigError(f"{key}[{i}]: expected a path or {{path: ..., weight: ...}}, got {v!r}")
        w = v.get("weight")
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0):
            raise ConfigError(f"{key}[{i}]: weight must be a number > 0, got {w!r}")
        items.append({"path": v["path"], "weight": None if w is None else float(w)})
    paths = [d["path"] for d in items]
    if len(set(paths)) < len(paths):
        raise ConfigError(f"{key}: a shard set is listed twice ({paths}); give it a larger weight instead")
    weighted = [d["weight"] is not None for d in items]
    if any(weighted) and not all(weighted):
        raise ConfigError(f"{key}: give every set a weight, or none (then every sample is read once per epoch)")
    if len(items) == 1 and items[0]["weight"] is None:
        return items[0]["path"]
    return items
