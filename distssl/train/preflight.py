"""What a user gets wrong, caught before any process group starts: each check raises ConfigError with
one line naming the key, what is wrong and what to do (launchers print it and exit 2).

- ``model.name`` that timm does not know (with the nearest names it does know);
- ``model.pretrained`` that is not weights (an image, a text file) or a folder that is not a run;
- the extras the data settings need and lack (distssl.data.feed.check_extras);
- shard sets whose class names differ (names or order: label i must mean one class in every set),
  or whose class count is not ``model.num_classes``.
"""
from __future__ import annotations

import difflib
import logging
from typing import Optional

import distssl.models.wrn  # noqa: F401  (registers wrn28_2)
from distssl.config import Config, ConfigError
from distssl.data.feed import check_extras
from distssl.data.index import resolve_one
from distssl.data.spec import data_sources
from distssl.shards.demo import check_not_mixed
from distssl.storage import store

log = logging.getLogger(__name__)
MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"RIFF": "a RIFF file "
         "(WebP image?)", b"%PDF": "a PDF file", b"\x1f\x8b": "a gzip file", b"{": "JSON text"}


LabelMaps = dict[str, dict[int, list[int]]]  # by data key and source: each label's number in the labeled set


def check(cfg: Config) -> LabelMaps:
    """The user's mistakes, before any process group starts; returns the label maps of check_classes."""
    check_not_mixed(cfg.data)
    check_model_name(cfg.model.name)
    check_optimizer_name(cfg.optim.name)
    check_extras(cfg.data)
    if cfg.model.pretrained:
        check_pretrained(cfg.model.pretrained)
    return check_classes(cfg) or {}


def check_model_name(name: str) -> None:
    import timm

    if timm.models.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"model.name={name!r} is not a timm model: {hint}"
                      f"python -c \"import timm; print(timm.list_models('{name[:4]}*'))\" lists the names")


def check_optimizer_name(name: str) -> None:
    from timm.optim import list_optimizers

    known = list_optimizers()
    if name.lower() not in known:
        close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"optim.name={name!r} is not one of timm's optimizers: {hint}python -c \"from timm.optim "
                          f"import list_optimizers; print(list_optimizers())\" lists them (sgd, adamw, lamb, ...)")


def looks_like_weights(head: bytes) -> bool:
    """safetensors (an 8-byte header length, then JSON), torch.save's zip, or a legacy pickle."""
    if len(head) >= 9 and 1 < int.from_bytes(head[:8], "little") < 100 << 20 and head[8:9] == b"{":
        return True
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


def check_pretrained(path: str) -> None:

    where = store.redact(path)
    fs, p = store.filesystem(path)
    if fs.isdir(p):
        if not (fs.exists(f"{p}/config.yaml") and (fs.isdir(f"{p}/checkpoints") or fs.exists(f"{p}/COMPLETE"))):
            raise ConfigError(f"model.pretrained={where} is a folder but not a run of this project (no config.yaml "
                              f"and checkpoints/): give a weights file or a run folder")
        return
    try:
        with fs.open(p, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise ConfigError(f"model.pretrained={where} does not exist (give a local file, URL or run folder)") from None
    if looks_like_weights(head):
        return
    kind = next((what for magic, what in MAGIC.items() if head.startswith(magic)), "not a weights file")
    raise ConfigError(f"model.pretrained={where} is {kind}, not weights: give a .safetensors file, a state dict "
                      f"saved with torch.save, or a run folder of this project")


def class_label_map(reference: list[str], names: list[str]) -> list[int]:
    """Label i of a set named ``names`` -> the index of the same class name in ``reference``."""
    return [reference.index(n) for n in names]


def check_classes(cfg: Config) -> Optional[LabelMaps]:
    """Every set that names its classes names the same ones, in the same order (label i is one class
    everywhere), and as many as the model has; with several sets under one key, each of them.
    ``data.class_match=by_name`` accepts the same names, or some of them, in another order (returns the label
    maps, by key and source, that put them in the labeled set's order); ``by_index`` accepts any names,
    trusting the label numbers."""

    sets = []  # (key, source, how the user named it, its shard set)
    for key in ("labeled", "unlabeled", "eval"):
        sources = data_sources(getattr(cfg.data, key))
        for i, (path, _) in enumerate(sources):
            try:
                shards = resolve_one(path)
            except FileNotFoundError:
                continue  # a missing set is check_paths' to report (or the demo's, still to be built)
            sets.append((key, i, f"data.{key}" + (f"[{i}]" if len(sources) > 1 else ""), shards))
    named = [(key, i, where, s.class_names) for key, i, where, s in sets if s.class_names]
    ref_where, ref = next(((w, n) for k, _, w, n in named if k == "labeled"), named[0][2:] if named else (None, None))
    subset_ok = cfg.data.class_match == "by_name" and ref is not None
    for key, _, where, s in sets:
        if subset_ok and where != ref_where and s.class_names:
            continue  # matched by name below: some of the classes are fine (a few new labels from --select)
        if key != "unlabeled" and s.num_classes is not None and s.num_classes != cfg.model.num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {where} has {s.num_classes} classes "
                              f"({', '.join(s.class_names[:5])}{'...' if len(s.class_names) > 5 else ''})")
    if len(named) < 2:
        return None
    maps: LabelMaps = {}
    for key, i, where, names in named:
        if names == ref:
            continue
        match = cfg.data.class_match
        if match == "by_index":
            log.warning("%s names its classes %s, %s %s: data.class_match=by_index trusts the label "
                        "numbers", where, _short(names), ref_where, _short(ref))
            continue
        if match == "by_name" and set(names) <= set(ref):  # the same names, or some of them, in any order
            maps.setdefault(key, {})[i] = class_label_map(ref, names)
            continue
        only_here, only_ref = [n for n in names if n not in ref], [n for n in ref if n not in names]
        diff = (f"only in {where}: {_short(only_here)}, only in {ref_where}: {_short(only_ref)}"
                if only_here or only_ref else "the same names in another order")
        raise ConfigError(f"{where} has classes {_short(names)} but {ref_where} has {_short(ref)} ({diff}): label i "
                          f"must mean the same class in every set. Rebuild the shards from class folders with the "
                          f"same names, or set data.class_match=by_name (same names in another order: labels "
                          f"remapped by name) or data.class_match=by_index (the label numbers already agree)")
    return maps


def _short(names: list[str], n: int = 6) -> str:
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "") + "]"


def warn_few_shards(sets: dict, world: int, num_workers: int) -> None:
    """Fewer shards than readers: no hang (a reader without a shard of its own shares one, with its
    own shuffle), but an epoch then repeats samples across readers: say so, and how to avoid it."""
    readers = world * max(1, num_workers)
    for name, shards in sets.items():
        if len(shards.urls) < readers:
            log.warning("data.%s has %d shard(s) for %d readers (%d ranks x %d loader workers): readers share "
                        "shards, so an epoch repeats samples across them; rebuild with a smaller --max-count "
                        "(at least %d shards) or lower train.num_workers", name, len(shards.urls), readers,
                        world, max(1, num_workers), readers)
