"""Export the EMA weights as ``model.safetensors`` + ``model.json`` that timm loads unchanged.

The JSON's ``pretrained_cfg`` is a valid timm pretrained config (architecture, num_classes, input
size, mean/std, classifier): pass it as ``pretrained_cfg_overlay`` with ``file=`` pointing at the
weights. ``num_classes`` must be in the overlay: timm drops the classifier when the overlay's class
count differs from the one it is asked to build.

Weights come from the fp32 EMA shadow, not from the (possibly bf16) live parameters; under ZeRO-3
each rank holds a flat slice of every parameter, which is gathered here (live) or reassembled from
the per-rank checkpoint files (offline, :func:`ema_weights_from_run`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

import distssl.models.wrn  # noqa: F401
from distssl.checkpoint import reader
from distssl.distributed.collectives import full_shape, gather_partitioned, is_partitioned, rank
from distssl.models.heads import add_heads, export_state
from distssl.models.identity import fingerprint
from distssl.ssl import component
from distssl.storage import atomic

WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
BEST_NAME = "model_best.safetensors"  # the EMA weights of the best eval top-1 so far
BEST_META_NAME = "model_best.json"


def gather_ema_state(module: torch.nn.Module, ema) -> Optional[dict[str, torch.Tensor]]:
    """Collective: the full fp32 state dict of ``ema`` (the EMA of ``module``) on rank 0, None elsewhere."""
    state: dict[str, torch.Tensor] = {}
    for name, p in ema.params:
        shadow = ema.shadow[name]
        state[name] = (gather_partitioned(shadow, full_shape(p)).cpu() if is_partitioned(p)
                       else shadow.detach().cpu().reshape(full_shape(p)).clone())
    for name, b in ema.buffers.items():
        state[name] = b.detach().cpu().clone()
    # State-dict order and names as the bare model has them.
    keys = list(module.state_dict().keys())
    ordered = {k: state[k] for k in keys if k in state}
    return ordered if rank() == 0 else None


def model_meta(model_name: str, num_classes: int, image_size: int, mean, std, class_names: list[str],
               extra: Optional[dict] = None, crop_pct: float = 1.0, interpolation: str = "bilinear", *,
               run: str, step: int, temperature: Optional[float] = None) -> dict:
    """model.json: what a user needs to load and feed the model, including how the run evaluated it
    (centre crop of ``crop_pct`` of the shorter side, ``interpolation``): timm's resolve_data_config +
    create_transform on the loaded model rebuild that eval transform. Its ``fingerprint`` (run, step,
    ``temperature``: the calibration, or None) is written into the weights' header too (distssl.models.identity)."""
    import timm

    probe = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    base = dict(getattr(probe, "pretrained_cfg", {}) or {})
    pretrained_cfg = {
        "architecture": model_name, "num_classes": num_classes, "input_size": [3, image_size, image_size],
        "mean": list(mean), "std": list(std), "crop_pct": float(crop_pct), "crop_mode": "center",
        "interpolation": interpolation,
        "classifier": base.get("classifier", "fc"), "first_conv": base.get("first_conv", None),
    }
    if class_names:
        pretrained_cfg["label_names"] = list(class_names)
    pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if v is not None}
    return {"architecture": model_name, "num_classes": num_classes, "input_size": [3, image_size, image_size],
            "mean": list(mean), "std": list(std), "crop_pct": float(crop_pct), "interpolation": interpolation,
            "class_names": list(class_names),
            "pretrained_cfg": pretrained_cfg, "step": int(step), **(extra or {}),
            **({"temperature": float(temperature)} if temperature is not None else {}),
            "fingerprint": fingerprint(model_name, num_classes, class_names, run, step, temperature)}


def write_export(state: dict[str, torch.Tensor], meta: dict, out: str | Path) -> Path:
    """Write ``out`` (a .safetensors path, or a folder that gets model.safetensors) and its JSON; the
    weights are written under a temporary name and renamed, the JSON last."""

    from safetensors.torch import save_file

    out = Path(out)
    weights = out if out.suffix == ".safetensors" else out / WEIGHTS_NAME
    weights.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(weights) as tmp:  # safetensors creates it 0600: atomic gives it the umask's mode
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"format": "pt", **meta["fingerprint"]})  # the same fingerprint as the JSON's
    atomic.write_text(weights.with_suffix(".json"), json.dumps(meta, indent=1))
    return weights


def ema_weights_from_run(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The full EMA state dict of a run's newest complete checkpoint (any ZeRO stage), as the plain timm model
    of its config has it, and where it came from."""
    import timm
    import yaml

    run_dir, step_dir = reader.find(Path(path))
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml beside the checkpoints (needed for the model name)")
    cfg = yaml.safe_load(cfg_path.read_text())
    states = reader.rank_states(step_dir)
    classes = cfg["model"]["num_classes"]
    model = timm.create_model(cfg["model"]["name"], pretrained=False, num_classes=classes)
    # the heads ssl.open_set and ssl.imbalance added (runs before those keys had none)
    ssl = cfg.get("ssl") or {}
    open_set, imbalance = ssl.get("open_set", "none"), ssl.get("imbalance", "none")
    projection = (ssl.get("iomatch") or {}).get("projection", 128)
    heads = component.head_specs(open_set, imbalance, classes, projection)
    add_heads(model, heads)
    out = export_state(reader.ema_weights(states, model.state_dict()), model, heads,
                       component.BALANCED_HEAD if imbalance != "none" else None,
                       (component.OUTLIER_HEAD,) if open_set != "none" else ())
    info = {"config": cfg, "step": reader.saved_step(states), "run_dir": str(run_dir), "checkpoint": str(step_dir),
            "meta": component.outlier_meta(projection) if open_set != "none" else {}}
    return out, info
