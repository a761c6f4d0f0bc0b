"""The training loop: DeepSpeed ZeRO around a timm backbone, one step at a time.

A step takes the feed's batches (distssl.data.feed: the views already made, wherever the config makes them),
hands each micro-batch to the algorithm's forward and loss (distssl.ssl: the default step, or the family's
own), backward and step, then the end-of-step updates (the algorithm's state from the whole global batch, the
feed's learned augmentation, the EMA). ``fit`` is the loop with its schedule: resume, steps (train, report,
eval, save, preemption), the outputs (distssl.train.outputs). The process group and the peer watch
(distssl.distributed), the optimizer and DeepSpeed config (distssl.train.optim) and checkpoints
(distssl.checkpoint: a dict of stateful objects) live in their own modules; so does starting a run
(distssl.train.run).

One step = one labeled batch of B (global) and an unlabeled batch of mu*B, each split evenly across ranks.
Anything that crosses ranks (p_model, eval counts, skipped samples) is summed by
distssl.distributed.collectives so that results do not depend on the world size.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from distssl import ssl as algorithms
from distssl.checkpoint import layout as ckpt
from distssl.checkpoint.state import Checkpoints, RunState
from distssl.config import Config, ConfigError, redacted_dict
from distssl.data.feed import Feed
from distssl.data.index import resolve
from distssl.data.streams import DataError
from distssl.distributed.collectives import sum_numbers
from distssl.distributed.peers import use_cuda, watch_local_peers, write_heartbeat
from distssl.distributed.preempt import Preempted, PreemptWatch, ignore_in_worker
from distssl.models.factory import create_model
from distssl.models.heads import add_heads
from distssl.ssl.distalign import DistributionAlignment, target_from_histogram
from distssl.ssl.step import StepInputs
from distssl.storage.cache import cache_for
from distssl.tracking.metrics import MetricsWriter
from distssl.train import preflight
from distssl.train.bnstats import BatchStatsSharing
from distssl.train.ema import EMA, average_over_ranks
from distssl.train.optim import accumulation, build_optimizer, deepspeed_config
from distssl.train.outputs import Outputs
from distssl.train.progress import Progress, nanmean_by_key

log = logging.getLogger("distssl")


def build_algorithm(cfg: Config, labeled, unlabeled, rank: int
                    ) -> tuple[algorithms.Algorithm, DistributionAlignment]:
    """``ssl.algorithm`` with its keys, for this run's shape; distribution alignment as the component it uses
    when ``ssl.dist_align`` is on. Built before the model: its needs say what the feed makes, its heads what
    the model gets."""
    t, s = cfg.train, cfg.ssl
    p_target = train_prior = None
    if s.dist_align_target in ("labeled", "estimated"):
        if not labeled.class_histogram:
            raise ConfigError(f"ssl.dist_align_target={s.dist_align_target} needs a class histogram: data.labeled "
                              "must be a shard set with index.json (not a brace pattern)")
        if s.dist_align_target == "labeled":
            p_target = target_from_histogram(labeled.class_histogram)
        else:
            train_prior = target_from_histogram(labeled.class_histogram)
    da = DistributionAlignment(cfg.model.num_classes, s.dist_align_momentum, p_target, train_prior=train_prior)
    try:
        components = algorithms.build_components(s, cfg.model.num_classes, t.steps, labeled.class_histogram)
        # ACR's adjustment is its distribution alignment (the authors run it without DA): not both
        use_da = s.dist_align and s.imbalance != "acr"
        shape = algorithms.RunShape(t.steps, t.batch_size * s.mu, unlabeled.total)
        algorithm = algorithms.build(s, cfg.model.num_classes, da if use_da else None, unlabeled.total, shape,
                                     components)
        if use_da != s.dist_align:
            algorithm.derived["ssl.dist_align"] = "false (ssl.imbalance=acr adjusts the pseudo-labels instead)"
    except ValueError as e:
        raise ConfigError(f"ssl.algorithm={s.algorithm}: {e}") from None
    if rank == 0 and algorithm.derived:
        derived = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in algorithm.derived.items())
        log.info("derived from this run (%d steps of %d unlabeled images): %s", t.steps, t.batch_size * s.mu, derived)
    return algorithm, da


class Trainer:
    def __init__(self, cfg: Config, rank: int, world: int, local_rank: int, on_eval: Optional[Callable] = None,
                 label_maps: Optional[preflight.LabelMaps] = None):
        import deepspeed

        self.cfg, self.rank, self.world, self.on_eval = cfg, rank, world, on_eval
        self.preempt = PreemptWatch(cfg.run.preempt_signals, cfg.run.out_dir, rank)
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda() else "cpu")
        if use_cuda():
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: time cuDNN's algorithms once, keep the fastest
        self.out = Path(cfg.run.out_dir)
        t = cfg.train
        self.micro, self.grad_accum = accumulation(cfg, world)
        self.labeled, self.unlabeled, self.evalset = (resolve(cfg.data.labeled), resolve(cfg.data.unlabeled),
                                                      resolve(cfg.data.eval))
        shard_cache = cache_for(cfg.data.cache_dir, cfg.data.cache_limit_gb)  # one per process, one folder per node
        for shards in (self.labeled, self.unlabeled, self.evalset):
            shards.cache = shard_cache
        # labels of sets that name their classes in another order, in the labeled set's order (run() found them
        # in its preflight; a Trainer built on its own checks the classes here)
        label_maps = label_maps if label_maps is not None else preflight.check_classes(cfg) or {}
        if rank == 0:
            preflight.warn_few_shards({"labeled": self.labeled, "unlabeled": self.unlabeled}, world, t.num_workers)
        self.algorithm, self.da = build_algorithm(cfg, self.labeled, self.unlabeled, rank)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = add_heads(create_model(cfg.model.name, cfg.model.num_classes, cfg.model.pretrained,
                                       cfg.model.drop_path_rate, cfg.model.grad_checkpointing, cfg.model.drop_rate),
                          self.algorithm.heads)
        optimizer, scheduler = build_optimizer(model, cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.micro, world, self.grad_accum))
        ckpt.use_safe_loading(self.engine)
        self.zero3 = cfg.deepspeed.zero_stage == 3
        self.dtype = next(self.engine.module.parameters()).dtype  # DeepSpeed's (train.precision or the template's)
        self.ema = EMA(self.engine.module, cfg.train.ema_decay, cfg.train.ema_warmup)
        self.bn_sharing = BatchStatsSharing(self.engine.module)
        # NHWC inputs are enough: cuDNN runs a convolution channels_last when its input is. The parameters stay
        # contiguous: DeepSpeed broadcasts them as byte views (which a channels_last weight cannot give:
        # "stride(-1) must be 1", seen on an H200) and ZeRO flattens them anyway.
        self.feed = Feed(cfg, rank=rank, world=world, batch=self.micro * self.grad_accum, device=self.device,
                         dtype=self.dtype, channels_last=t.channels_last and use_cuda(),
                         wanted=self.algorithm.needs.views, sets={"labeled": self.labeled, "unlabeled": self.unlabeled},
                         label_maps=label_maps, uses_unlabeled=cfg.ssl.lambda_u > 0,
                         trace_dir=str(self.out / "trace") if cfg.run.trace_shards else None,
                         worker_init=ignore_in_worker)
        self.state = RunState()
        self.ckpt_dir = self.out / "checkpoints"
        self.checkpoints = Checkpoints(self.ckpt_dir, rank, world, cfg.deepspeed.zero_stage, t.keep_checkpoints)
        self.outputs = Outputs(self)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def stateful(self) -> dict:
        """What a checkpoint saves besides the engine, by name (distssl.checkpoint.state)."""
        return {"run": self.state, "feed": self.feed, "ema": self.ema, "algorithm": self.algorithm,
                **self.feed.components}

    def sum_over_ranks(self, values) -> torch.Tensor:
        return sum_numbers(values, self.device)

    def evaluate(self) -> dict:
        return self.outputs.evaluate()

    # -- the step --
    def train_step(self, lb: dict, ub: Optional[dict]) -> dict:
        """One step: each micro-batch forwarded as the algorithm's step does it, its loss, backward/step; then the
        end-of-step updates; returns the step's stats (plus the EMA decay and lr)."""
        engine, n, to_input = self.engine, self.grad_accum, self.feed.to_input
        engine.train()
        xs, ys = lb["x"].chunk(n), lb["y"].chunk(n)
        per_micro = []
        if ub is None:  # lambda_u = 0: the supervised-only baseline of the same recipe
            # data.labeled_targets=soft: each sample's target distribution (a teacher's calibrated prediction)
            for x, y in zip(xs, lb["y_soft"].chunk(n) if "y_soft" in lb else ys):
                loss = F.cross_entropy(engine(to_input(x)).float(), y.to(self.device))
                engine.backward(loss)  # DeepSpeed divides by the accumulation steps
                engine.step()  # applies the update only at the accumulation boundary
                per_micro.append({"loss": loss.detach(), "loss_x": loss.detach()})
        else:
            # the algorithm weighs each micro-batch with its state (and DA's p_model) as of the step start and
            # updates them once per step from the whole global batch (end_step), so they depend on the global
            # batch only, not on the world size or the accumulation
            names = self.algorithm.needs.views
            views = {v: ub[v].chunk(n) for v in names}
            ids = ub["idx"].chunk(n) if "idx" in ub else [None] * n
            for i, (x, y, y_true, idx) in enumerate(zip(xs, ys, ub["y_true"].chunk(n), ids)):
                inp = StepInputs(
                    model=engine, module=engine.module, x_lb=to_input(x), y_lb=y.to(self.device),
                    views={v: to_input(views[v][i]) for v in names}, bn_sharing=self.bn_sharing, ema=self.ema,
                    weak_forward=self.cfg.train.weak_forward, ids=idx, true_u=y_true.to(self.device), step=self.step,
                    total_steps=self.cfg.train.steps, seed=self.cfg.run.seed,
                    # a step's own draws (MixUp) from (seed, step, rank, micro-batch): a resume repeats them
                    generator=torch.Generator().manual_seed(hash((self.cfg.run.seed, self.step, self.rank, i))
                                                            % 2 ** 62))
                loss, stats = self.algorithm.loss(self.algorithm.forward(inp))
                engine.backward(loss)
                engine.step()
                per_micro.append(stats)
            self.algorithm.end_step()
        stats = nanmean_by_key({k: [m[k] for m in per_micro] for k in per_micro[0]})
        self.state.step += 1
        stats.update(self.feed.end_step(self.step, self._classify))
        stats["ema_decay"] = self.ema.update(self.step)
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        return stats

    @torch.no_grad()
    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        """The model's class probabilities of uint8 images, in eval mode (the feed's probes). The ranks' BatchNorm
        running statistics are averaged first (timm's distribute_bn): each rank's come from its share of the
        batch, and DeepSpeed saves rank 0's, so a resumed rank would otherwise judge its probes with other
        statistics than an uninterrupted one."""
        average_over_ranks(self.engine.module.buffers())
        self.engine.eval()
        probs = torch.cat([self.engine(self.feed.to_input(c)).float().softmax(1) for c in x.chunk(self.grad_accum)])
        self.engine.train()
        return probs

    def _check_bad_fraction(self, samples_per_step: int, min_samples: int = 1000) -> None:
        """Bad samples are skipped and counted; too many of them means broken data, not bad luck."""
        skipped = self.state.skipped_total
        seen = self.step * samples_per_step + skipped
        if seen >= min_samples and skipped > self.cfg.train.max_bad_fraction * seen:
            raise DataError(f"{skipped} of {seen} samples were unusable (undecodable image, missing cls or unreadable "
                            f"shard), more than train.max_bad_fraction={self.cfg.train.max_bad_fraction}: check the "
                            f"shards with distssl-inspect --verify, or raise train.max_bad_fraction")

    # -- checkpoints (distssl.checkpoint.state) --
    def save(self) -> None:
        self.checkpoints.save(self.step, self.engine, self.ema, self.stateful, self.feed.readers)

    def resume(self) -> Optional[int]:
        """Load the newest complete checkpoint; its step, or None when the run starts fresh."""
        return self.checkpoints.resume(self.engine, self.ema, self.stateful, self.feed.readers, self.cfg.run.seed,
                                       self.cfg.train.batch_size)

    # -- the loop: resume, then steps (each: train, report, eval, save, preemption), then the outputs --
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        resumed = self.resume()
        metrics = MetricsWriter(str(self.out), self.rank == 0, self.step, t.steps, tuple(cfg.run.loggers),
                                redacted_dict(cfg))  # credentials in URLs never reach a tracker
        if resumed is not None:
            metrics.message(f"resumed from {self.checkpoints.path(resumed)} at step {resumed}")
        progress = Progress(self, metrics)
        batches = self.feed.batches(self.step)
        self._watch_peers()
        while self.step < t.steps:
            lb, ub = next(batches)
            skipped = float(lb.pop("skipped", 0) + (ub.pop("skipped", 0) if ub else 0))
            stats = self.train_step(lb, ub)
            # one all-reduce per step carries both: every rank learns of a preemption at the same step
            sums = self.sum_over_ranks([skipped, float(self.preempt.requested)])
            self.state.skipped_total += int(sums[0])
            self._check_bad_fraction(progress.samples_per_step)
            progress.step(stats)
            is_eval = bool(t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps
            if is_eval:
                progress.evaluated(self.evaluate())
            saved = self._save_if_due(is_eval)
            if is_eval and self.on_eval is not None:  # e.g. report to Ray Tune with this checkpoint
                self.on_eval(self.step, dict(progress.last_eval), self.checkpoints.path(self.step))
            if sums[1] > 0 and self.step < t.steps:
                self._stop_preempted(saved, metrics)
        return self.outputs.finish(progress, metrics)

    def _watch_peers(self) -> None:
        write_heartbeat(self.out, self.rank, self.step)
        if self.world > 1:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 0))) or self.world
            watch_local_peers(self.out, self.rank, local_peers=local_world - 1)

    def _save_if_due(self, is_eval: bool) -> bool:
        t = self.cfg.train
        due = bool(t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.steps or \
            (is_eval and self.on_eval is not None)  # a reported result comes with its checkpoint
        if due:
            self.save()
        return due

    def _stop_preempted(self, saved: bool, metrics: MetricsWriter) -> None:
        if not saved:
            self.save()
        self.preempt.saved = True
        signame = self.preempt.signame or "a signal to another rank"
        stop = Preempted(self.step, self.checkpoints.path(self.step), signame)
        metrics.close()  # the bar first, so the run's last line stands alone
        if self.rank == 0:  # how the run ended and what to do: on stderr, where a log keeps the errors
            print(stop, file=sys.stderr, flush=True)
        raise stop
