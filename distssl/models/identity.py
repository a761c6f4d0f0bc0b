"""A model's identity: the fingerprint an export carries in its weights and in its ``model.json``.

Nothing else ties ``model.safetensors`` to the ``model.json`` beside it: weights of a model trained on
animals beside the JSON of a run on digits (the same architecture) predicted animals as digits, under
the other run's temperature, with exit 0. So an export writes the same fingerprint twice, in the
safetensors header's metadata and under ``fingerprint`` in its JSON: the architecture, the class count,
a hash of the class names in order, the run (its folder) and step, and the softmax temperature the JSON
prescribes (``none`` before calibration). Every consumer (distssl-predict, distssl-selftrain,
``model.pretrained``, distssl-export) compares the two before it reads an image: a mismatch is refused in
one line naming both files and what differs. Exports written before fingerprints existed have neither:
they load, with a one-line notice, after the one check they allow (the architecture both recorded).
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
from typing import Optional

from distssl.errors import UserError
from distssl.storage import store

log = logging.getLogger(__name__)
FIELDS = ("architecture", "num_classes", "classes_sha256", "run", "step", "temperature")


class ModelMismatch(UserError):
    """Weights and a model.json that were not exported together."""

    label = "model mismatch"


def classes_hash(class_names: list[str]) -> str:
    """The class names in their order, hashed (16 hex digits): label i must mean one class in both files."""
    return hashlib.sha256(json.dumps(list(class_names)).encode()).hexdigest()[:16]


def fingerprint(architecture: str, num_classes: int, class_names: list[str], run: str, step: int,
                temperature: Optional[float]) -> dict[str, str]:
    """The identity as strings (safetensors metadata holds only strings; model.json keeps the same)."""
    return {"architecture": str(architecture), "num_classes": str(int(num_classes)),
            "classes_sha256": classes_hash(class_names), "run": str(run), "step": str(int(step)),
            "temperature": "none" if temperature is None else repr(float(temperature))}


def safetensors_metadata(url: str) -> dict[str, str]:
    """The header metadata of a .safetensors file (local or on a store): 8 bytes of header length, then
    the JSON header, so only its first bytes are read."""
    fs, path = store.filesystem(url)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelMismatch(f"{store.redact(url)} is not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ModelMismatch(f"{store.redact(url)} is not a safetensors file (a header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ModelMismatch(f"{store.redact(url)} is not a safetensors file (its header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def check(weights_url: str, meta: dict, meta_url: str) -> Optional[dict]:
    """Refuse weights and a model.json that are not one export (ModelMismatch, one line naming both and
    what differs); returns the fingerprint, or None (with a notice) for an export that predates them."""
    saved = safetensors_metadata(weights_url)
    declared = meta.get("fingerprint") if isinstance(meta.get("fingerprint"), dict) else None
    w, j = store.redact(weights_url), store.redact(meta_url)
    has_saved = all(k in saved for k in FIELDS)
    if not has_saved and declared is None:
        arch = saved.get("architecture")
        if arch is not None and arch != meta.get("architecture"):
            raise ModelMismatch(f"{w} holds a {arch}, {j} describes a {meta.get('architecture')}: give the weights "
                                f"beside the model.json they were exported with")
        log.warning("%s has no fingerprint (exported before distssl recorded one): its model.json (%s) is taken "
                    "as it is; export it again with distssl-export to record one", w, j)
        return None
    if has_saved != (declared is not None):
        which = j if has_saved else w
        raise ModelMismatch(f"{w} and {j} are not one export: {which} has no fingerprint and the other has: give "
                            f"the weights beside the model.json they were exported with")
    differ = [f"{k} {saved[k]} vs {declared.get(k)}" for k in FIELDS if str(declared.get(k)) != saved[k]]
    if differ:
        raise ModelMismatch(f"{w} and {j} are not one model ({'; '.join(differ)}, weights vs model.json): give the "
                            f"weights beside the model.json they were exported with")
    return declared
