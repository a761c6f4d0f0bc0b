"""The training state in a form that does not depend on the world size, for resuming on M ranks
what N ranks saved.

DeepSpeed's own checkpoint is partitioned by rank (ZeRO's optimizer state, ZeRO-3's weights), and
its universal-checkpoint converter knows only Adam's state keys (not SGD's momentum). The states
here are small, so every checkpoint also holds ``elastic.pt``, written by rank 0 from states gathered over all ranks:

- the fp32 master weights and the optimizer's state (SGD's momentum, Adam's moments and step, ...),
  per parameter name, whole (DeepSpeed's tensor-fragment
  API gathers them from ZeRO 1-3 partitions);
- the model's buffers (BatchNorm statistics, averaged over ranks as the eval does);
- the EMA's weights, whole (under ZeRO-3 each rank holds only its partition), and its buffers;
- the lr scheduler's state and the step.

Resuming on another world size builds the engine as for a fresh run and puts these back, so that
weights, optimizer state, EMA and DA continue exactly. Each rank's torch RNG is reseeded from (seed, step,
rank) instead (dropout and drop-path masks differ after such a resume; the views do not: they are
seeded per sample).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from distssl.distributed.collectives import (
    full_shape,
    gather_partitioned,
    is_partitioned,
    mean_over_ranks,
    min_over_ranks,
    partition_of,
    rank,
)

ELASTIC_NAME = "elastic.pt"


def _flat_partitions(optimizer) -> Optional[list]:
    """ZeRO's flat fp32 partitions (the tensors its inner optimizer steps), None without ZeRO."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO 1/2, ZeRO-3
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    return None


def _stepped(optimizer) -> tuple[object, list]:
    """(the torch optimizer that holds the state, the tensors it steps): ZeRO's flat partitions, or the
    parameters themselves."""
    flats = _flat_partitions(optimizer)
    if flats is not None:
        return optimizer.optimizer, flats
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner, [p for g in inner.param_groups for p in g["params"]]


def _state_layout(optimizer) -> tuple[list[str], dict]:
    """The optimizer's per-tensor state keys (SGD's momentum_buffer; Adam's exp_avg, exp_avg_sq; ...)
    and its scalar state (Adam's step), once every rank's optimizer has stepped; ([], {}) before
    (state is created at the first step)."""
    inner, stepped = _stepped(optimizer)
    states = [inner.state.get(t, {}) for t in stepped]
    here = bool(stepped) and all(states)
    if not min_over_ranks(torch.tensor([float(here)])).item():
        return [], {}
    first, t0 = states[0], stepped[0]
    keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape == t0.shape)
    scalars = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in first.items() if k not in keys}
    return keys, scalars


def _relink_states(optimizer) -> None:
    """ZeRO 1/2 map each parameter to its slice of the optimizer state once, lazily; the state may
    appear after that (or, on a restore, be put there by us): map them again."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _full_state(optimizer, p: torch.nn.Parameter, key: str) -> Optional[torch.Tensor]:
    """The optimizer's ``key`` state of ``p`` whole, whatever the ZeRO stage."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        return safe_get_full_optimizer_state(p, key)
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner.state.get(p, {}).get(key)


def gather(engine, ema, scheduler, step: int) -> Optional[dict]:
    """Collective: every rank calls it; rank 0 gets the state, the others None."""
    from deepspeed.utils import safe_get_full_fp32_param

    module, optimizer = engine.module, engine.optimizer
    keys, scalars = _state_layout(optimizer)
    if keys:
        _relink_states(optimizer)
    params, optim_state, shadow = {}, {k: {} for k in keys}, {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        params[name] = (full if full is not None else p.data).detach().float().cpu()
        for k in keys:
            v = _full_state(optimizer, p, k)
            if v is not None:
                optim_state[k][name] = v.detach().float().cpu()
        s = ema.shadow[name]
        shadow[name] = (gather_partitioned(s, full_shape(p)) if is_partitioned(p) else s).detach().cpu()
    buffers = {n: mean_over_ranks(b.detach()).cpu() for n, b in module.named_buffers()}
    ema_buffers = {n: mean_over_ranks(b.detach()).cpu() for n, b in ema.buffers.items()}
    if rank() != 0:
        return None
    inner, _ = _stepped(optimizer)
    group_steps = [g.get("step") for g in inner.param_groups]  # Lamb and others count steps per group
    return {"step": step, "params": params, "optimizer": optim_state, "optimizer_scalars": scalars,
            "optimizer_group_steps": group_steps, "buffers": buffers, "ema": shadow, "ema_buffers": ema_buffers,
            "scheduler": scheduler.state_dict() if scheduler is not None else None}


def save(path: Path, state: Optional[dict]) -> None:
    if state is not None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def optimizer_state(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{state key: {parameter name: tensor}}: SGD's momentum_buffer, Adam's exp_avg and exp_avg_sq, ..."""
    return state["optimizer"]


def _materialise_state(optimizer, keys: list[str], scalars: dict, group_steps: list) -> None:
    """Optimizers create their state lazily at the first step: create it (zeros, the saved scalars) so
    that it can be set, and let ZeRO 1/2 link the new state into each parameter's fragment map."""
    inner, stepped = _stepped(optimizer)
    # torch keeps Adam's step count on the CPU unless the optimizer is capturable or fused
    on_device = any(g.get("capturable") or g.get("fused") for g in inner.param_groups)
    for t in stepped:
        st = inner.state[t]
        for k in keys:
            st.setdefault(k, torch.zeros_like(t))
        for k, v in scalars.items():
            st[k] = v.clone().to(t.device if on_device else "cpu") if torch.is_tensor(v) else v
    if len(group_steps) == len(inner.param_groups):
        for g, n in zip(inner.param_groups, group_steps):
            if n is not None:
                g["step"] = n
    _relink_states(optimizer)


@torch.no_grad()
def restore(engine, ema, scheduler, state: dict) -> None:
    """Put ``state`` back into a freshly built engine of any world size (every rank calls it)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    module, optimizer = engine.module, engine.optimizer
    saved_optimizer = optimizer_state(state)
    if saved_optimizer:
        _materialise_state(optimizer, list(saved_optimizer), state.get("optimizer_scalars", {}),
                           state.get("optimizer_group_steps", []))
    for name, p in module.named_parameters():
        value = state["params"][name].to(p.device)
        if is_partitioned(p):  # ZeRO-3: this rank's slice of the weights, and of the fp32 master
            p.ds_tensor.data.copy_(partition_of(value, p.ds_tensor.numel()))
        else:
            p.data.copy_(value.view_as(p.data))
        safe_set_full_fp32_param(p, value)
        for key, values in saved_optimizer.items():
            if name not in values:
                continue
            v = values[name].to(p.device)
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                safe_set_full_optimizer_state(p, v, key)
            else:
                getattr(optimizer, "optimizer", optimizer).state[p][key] = v.view_as(p.data).clone()
        s = state["ema"][name].to(p.device)
        if is_partitioned(p):
            ema.shadow[name].copy_(partition_of(s, p.ds_tensor.numel()))
        else:
            ema.shadow[name].copy_(s.view_as(ema.shadow[name]))
    for n, b in module.named_buffers():
        b.copy_(state["buffers"][n].to(b.device))
    for n, b in ema.buffers.items():
        b.copy_(state["ema_buffers"][n].to(b.device))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
