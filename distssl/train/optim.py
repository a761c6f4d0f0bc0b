"""What steps the weights: the optimizer (any of timm's, SGD with nesterov by default; timm's
weight-decay exclusions and layer-decay groups, a backbone lr scale), its lr schedule (warm-up,
FixMatch's cosine, a frozen backbone at lr 0), the global
batch split into per-rank micro-batches, and the DeepSpeed config built from its template.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from distssl.config import Config, ConfigError
from distssl.config.recipes import template_path
from distssl.models.factory import param_groups
from distssl.train.schedule import lr_factor


def build_optimizer(model: torch.nn.Module, cfg: Config):
    """(optimizer from timm's factory, LambdaLR) for ``model``; DeepSpeed wraps both."""
    from timm.optim import create_optimizer_v2

    o, steps, frozen = cfg.optim, cfg.train.steps, cfg.model.freeze_backbone_steps
    groups = param_groups(model, o.weight_decay, o.lr, o.backbone_lr_scale, o.layer_decay)
    is_head = [g["is_head"] for g in groups]
    name, extra = o.name.lower(), {}
    if name == "sgd":  # timm's "sgd" is nesterov; "momentum" is plain (and takes momentum 0)
        name = "sgd" if o.nesterov and o.momentum > 0 else "momentum"
    if o.betas is not None:
        extra["betas"] = tuple(o.betas)
    if o.eps is not None:
        extra["eps"] = o.eps
    optimizer = create_optimizer_v2([{k: v for k, v in g.items() if k not in ("lr_scale", "is_head")} for g in groups],
                                    opt=name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, **extra)

    def schedule(is_head: bool):
        def factor(s: int) -> float:
            if not is_head and s < frozen:  # backbone lr 0 while it is frozen (ZeRO keeps flat buffers)
                return 0.0
            return lr_factor(s, steps, o.warmup_steps, o.cosine_fraction)
        return factor

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(h) for h in is_head])


def accumulation(cfg: Config, world: int) -> tuple[int, int]:
    """(per-rank labeled micro-batch, gradient accumulation steps) that keep the global batch
    ``train.batch_size`` whatever the world size, so results do not depend on the number of GPUs."""
    t = cfg.train
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the world size {world}")
    per_rank = t.batch_size // world
    micro = min(t.micro_batch_size or per_rank, per_rank)
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size}: the per-rank batch {per_rank} "
                          f"(train.batch_size {t.batch_size} / {world} ranks) must be a multiple of it")
    return micro, per_rank // micro


def deepspeed_config(cfg: Config, micro_batch: int, world: int, grad_accum: int = 1) -> dict:
    template = template_path(cfg.deepspeed.template, cfg.deepspeed.zero_stage)  # shipped in the package
    try:
        ds = json.loads(Path(template).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.template: {template} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.template: {template} is not valid JSON ({e})") from None
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}  # comments in the template
    ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = micro_batch * grad_accum * world
    precision = cfg.train.precision
    if precision == "bf16":
        # Autocast, not a bf16 module: parameters, BatchNorm statistics, EMA and master weights stay
        # fp32 (BatchNorm on a cast module meets fp32 running stats, and a 0.999 EMA in bf16 rounds
        # its updates away); convolutions and matmuls run in bf16.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {"enabled": False}
    elif precision == "fp16":  # fp16 needs loss scaling: DeepSpeed's dynamic scaler (starts at 2**16)
        ds.pop("torch_autocast", None)
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": True}
        ds["fp16"].setdefault("loss_scale", 0)
        ds["fp16"].setdefault("initial_scale_power", 16)
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
