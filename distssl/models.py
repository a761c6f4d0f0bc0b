"""timm backbone factory: a name, the number of classes, and optionally local pretrained weights."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """safetensors, or a torch state dict loaded with weights_only=True (never unrestricted pickle)."""
    from distssl.data import io

    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_st
        return load_st(io.read_bytes(path))
    import io as _io
    state = torch.load(_io.BytesIO(io.read_bytes(path)), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def create_model(name: str, num_classes: int, pretrained: str | None = None, drop_path_rate: float = 0.0):
    import timm

    try:
        kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"model.name={name!r}: {e} (see timm.list_models())") from None
    if pretrained:
        state = load_state_dict_file(pretrained)
        own = model.state_dict()
        head = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        for k in head:  # a classifier for another number of classes: re-initialised
            state.pop(k)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if head:
            log.warning("model.pretrained: re-initialised %s (shape differs from the file)", ", ".join(head))
        if missing:
            log.warning("model.pretrained: missing keys %s", ", ".join(missing))
        if unexpected:
            log.warning("model.pretrained: unexpected keys %s", ", ".join(unexpected))
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norm weights and biases (1-d tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
