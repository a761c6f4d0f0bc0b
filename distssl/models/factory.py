"""timm backbone factory: a name, the number of classes, optionally local pretrained weights, and the
optimizer's parameter groups for fine-tuning (head vs backbone lr, layer-wise lr decay)."""
from __future__ import annotations

import logging
import posixpath
from typing import Optional

import torch

import distssl.models.wrn  # noqa: F401  (registers wrn28_2 with timm)
from distssl.config import ConfigError
from distssl.models import identity
from distssl.models.heads import classifier_params
from distssl.storage import store
from distssl.storage.store import redact

log = logging.getLogger(__name__)


def _is_checkpoint_dir(path: str) -> bool:

    fs, p = store.filesystem(path)
    return fs.isdir(p)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """safetensors, a torch state dict loaded with weights_only=True (never unrestricted pickle), or a
    run/checkpoint folder of this project (its EMA weights)."""

    if _is_checkpoint_dir(path):
        from distssl.models.export import ema_weights_from_run
        state, _ = ema_weights_from_run(path)
        return state
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_st
        return load_st(store.read_bytes(path))
    import io as _io
    try:
        state = torch.load(_io.BytesIO(store.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickling refusal is the user's to fix, with the reason
        raise ConfigError(f"model.pretrained={path}: not a safetensors file or a weights-only torch state dict "
                         f"({str(e).splitlines()[0][:200]}); convert it with safetensors.torch.save_file") from None
    for key in ("state_dict", "model", "module", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def pretrained_meta(path: Optional[str]) -> dict:
    """The JSON written next to an exported ``model.safetensors`` (input size, mean/std, classes), if any:
    checked to be the weights' own (distssl.models.identity) before its input size or classes are used."""
    if not path or _is_checkpoint_dir(path):
        return {}
    json_path = posixpath.splitext(path)[0] + ".json"
    try:
        meta = store.read_json(json_path, "export the model again (distssl-export RUN_DIR OUT), or remove the file to "
                               "take the input size and mean/std from the timm model's pretrained config")
    except OSError:  # no JSON beside it (FileNotFoundError is an OSError)
        return {}
    if not isinstance(meta, dict) or "architecture" not in meta:
        return {}  # valid JSON, but not ours
    if path.endswith(".safetensors"):
        identity.check(path, meta, json_path)
    return meta


def default_input_config(name: str, pretrained: Optional[str]) -> dict:
    """input size / mean / std: the pretrained file's JSON first, then the timm model's pretrained config."""
    import timm

    meta = pretrained_meta(pretrained)
    try:
        found = timm.models.get_pretrained_cfg(name) if timm.models.is_model(name) else None
        cfg = found.to_dict() if found is not None else {}  # a PretrainedCfg dataclass, not a mapping
    except Exception:  # noqa: BLE001 - a model without a default pretrained config
        cfg = {}
    out = {}
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation"):
        value = meta.get(key, meta.get("pretrained_cfg", {}).get(key, cfg.get(key)))
        if value is not None:
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def fill_input_defaults(cfg) -> list[str]:
    """Set data.image_size/mean/std that the config leaves null; returns what was filled, for the log."""
    d = cfg.data
    if d.eval_crop_pct is None and d.crop == "pad":
        d.eval_crop_pct = 1.0  # the pad recipe trains on the full image: evaluate on it too
    if None not in (d.image_size, d.mean, d.std, d.eval_crop_pct, d.interpolation):
        return []
    defaults = default_input_config(cfg.model.name, cfg.model.pretrained)
    filled = []
    if d.image_size is None:
        d.image_size = int(defaults.get("input_size", [3, 224, 224])[-1])
        filled.append(f"data.image_size={d.image_size}")
    for key, fallback in (("mean", [0.485, 0.456, 0.406]), ("std", [0.229, 0.224, 0.225])):
        if getattr(d, key) is None:
            setattr(d, key, [float(v) for v in defaults.get(key, fallback)])
            filled.append(f"data.{key}={getattr(d, key)}")
    if d.eval_crop_pct is None:
        d.eval_crop_pct = float(defaults.get("crop_pct", 0.875))
        filled.append(f"data.eval_crop_pct={d.eval_crop_pct}")
    if d.interpolation is None:
        interp = defaults.get("interpolation", "bicubic")
        d.interpolation = interp if interp in ("bilinear", "bicubic") else "bicubic"
        filled.append(f"data.interpolation={d.interpolation}")
    return filled


def create_model(name: str, num_classes: int, pretrained: str | None = None, drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False, drop_rate: float = 0.0):
    import timm

    try:
        kwargs = {k: v for k, v in (("drop_path_rate", drop_path_rate), ("drop_rate", drop_rate)) if v}
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as e:
        raise ConfigError(f"model.name={name!r}: {e} (see timm.list_models())") from None
    if pretrained:
        load_pretrained(model, pretrained)
    if grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"model.grad_checkpointing: timm model {name!r} does not support it")
        model.set_grad_checkpointing(True)
    return model


def load_pretrained(model: torch.nn.Module, path: str) -> dict:
    """Load what matches; re-initialise a classifier of another size; list every missing/unexpected key."""

    state = load_state_dict_file(path)
    own = model.state_dict()
    reshaped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    classifier = {n for n, _ in classifier_params(model)}
    for k in reshaped:
        state.pop(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    where = redact(path)
    head = [k for k in reshaped if k in classifier]
    other = [k for k in reshaped if k not in classifier]
    if head:
        log.warning("model.pretrained=%s: classifier %s re-initialised (the file has another number of classes)",
                    where, ", ".join(head))
    if other:
        log.warning("model.pretrained=%s: %d tensors have other shapes and stay initialised: %s", where, len(other),
                    ", ".join(other[:10]))
    missing = [k for k in missing if k not in head]
    if missing:
        log.warning("model.pretrained=%s: %d missing keys (randomly initialised): %s", where, len(missing),
                    ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        log.warning("model.pretrained=%s: %d unexpected keys (ignored): %s", where, len(unexpected),
                    ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
    loaded, total = len(state) - len(unexpected), len(own)
    if loaded < total / 2:  # a backbone that barely matches is another architecture, not a fine-tune
        declared = pretrained_meta(path).get("architecture")
        arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        raise ConfigError(f"model.pretrained={where}: only {loaded} of {total} tensors of {arch} match the file"
                          + (f", which model.json says is a {declared}" if declared else "")
                          + " (it is a checkpoint of another architecture): set model.name"
                          + (f"={declared}" if declared else " to the file's architecture")
                          + f" or give weights of {arch}")
    log.info("model.pretrained=%s: loaded %d of %d tensors", where, loaded, total)
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected, "reinitialised": reshaped}


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, backbone_lr_scale: float = 1.0,
                 layer_decay: float = 1.0) -> list[dict]:
    """Parameter groups from timm's own builders (``param_groups_weight_decay``, or with
    ``layer_decay`` < 1 ``param_groups_layer_decay``: no weight decay on 1-d tensors, biases and the
    model's ``no_weight_decay()``; lr scaled by layer_decay ** (depth from the head) as in BEiT), each
    split into classifier and backbone so that the backbone's lr can be scaled by
    ``backbone_lr_scale`` and frozen. Each group carries ``lr_scale`` and ``is_head`` for the schedule;
    its ``lr`` is already scaled (torch's LambdaLR scales each group's initial lr)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_wd = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    if layer_decay < 1.0:
        base = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_wd, layer_decay=layer_decay)
    else:
        base = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_wd)
    head_ids = {id(p) for _, p in classifier_params(model)}
    groups: list[dict] = []
    for g in base:
        for is_head in (True, False):
            params = [p for p in g["params"] if (id(p) in head_ids) == is_head]
            if params:
                scale = g.get("lr_scale", 1.0) * (1.0 if is_head else backbone_lr_scale)
                groups.append({"params": params, "weight_decay": g["weight_decay"], "lr": lr * scale,
                               "lr_scale": scale, "is_head": is_head})
    return groups

