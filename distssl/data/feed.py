"""The feed: everything between the shard sets and a batch on the training device.

Built from ``cfg.data`` and the views an algorithm asks for, it decides where work happens — decoding in the
loader or on the device (``data.decode_on``), views made in the loader or on the device
(``data.augment_on``), RandAugment or CTAugment's learned policy (``data.strong_aug``) — picks the sample
builders (distssl.data.samples) that fit, runs the streams (distssl.data.streams) from where the run's state
says they stopped, and hands the loop ``(labeled, unlabeled)`` batches whose views are made. The loop never
sees where the data work happened (Lightning's DataModule; timm's ``create_loader`` + ``PrefetchLoader``).

Its state is where each stream's readers are (their cursors, and a plan left by a launch with another reader
count): ``state_dict`` / ``load_state_dict`` for an exact resume, :meth:`replan` for an elastic one. CTAugment,
when on, is its :attr:`augment`: a component of its own (state, end-of-step update, picture).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from distssl.data import device_augment, device_decode
from distssl.data.ctaugment import CTAugment
from distssl.data.index import ShardSet
from distssl.data.position import StreamPlan
from distssl.data.samples import (
    eval_item,
    labeled_encoded_item,
    labeled_item,
    unlabeled_encoded_item,
    unlabeled_item,
    unlabeled_plan_item,
)
from distssl.data.streams import EvalStream, TrainStream, loader
from distssl.data.transforms import Views, normalize
from distssl.data.views import is_strong
from distssl.errors import require

STREAMS = ("labeled", "unlabeled")


def check_extras(d) -> None:
    """Before any rank starts: the optional packages ``cfg.data`` needs (MissingExtra names the extra)."""
    if d.decode_on == "device":
        require("torchcodec.decoders", "decode", "data.decode_on=device")


class Feed:
    def __init__(self, cfg, *, rank: int, world: int, batch: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, wanted: tuple[str, ...], sets: dict[str, ShardSet],
                 label_maps: Optional[dict] = None, uses_unlabeled: bool = True, trace_dir: Optional[str] = None,
                 worker_init: Optional[Callable[[int], None]] = None):
        d = cfg.data
        self.cfg, self.rank, self.world, self.device, self.dtype = cfg, rank, world, device, dtype
        self.per_rank_batch = batch  # this rank's labeled batch of one optimizer step (its micro-batches together)
        self.channels_last, self.wanted, self.sets = channels_last, wanted, sets
        self.label_maps, self.uses_unlabeled, self.trace_dir = label_maps or {}, uses_unlabeled, trace_dir
        self.worker_init = worker_init
        self.views = Views.from_config(d)
        # data.strong_aug=ctaugment: the learned policy, its views, and its probes riding in the labeled batch
        self.augment = CTAugment.from_config(self.views, d.ctaugment) if d.strong_aug == "ctaugment" else None
        self.strong_ops = d.ctaugment.depth if self.augment is not None else d.randaugment_ops
        self.readers = world * max(1, cfg.train.num_workers)
        self.cursors: dict[str, dict[int, int]] = {s: {} for s in STREAMS}  # samples each reader consumed
        self.plans: dict[str, StreamPlan] = {s: StreamPlan() for s in STREAMS}  # left by another reader count
        self.mean = torch.tensor(d.mean, device=device)
        self.std = torch.tensor(d.std, device=device)
        self._probes: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    # -- what a step gets --
    def to_input(self, t: torch.Tensor) -> torch.Tensor:
        """uint8 images (anywhere) -> the model's normalised input on the device, in its dtype and layout."""
        x = normalize(t.to(self.device, non_blocking=True), self.mean, self.std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batches(self, start_step: int) -> Iterator[tuple[dict, Optional[dict]]]:
        """(labeled batch, unlabeled batch or None) per step from ``start_step`` on, their views made (on the
        device where the config says so); CTAugment's probes are kept for :meth:`end_step`."""
        if self.augment is not None:  # the policies the loader may still draw with: the restored ones on a resume
            self.augment.start()
        pairs = zip(self._labeled(start_step), self._unlabeled(start_step)) if self.uses_unlabeled else \
            ((lb, None) for lb in self._labeled(start_step))
        for lb, ub in pairs:
            lb, ub = self._made(lb), self._made(ub)
            if "x_probe" in lb:
                self._probes = (lb.pop("x_probe"), lb.pop("probe_choices"), lb["y"])
            yield lb, ub

    def end_step(self, step: int, classify: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """After a step: CTAugment's policy moves with that step's probes (``classify``: the model's class
        probabilities of a batch of uint8 images, in eval mode); returns what to log of it."""
        if self._probes is None:
            return {}
        x_probe, choices, y = self._probes
        self._probes = None
        return {"cta_proximity": self.augment.end_step(step, choices, y, classify(x_probe))}

    @property
    def components(self) -> dict:
        """The feed's own stateful parts, by name, saved beside it (CTAugment's policy, when on)."""
        return {"augment": self.augment} if self.augment is not None else {}

    def write_outputs(self, out_dir, step: int) -> list:
        """A learned augmentation's picture and numbers in the run folder; returns the paths written."""
        return self.augment.write_outputs(out_dir, step) if self.augment is not None else []

    def eval_batches(self, evalset: ShardSet, batch: int) -> Iterator[dict]:
        """This rank's share of the eval set (each image once over ranks and loader workers)."""
        stream = EvalStream(evalset, rank=self.rank, world_size=self.world, batch_size=batch,
                            make_item=eval_item(self.views, self.label_maps.get("eval")))
        return loader(stream, self.cfg.train.num_workers, worker_init=self.worker_init)

    # -- the streams --
    def stream(self, which: str, batch: int, make, plan: StreamPlan, first_step: int = 0) -> TrainStream:
        return TrainStream(self.sets[which], rank=self.rank, world_size=self.world, batch_size=batch,
                           seed=self.cfg.run.seed + (0 if which == "labeled" else 1),
                           shuffle_buffer=self.cfg.data.shuffle_buffer, make_item=make,
                           cursors=self.cursors[which], name=which, interleave_shards=self.cfg.data.interleave_shards,
                           plan=plan, first_step=first_step, trace_dir=self.trace_dir,
                           # the strong views follow the policy of their batch's step (the probes draw their own)
                           on_step=self.augment.views.at_step if self.augment is not None and which == "unlabeled"
                           else None)

    def _batches(self, which: str, batch: int, make, first_step: int) -> Iterator[dict]:
        stream = self.stream(which, batch, make, self.plans[which], first_step)
        for b in loader(stream, self.cfg.train.num_workers, worker_init=self.worker_init):
            self.cursors[which][int(b.pop("worker"))] = int(b.pop("cursor"))
            yield b

    def _labeled(self, first_step: int) -> Iterator[dict]:
        d, maps = self.cfg.data, self.label_maps.get("labeled")
        strong = d.labeled_view == "strong"
        make = labeled_encoded_item(self.views, maps, strong) if d.decode_on == "device" else \
            labeled_item(self.views, maps, strong, probe=self.augment.views if self.augment is not None else None,
                         soft_classes=self.cfg.model.num_classes if d.labeled_targets == "soft" else 0)
        return self._batches("labeled", self.per_rank_batch, make, first_step)

    def _unlabeled(self, first_step: int) -> Iterator[dict]:
        d, maps = self.cfg.data, self.label_maps.get("unlabeled")
        ids, cta = self.sets["unlabeled"].sample_ids(), self.augment.views if self.augment is not None else None
        if d.decode_on == "device":
            make = unlabeled_encoded_item(self.views, maps, ids, self.wanted)
        elif d.augment_on == "device":
            make = unlabeled_plan_item(self.views, maps, ids, self.wanted, cta=cta)
        else:
            make = unlabeled_item(self.views, maps, ids, self.wanted, cta=cta)
        return self._batches("unlabeled", self.per_rank_batch * self.cfg.ssl.mu, make, first_step)

    # -- where the views are made --
    def _made(self, b: Optional[dict]) -> Optional[dict]:
        """A batch as the step takes it: JPEGs decoded here (data.decode_on=device), views made here from
        their plans (data.augment_on=device), a sample the device could not decode counted as skipped."""
        if b is None:
            return None
        if "bytes_image" in b:
            b["base"], bad = device_decode.decode_batch(
                b.pop("bytes_image"), b.pop("bytes_image_lengths"), b.pop("decoded"), b.pop("box"),
                self.views.image_size, self.views.interpolation, self.device)
            b["skipped"] = b.get("skipped", 0) + bad
        if "base" in b:
            labeled = "plan_x" in b  # the labeled batch's one view
            strong = ("x",) if labeled and self.cfg.data.labeled_view == "strong" else () if labeled else None
            b = self._views_on_device(b, strong)
        return b

    def _views_on_device(self, b: dict, strong: Optional[tuple[str, ...]] = None) -> dict:
        """The views made here from the loader's base crops and the random choices it drew for them
        (``plan_NAME`` -> ``NAME``; ``strong``: the names that get the strong view, by default strong,
        strong_2, ...)."""
        v = self.views
        base = b.pop("base").to(self.device, non_blocking=True)
        pad = device_augment.pad_pixels(v)
        for name in [k[len("plan_"):] for k in list(b) if k.startswith("plan_")]:
            plan = b.pop(f"plan_{name}")
            strong_view = name in strong if strong is not None else is_strong(name)
            b[name] = (device_augment.apply_strong(base, plan, pad, self.strong_ops, v.cutout_fraction)
                       if strong_view else device_augment.apply_weak(base, plan, pad))
        return b

    # -- its state --
    def state_dict(self) -> dict:
        return {"cursors": {k: {str(w): c for w, c in v.items()} for k, v in self.cursors.items()},
                "plans": {k: p.to_json() for k, p in self.plans.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.cursors = {k: {int(w): int(c) for w, c in state["cursors"].get(k, {}).items()} for k in STREAMS}
        self.plans = {k: StreamPlan.from_json(state["plans"].get(k)) for k in STREAMS}

    def replan(self, saved: list[dict], old_readers: int) -> None:
        """An elastic resume: every old rank's feed state (``saved``), read by ``old_readers`` readers per
        stream, becomes for this launch's readers a plan that reads the rest of the interrupted epoch once.
        Raises ValueError when a stream cannot be continued so (a set without index.json)."""
        for which in STREAMS:
            cursors = {int(w): int(c) for st in saved for w, c in st["cursors"].get(which, {}).items()}
            plan = StreamPlan.from_json(saved[0]["plans"].get(which))
            try:
                self.plans[which] = self.stream(which, 1, None, plan).replan(cursors, old_readers)
            except ValueError as e:
                raise ValueError(f"data.{which}: {e}") from None
            self.cursors[which] = {}
