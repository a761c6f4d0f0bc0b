"""CTAugment (Berthelot et al. 2020, ReMixMatch; as in FixMatch's libml/ctaugment.py): strong views whose
per-operation magnitudes are learned while training.

Each op of the RandAugment pool (distssl.data.transforms.POOL, the 14 ops the device path can also
apply) has a weight per magnitude bin, all 1 at the start. A strong view draws ``depth`` ops uniformly;
for each, a bin with probability proportional to its weight, after weights below ``threshold`` x the
largest are zeroed; then a magnitude uniformly inside the bin; Cutout follows, as after RandAugment.
Probes (labeled images with ops at uniformly random magnitudes) are classified by the model, and the
bins they used move towards how right the model was: proximity = 1 - ½ |p - onehot(y)|₁.

Two departures from the reference, both so that every rank holds the same policy at every step:
- The updates of one step are applied at once: ``n`` probes with mean proximity ``m`` in one bin move
  its weight to ``w d^n + (1 - d^n) m``, the reference's n sequential EMA updates with their mean in
  place of their order. Sums travel as fixed-point integers, so an all-reduce adds them exactly and the
  policy is the same for any world size.
- The ops without a magnitude (autocontrast, equalize, identity) have one bin; the reference blends
  them with the image by a learned level, which the device path does not do.

Magnitude ranges are the reference's: enhancements 0.1 + 1.9 l; posterize 1 + int(7.999 l) bits (8
bins); solarize at int(255.999 l); rotation ±45°, shear ±0.3, translation ±0.3 of the side (the
reference's translate moves by ±0.3 *pixels*, which we take for a slip), all with l the level in [0, 1].

The loader's workers read the policy from shared memory (:class:`PolicyBoard`): the trainer publishes
the weights in effect at the start of each step; the batch of step s is drawn with those of step
``s - lag`` (the workers wait for them when they are further ahead), so which policy a view used depends
on its step alone, not on the loader's timing, and a resume draws the same views.
"""
from __future__ import annotations

import math
import random
import time
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from distssl.data.device_augment import _flip_and_pad, pad_pixels
from distssl.data.transforms import FILL, POOL, _affine, cutout, flip_and_crop, to_uint8
from distssl.distributed.collectives import sum_over_ranks
from distssl.storage import atomic

# op indices: the order of transforms.POOL (device_augment names them the same way)
AUTOCONTRAST, BRIGHTNESS, COLOR, CONTRAST, EQUALIZE, IDENTITY, POSTERIZE, ROTATE, SHARPNESS, SHEAR_X, SHEAR_Y, \
    SOLARIZE, TRANSLATE_X, TRANSLATE_Y = range(14)
OP_NAMES = ("autocontrast", "brightness", "color", "contrast", "equalize", "identity", "posterize", "rotate",
            "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y")
MAX_BINS = 17
BINS = tuple(1 if op in (AUTOCONTRAST, EQUALIZE, IDENTITY) else 8 if op == POSTERIZE else MAX_BINS
             for op in range(len(POOL)))
FIXED_POINT = 2 ** 32  # proximities summed as integers: exact in any order, so in any world size


def initial_rates() -> np.ndarray:
    """(ops, MAX_BINS) weights: 1 in every bin an op has, 0 past its last."""
    rates = np.zeros((len(POOL), MAX_BINS))
    for op, n in enumerate(BINS):
        rates[op, :n] = 1.0
    return rates


def bin_weights(rates_of_op: np.ndarray, threshold: float, decay: float) -> np.ndarray:
    """The reference's rate_to_p: weights (+ 1 - decay, so never all zero) over their maximum, those
    under ``threshold`` zeroed (never drawn)."""
    p = rates_of_op + (1 - decay)
    p = p / p.max()
    return np.where(p < threshold, 0, p)


def bin_probabilities(rates_of_op: np.ndarray, threshold: float, decay: float) -> np.ndarray:
    """:func:`bin_weights` normalised: each bin's chance of being drawn."""
    p = bin_weights(rates_of_op, threshold, decay)
    return p / p.sum()


def draw(rates: np.ndarray, rng: random.Random, depth: int, threshold: float, decay: float) -> list[tuple[int, float]]:
    """``depth`` (op, level in [0, 1]) of a training view, from the sample's rng."""
    out = []
    for _ in range(depth):
        op = rng.randrange(len(POOL))
        n = BINS[op]
        p = bin_probabilities(rates[op, :n], threshold, decay)
        b = min(n - 1, int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right")))
        out.append((op, (b + rng.random()) / n))
    return out


def draw_probe(rng: random.Random, depth: int) -> list[tuple[int, float]]:
    """``depth`` (op, level) of a probe: ops and levels uniform, whatever the weights."""
    return [(rng.randrange(len(POOL)), rng.random()) for _ in range(depth)]


def bin_of(op: int, level: float) -> int:
    return int(level * BINS[op] * 0.999)


def op_value(op: int, level: float) -> tuple[float, float]:
    """(value, sign) of an op at ``level`` in the pool's convention (transforms.POOL /
    device_augment._apply_op): the value is what the op is given, the sign the direction of the
    geometric ones."""
    if op in (BRIGHTNESS, COLOR, CONTRAST, SHARPNESS):
        return 0.1 + 1.9 * level, 1.0
    if op == POSTERIZE:
        return float(1 + int(level * 7.999)), 1.0
    if op == SOLARIZE:
        return float(256 - int(level * 255.999)), 1.0  # the pool solarizes above 256 - value
    if op == ROTATE:
        angle = int(round((2 * level - 1) * 45))
        return float(abs(angle)), -1.0 if angle < 0 else 1.0
    if op in (SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y):
        v = (2 * level - 1) * 0.3
        return abs(v), -1.0 if v < 0 else 1.0
    return 0.0, 1.0


def apply_op(img: Image.Image, op: int, value: float, sign: float) -> Image.Image:
    """One op on a PIL image with an explicit sign (the pool's lambdas draw theirs)."""
    w, h = img.size
    if op == ROTATE:
        return img.rotate(sign * int(value), fillcolor=FILL)
    if op == SHEAR_X:
        return _affine(img, (1, sign * value, 0, 0, 1, 0))
    if op == SHEAR_Y:
        return _affine(img, (1, 0, 0, sign * value, 1, 0))
    if op == TRANSLATE_X:
        return _affine(img, (1, 0, int(sign * value * w), 0, 1, 0))
    if op == TRANSLATE_Y:
        return _affine(img, (1, 0, 0, 0, 1, int(sign * value * h)))
    return POOL[op][0](img, value, None)  # the unsigned ops do not touch the rng


def plan_rows(choices: Sequence[tuple[int, float]]) -> list[float]:
    """The choices as device_augment's strong-plan rows: (op, value, applied, sign) each."""
    rows: list[float] = []
    for op, level in choices:
        value, sign = op_value(op, level)
        rows += [float(op), value, 1.0, sign]
    return rows


def proximity(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - ½ |p - onehot(y)|₁ per probe: 1 when the model is sure and right, 0 when sure and wrong."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return 1 - 0.5 * (probs - onehot).abs().sum(1)


def probe_sums(choices: torch.Tensor, prox: torch.Tensor) -> torch.Tensor:
    """(2, ops, MAX_BINS) int64: probes per bin and their proximities' fixed-point sum, from ``choices``
    (n, depth, 2) rows of (op, level) and ``prox`` (n,). Each op of a probe is credited with its
    proximity, as in the reference."""
    sums = torch.zeros(2, len(POOL), MAX_BINS, dtype=torch.int64)
    ops = choices[..., 0].long().flatten().cpu()
    levels = choices[..., 1].double().flatten().cpu()
    bins = (levels * torch.tensor(BINS, dtype=torch.float64)[ops] * 0.999).long()
    fixed = (prox.detach().double().cpu().clamp(0, 1) * FIXED_POINT).round().long()
    fixed = fixed[:, None].expand(-1, choices.shape[1]).flatten()
    flat = ops * MAX_BINS + bins
    sums[0].view(-1).index_add_(0, flat, torch.ones_like(flat))
    sums[1].view(-1).index_add_(0, flat, fixed)
    return sums


def update(rates: np.ndarray, sums: np.ndarray, decay: float) -> np.ndarray:
    """The weights after one step's probes (``sums`` from :func:`probe_sums`, added over ranks)."""
    counts, total = sums[0].astype(np.float64), sums[1].astype(np.float64) / FIXED_POINT
    seen = counts > 0
    kept = decay ** counts
    mean = np.divide(total, counts, out=np.zeros_like(total), where=seen)
    return np.where(seen, rates * kept + (1 - kept) * mean, rates)


# --- the views --------------------------------------------------------------------------------------

class CTAViews:
    """The strong view, its device plan and the probe view under the current policy; picklable, so a
    loader worker holds one, and ``at_step`` points it at the policy of the batch it is filling."""

    def __init__(self, views, depth: int, threshold: float, decay: float, board: Optional["PolicyBoard"] = None,
                 lag: int = 0):
        self.views, self.depth, self.threshold, self.decay = views, depth, threshold, decay
        self.board, self.lag = board, lag
        self.rates = initial_rates()

    def at_step(self, step: int) -> None:
        if self.board is not None:
            self.rates = self.board.rates_for(max(0, step - self.lag))

    def _ops(self, img: Image.Image, choices) -> Image.Image:
        for op, level in choices:
            value, sign = op_value(op, level)
            img = apply_op(img, op, value, sign)
        return img

    def strong(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        v = self.views
        img = flip_and_crop(img, rng, v.flip, v.view_pad)
        img = self._ops(img, draw(self.rates, rng, self.depth, self.threshold, self.decay))
        return to_uint8(cutout(img, rng, v.cutout_fraction))

    def strong_plan(self, rng: random.Random) -> list[float]:
        """data.augment_on=device: the same draws as :meth:`strong`, as device_augment's plan."""

        v = self.views
        plan = _flip_and_pad(rng, v.flip, pad_pixels(v))
        plan += plan_rows(draw(self.rates, rng, self.depth, self.threshold, self.decay))
        if int(v.cutout_fraction * v.image_size) > 0:
            return plan + [rng.uniform(0, v.image_size), rng.uniform(0, v.image_size)]
        return plan + [-1.0, -1.0]

    def probe(self, weak_view: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """A labeled sample's weak view with ``depth`` ops at uniform levels (no Cutout), and the
        (depth, 2) choices that made it."""
        choices = draw_probe(rng, self.depth)
        img = Image.fromarray(weak_view.permute(1, 2, 0).numpy())
        return to_uint8(self._ops(img, choices)), torch.tensor(choices, dtype=torch.float64)


# --- the policy in shared memory ----------------------------------------------------------------------

class PolicyBoard:
    """The weights in effect at the start of each of the last ``slots`` steps, in shared memory: the
    trainer publishes, loader workers read without a round trip per batch. A slot is marked unwritten
    while it is rewritten, and a reader that saw its version change copies it again."""

    def __init__(self, slots: int, wait_s: float = 900.0):
        self.slots, self.wait_s = slots, wait_s
        self.versions = torch.full((slots,), -1, dtype=torch.int64).share_memory_()
        self.rates = torch.zeros(slots, len(POOL), MAX_BINS, dtype=torch.float64).share_memory_()

    def publish(self, step: int, rates: np.ndarray) -> None:
        slot = step % self.slots
        self.versions[slot] = -1
        self.rates[slot] = torch.from_numpy(np.asarray(rates, dtype=np.float64))
        self.versions[slot] = step

    def rates_for(self, step: int) -> np.ndarray:
        slot, start, delay = step % self.slots, time.monotonic(), 0.0005
        while True:
            if int(self.versions[slot]) == step:
                rates = self.rates[slot].numpy().copy()
                if int(self.versions[slot]) == step:
                    return rates
            if int(self.versions[slot]) > step:
                raise RuntimeError(f"CTAugment's policy of step {step} was overwritten before a loader worker read "
                                   f"it: data.ctaugment.lag must be below the board's {self.slots} slots")
            if time.monotonic() - start > self.wait_s:
                raise RuntimeError(f"a loader worker waited {self.wait_s:.0f} s for CTAugment's policy of step "
                                   f"{step}: the trainer stopped publishing it")
            time.sleep(delay)
            delay = min(0.05, delay * 2)


class PolicyHistory:
    """The trainer's side: the weights now, those of the last ``lag`` steps (what the loader may still
    draw with: saved in the checkpoint, republished on resume), and the step's update from all ranks."""

    def __init__(self, depth: int, threshold: float, decay: float, lag: int):
        self.depth, self.threshold, self.decay, self.lag = depth, threshold, decay, lag
        self.board = PolicyBoard(lag + 2)
        self.history: dict[int, np.ndarray] = {0: initial_rates()}  # step -> weights at its start

    @property
    def rates(self) -> np.ndarray:
        return self.history[max(self.history)]

    def publish_all(self) -> None:
        for step, rates in sorted(self.history.items()):
            self.board.publish(step, rates)

    def step_done(self, step: int, sums: np.ndarray) -> None:
        """After step ``step - 1``: the weights for ``step``, kept and published."""
        self.history[step] = update(self.rates, sums, self.decay)
        for old in [s for s in self.history if s < step - self.lag]:
            del self.history[old]
        self.board.publish(step, self.history[step])

    def per_bin(self, f) -> np.ndarray:
        """(ops, MAX_BINS) ``f(weights of an op, threshold, decay)`` per op, 0 past its bins."""
        out = np.zeros((len(POOL), MAX_BINS))
        for op, n in enumerate(BINS):
            out[op, :n] = f(self.rates[op, :n], self.threshold, self.decay)
        return out

    def state_dict(self) -> dict:
        return {"history": {int(s): torch.from_numpy(r.copy()) for s, r in self.history.items()},
                "depth": self.depth, "lag": self.lag}

    def load_state_dict(self, state: dict) -> None:
        if int(state["lag"]) != self.lag:
            raise ValueError(f"data.ctaugment.lag: the checkpoint's CTAugment drew with lag {state['lag']}, this "
                             f"run has {self.lag}: resume with data.ctaugment.lag={state['lag']}")
        self.history = {int(s): np.asarray(r, dtype=np.float64) for s, r in state["history"].items()}


class CTAugment:
    """CTAugment as a component of a run, like distribution alignment: built when data.strong_aug=ctaugment,
    it holds the policy (:class:`PolicyHistory`) and the views the loader draws with it (:class:`CTAViews`),
    updates the policy once per step from that step's probes (:meth:`end_step`), is saved and restored with
    the run (``state_dict``), and pictures itself (:meth:`write_outputs`)."""

    enabled_by = "data.strong_aug=ctaugment"  # a checkpoint with this component resumes only with it

    def __init__(self, views, depth: int, threshold: float, decay: float, lag: int):
        self.history = PolicyHistory(depth, threshold, decay, lag)
        self.views = CTAViews(views, depth, threshold, decay, self.history.board, lag)
        self.depth = depth

    @classmethod
    def from_config(cls, views, c) -> "CTAugment":
        return cls(views, c.depth, c.threshold, c.decay, c.lag)

    def start(self) -> None:
        """Before the loader starts: every policy it may still draw with (the restored ones on a resume)."""
        self.history.publish_all()

    @torch.no_grad()
    def end_step(self, step: int, choices: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """After step ``step - 1``: the probes' class probabilities (the model in eval mode) move the bins they
        used; every rank's per-bin sums are added exactly (fixed-point integers), so the policy of ``step`` is
        the same on every rank and world size. Returns the probes' mean proximity."""
        prox = proximity(probs, labels.to(probs.device))
        sums = sum_over_ranks(probe_sums(choices, prox).to(probs.device)).cpu()
        self.history.step_done(step, sums.numpy())
        return prox.mean()

    def state_dict(self) -> dict:
        return self.history.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state)

    def write_outputs(self, out_dir, step: int) -> list:
        return write_outputs(self.history, out_dir, step)


def write_outputs(history: PolicyHistory, out_dir, step: int) -> list:
    """The run folder's ctaugment.png and ctaugment.json: the policy learned, pictured and in numbers; returns
    their paths."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    picture(history, str(out / "ctaugment.png"), step)
    atomic.write_text(out / "ctaugment.json", json.dumps(
        {"step": step, "ops": list(OP_NAMES), "bins": list(BINS),
         "probabilities": history.per_bin(bin_probabilities).round(4).tolist(),
         "relative_weights": history.per_bin(bin_weights).round(4).tolist(),
         "weights": history.rates.round(4).tolist()}, indent=1))
    return [out / "ctaugment.png", out / "ctaugment.json"]


def picture(history: PolicyHistory, path: str, step: int) -> None:
    """Each op's bins: weight relative to the op's best, 0 for bins under the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masked = np.ma.masked_where(np.array([[b >= n for b in range(MAX_BINS)] for n in BINS]),
                                history.per_bin(bin_weights))
    fig, ax = plt.subplots(figsize=(7, 5))
    im = ax.imshow(masked, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(OP_NAMES)), OP_NAMES)
    ax.set_xlabel("magnitude bin (low -> high level; rotate, shear, translate: -max -> +max)")
    ax.set_title(f"CTAugment at step {step}: weight / op's best (0 = under {history.threshold}, never drawn)",
                 fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


assert math.isclose(POOL[ROTATE][1], 30) and len(OP_NAMES) == len(POOL)  # indices follow POOL's order
