"""The training loop: DeepSpeed ZeRO around a timm backbone. Each step forwards what the SSL
algorithm asks for (distssl.train.forward) and hands it the logits (distssl.ssl); backward, step, EMA.
``fit`` is the loop with its phases: resume, steps (train, report, eval, save, preemption), outputs.
The process group and the peer watch (distssl.distributed), the optimizer and DeepSpeed config
(distssl.train.optim), the eval (distssl.train.evaluate), checkpoints and resuming (distssl.checkpoint)
live in their own modules.

One step = one labeled batch of B (global) and an unlabeled batch of mu*B, each split evenly across
ranks. By default (ssl.weak_forward=shared_bn) labeled + strong go through one forward with
gradients and the weak view through one without, normalised by BatchNorm with the statistics of the
first (distssl.train.bnstats); ssl.weak_forward=concat is FixMatch's reference step, one forward of
cat(labeled, weak, strong) with gradients, which also pays a backward for the weak view. Anything
that crosses ranks (p_model, eval counts, skipped samples) is summed by distssl.distributed.collectives so
that results do not depend on the world size.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distssl import atomic
from distssl import ssl as algorithms
from distssl.checkpoint import layout as ckpt
from distssl.checkpoint.state import Checkpoints, RunState
from distssl.config import Config, ConfigError, dump_yaml, redacted_dict, resume_conflicts
from distssl.data import ctaugment, device_augment, device_decode
from distssl.data.cache import cache_for
from distssl.data.index import ShardSet, resolve
from distssl.data.samples import (
    eval_item,
    labeled_encoded_item,
    labeled_item,
    unlabeled_encoded_item,
    unlabeled_item,
    unlabeled_plan_item,
)
from distssl.data.store import redact
from distssl.data.streams import DataError, EvalStream, StreamPlan, TrainStream, loader
from distssl.data.transforms import Views, normalize
from distssl.distributed.collectives import end_group, sum_numbers, sum_over_ranks
from distssl.distributed.peers import init_distributed, use_cuda, watch_local_peers, write_heartbeat
from distssl.distributed.preempt import Preempted, PreemptWatch, ignore_in_worker
from distssl.models import export as outputs
from distssl.models.export import gather_ema_state, model_meta, write_export
from distssl.models.factory import add_rotation_head, create_model, fill_input_defaults, without_aux_heads
from distssl.ssl.distalign import DistributionAlignment, target_from_histogram
from distssl.tracking import environment
from distssl.tracking.metrics import MetricsWriter, plot
from distssl.train import preflight
from distssl.train.bnstats import BatchStatsSharing
from distssl.train.ema import EMA, average_over_ranks
from distssl.train.evaluate import evaluate_ema, gathered
from distssl.train.forward import forward_mixed, forward_views
from distssl.train.optim import accumulation, build_optimizer, deepspeed_config
from distssl.train.progress import Progress, nanmean_by_key

log = logging.getLogger("distssl")


# --- the step ------------------------------------------------------------------------------------

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
        self.ckpt_dir = self.out / "checkpoints"
        self.eval_logits, self.eval_logits_step = None, None  # this rank's of the last eval (calibrate an export)
        t = cfg.train
        self.micro, self.grad_accum = accumulation(cfg, world)
        self.B = self.micro * self.grad_accum  # per-rank labeled batch of one optimizer step
        self.uses_unlabeled = cfg.ssl.lambda_u > 0

        self.labeled, self.unlabeled, self.evalset = (resolve(cfg.data.labeled), resolve(cfg.data.unlabeled),
                                                      resolve(cfg.data.eval))
        shard_cache = cache_for(cfg.data.cache_dir, cfg.data.cache_limit_gb)  # one per process, one folder per node
        for shards in (self.labeled, self.unlabeled, self.evalset):
            shards.cache = shard_cache
        # labels of sets that name their classes in another order, in the labeled set's order (run()
        # found them in its preflight; a Trainer built on its own checks the classes here)
        self.label_maps = label_maps if label_maps is not None else preflight.check_classes(cfg) or {}

        if rank == 0:
            preflight.warn_few_shards({"labeled": self.labeled, "unlabeled": self.unlabeled}, world,
                                      t.num_workers)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = create_model(cfg.model.name, cfg.model.num_classes, cfg.model.pretrained, cfg.model.drop_path_rate,
                             cfg.model.grad_checkpointing, cfg.model.drop_rate)
        if algorithms.ALGORITHMS[cfg.ssl.algorithm].needs.rotation:  # ReMixMatch's auxiliary head
            add_rotation_head(model)
        # NHWC inputs are enough: cuDNN runs a convolution channels_last when its input is. The
        # parameters stay contiguous: DeepSpeed broadcasts them as byte views (which a channels_last
        # weight cannot give: "stride(-1) must be 1", seen on an H200) and ZeRO flattens them anyway.
        self.channels_last = t.channels_last and use_cuda()
        optimizer, scheduler = build_optimizer(model, cfg)
        ds_config = deepspeed_config(cfg, self.micro, world, self.grad_accum)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        # inputs in the dtype DeepSpeed keeps the module in (train.precision or the template's choice)
        self.dtype = next(self.engine.module.parameters()).dtype
        ckpt.use_safe_loading(self.engine)
        self.zero3 = cfg.deepspeed.zero_stage == 3
        self.ema = EMA(self.engine.module, cfg.ssl.ema_decay, cfg.ssl.ema_warmup)
        self.bn_sharing = BatchStatsSharing(self.engine.module)
        p_target = None
        if cfg.ssl.dist_align_target == "labeled":
            if not self.labeled.class_histogram:
                raise ConfigError("ssl.dist_align_target=labeled needs a class histogram: data.labeled must be "
                                  "a shard set with index.json (not a brace pattern)")
            p_target = target_from_histogram(self.labeled.class_histogram)
        self.da = DistributionAlignment(cfg.model.num_classes, cfg.ssl.dist_align_momentum, p_target)
        # the SSL algorithm (ssl.algorithm): loss and stats from the views' logits, its own state
        # updated once per step from all ranks; DA is a component it uses when ssl.dist_align is on
        try:
            shape = algorithms.RunShape(t.steps, t.batch_size * cfg.ssl.mu, self.unlabeled.total)
            self.algorithm = algorithms.build(cfg.ssl, cfg.model.num_classes, self.da if cfg.ssl.dist_align else None,
                                              self.unlabeled.total, shape)
        except ValueError as e:
            raise ConfigError(f"ssl.algorithm={cfg.ssl.algorithm}: {e}") from None
        if rank == 0 and self.algorithm.derived:
            log.info("derived from this run (%d steps of %d unlabeled images): %s", t.steps, t.batch_size * cfg.ssl.mu,
                     ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in self.algorithm.derived.items()))
        self.mean = torch.tensor(cfg.data.mean, device=self.device)
        self.std = torch.tensor(cfg.data.std, device=self.device)
        self.views = Views.from_config(cfg.data)
        # data.strong_aug=ctaugment: the policy (its recent history, saved and shared with the loader) and
        # the views drawn from it; its probes ride in the labeled batch
        self.cta, self.cta_views = None, None
        if cfg.data.strong_aug == "ctaugment":
            c = cfg.data.ctaugment
            self.cta = ctaugment.PolicyHistory(c.depth, c.threshold, c.decay, c.lag)
            self.cta_views = ctaugment.CTAViews(self.views, c.depth, c.threshold, c.decay, self.cta.board, c.lag)
        self.strong_ops = cfg.data.ctaugment.depth if self.cta is not None else cfg.data.randaugment_ops
        self.sets = {"labeled": self.labeled, "unlabeled": self.unlabeled}
        self.state = RunState(readers=world * max(1, t.num_workers))
        self.checkpoints = Checkpoints(self.ckpt_dir, rank, world, cfg.deepspeed.zero_stage, t.keep_checkpoints)

    @property
    def step(self) -> int:
        return self.state.step

    # -- data --
    def _stream(self, which: str, shards: ShardSet, batch: int, make, plan: StreamPlan) -> TrainStream:
        return TrainStream(shards, rank=self.rank, world_size=self.world, batch_size=batch,
                           seed=self.cfg.run.seed + (0 if which == "labeled" else 1),
                           shuffle_buffer=self.cfg.data.shuffle_buffer, make_item=make,
                           cursors=self.state.cursors[which], name=which,
                           interleave_shards=self.cfg.data.interleave_shards, plan=plan, first_step=self.step,
                           trace_dir=str(self.out / "trace") if self.cfg.run.trace_shards else None)

    def _train_batches(self, which: str, shards: ShardSet, batch: int, make) -> Iterator[dict]:
        stream = self._stream(which, shards, batch, make, self.state.plans[which])
        for b in loader(stream, self.cfg.train.num_workers, worker_init=ignore_in_worker):
            self.state.cursors[which][int(b.pop("worker"))] = int(b.pop("cursor"))
            yield b

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        x = normalize(t.to(self.device, non_blocking=True), self.mean, self.std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def views_on_device(self, b: dict, strong: Optional[tuple[str, ...]] = None) -> dict:
        """data.augment_on=device: the views made here from the loader's base crops and the random choices
        it drew for them (``plan_NAME`` -> ``NAME``; ``strong``: the names that get the strong view, by
        default strong, strong_2, ...)."""
        v = self.views
        base = b.pop("base").to(self.device, non_blocking=True)
        pad = device_augment.pad_pixels(v)
        for name in [k[len("plan_"):] for k in list(b) if k.startswith("plan_")]:
            plan = b.pop(f"plan_{name}")
            strong_view = name in strong if strong is not None else algorithms.is_strong(name)
            b[name] = (device_augment.apply_strong(base, plan, pad, self.strong_ops, v.cutout_fraction)
                       if strong_view else device_augment.apply_weak(base, plan, pad))
        return b

    def decode_on_device(self, b: Optional[dict]) -> Optional[dict]:
        """data.decode_on=device: the batch's JPEGs decoded here and cropped to their bases (the labeled
        batch's view made too); files the device cannot decode count as skipped."""
        if b is None or "bytes_image" not in b:
            return b
        b["base"], bad = device_decode.decode_batch(
            b.pop("bytes_image"), b.pop("bytes_image_lengths"), b.pop("decoded"), b.pop("box"),
            self.views.image_size, self.views.interpolation, self.device)
        b["skipped"] = b.get("skipped", 0) + bad
        if "plan_x" in b:  # the labeled batch: its one view
            b = self.views_on_device(b, strong=("x",) if self.cfg.data.labeled_view == "strong" else ())
        return b

    def train_step(self, lb: dict, ub: Optional[dict]) -> dict:
        """One step: forward the views, the algorithm's loss, backward/step; returns its stats (plus lr)."""
        engine, n = self.engine, self.grad_accum
        probes = (lb.pop("x_probe"), lb.pop("probe_choices")) if "x_probe" in lb else None
        engine.train()
        if ub is not None and "base" in ub:
            ub = self.views_on_device(ub)
        xs, ys = lb["x"].chunk(n), lb["y"].chunk(n)
        if ub is None:  # lambda_u = 0: the supervised-only baseline of the same recipe
            per_micro = []
            # data.labeled_targets=soft: each sample's target distribution (a teacher's calibrated prediction)
            targets = lb["y_soft"].chunk(n) if "y_soft" in lb else ys
            for x, y in zip(xs, targets):
                loss = F.cross_entropy(engine(self._to(x)).float(), y.to(self.device))
                engine.backward(loss)  # DeepSpeed divides by the accumulation steps
                engine.step()  # applies the update only at the accumulation boundary
                per_micro.append({"loss": loss.detach(), "loss_x": loss.detach()})
        else:
            # the algorithm weighs each micro-batch with its state (and DA's p_model) as of the step
            # start and updates them once per step from the whole global batch (end_step), so they
            # depend on the global batch only, not on the world size or the accumulation
            per_micro = []
            needs = self.algorithm.needs
            views = {v: ub[v].chunk(n) for v in needs.views}
            ids = ub["idx"].chunk(n) if "idx" in ub else [None] * n
            for i, (x, y, y_true, idx) in enumerate(zip(xs, ys, ub["y_true"].chunk(n), ids)):
                inputs = {v: self._to(views[v][i]) for v in needs.views}
                if needs.mixes:  # MixMatch: its draws from (seed, step, rank, micro-batch), so a resume repeats them
                    gen = torch.Generator().manual_seed(hash((self.cfg.run.seed, self.step, self.rank, i)) % 2 ** 62)
                    fw = forward_mixed(engine, needs, self._to(x), y.to(self.device), inputs, self.algorithm.mix,
                                       self.bn_sharing, gen, self.algorithm.rotate if needs.rotation else None)
                else:
                    fw = forward_views(engine, needs, self._to(x), inputs, weak_forward=self.cfg.ssl.weak_forward,
                                       bn_sharing=self.bn_sharing, ema=self.ema, module=engine.module,
                                       noise_key=(self.cfg.run.seed, self.step, idx))
                fw.targets_x, fw.ids, fw.true_u = y.to(self.device), idx, y_true.to(self.device)
                fw.step, fw.total_steps, fw.seed = self.step, self.cfg.train.steps, self.cfg.run.seed
                loss, stats = self.algorithm.loss(fw)
                engine.backward(loss)
                engine.step()
                per_micro.append(stats)
            self.algorithm.end_step()
        stats = nanmean_by_key({k: [m[k] for m in per_micro] for k in per_micro[0]})
        self.state.step += 1
        if probes is not None:
            stats["cta_proximity"] = self._update_policy(*probes, lb["y"])
        stats["ema_decay"] = self.ema.update(self.step)
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        return stats

    @torch.no_grad()
    def _update_policy(self, x_probe: torch.Tensor, choices: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CTAugment: the model (eval mode, as the reference classifies its probes) on this rank's probes;
        every rank's per-bin sums added exactly, the same update on each, the next step's policy published.
        The ranks' BatchNorm running statistics are averaged first (timm's distribute_bn): each rank's
        come from its share of the batch, and DeepSpeed saves rank 0's, so without it a resumed rank
        would classify its probes with other statistics than an uninterrupted one."""
        average_over_ranks(self.engine.module.buffers())
        self.engine.eval()
        probs = torch.cat([self.engine(self._to(x)).float().softmax(1) for x in x_probe.chunk(self.grad_accum)])
        self.engine.train()
        prox = ctaugment.proximity(probs, y.to(self.device))
        sums = sum_over_ranks(ctaugment.probe_sums(choices, prox).to(self.device)).cpu()
        self.cta.step_done(self.step, sums.numpy())
        return prox.mean()

    def _sum_over_ranks(self, values) -> torch.Tensor:
        return sum_numbers(values, self.device)

    # -- eval and outputs --
    def evaluate(self) -> dict:
        """Collective: top-1/top-5 of the EMA weights on the eval set; this rank's logits and labels are kept
        (``eval_logits``) for the calibration of an export made from this eval."""
        stream = EvalStream(self.evalset, rank=self.rank, world_size=self.world,
                            batch_size=max(1, self.cfg.train.eval_batch_size // self.world),
                            make_item=eval_item(self.views, self.label_maps.get("eval")))
        size = self.cfg.data.image_size
        dummy = torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)
        batches = loader(stream, self.cfg.train.num_workers, worker_init=ignore_in_worker)
        result, self.eval_logits = evaluate_ema(self.engine, self.ema, batches, self._to, dummy, self.zero3,
                                                keep_logits=self.cfg.model.num_classes)
        self.eval_logits_step = self.step
        return result

    def calibration(self, png: Optional[Path] = None) -> tuple[dict, Optional[tuple]]:
        """Collective: the softmax temperature of the last eval's weights, fitted by temperature scaling on
        that eval's logits (gathered from every rank), with its NLL and ECE before and after, and ``png`` its
        reliability diagram (rank 0); also the gathered (logits, labels). ({}, None) on an empty eval set."""
        from distssl.predict.calibrate import calibrate

        logits, labels = gathered(self.eval_logits)
        if labels.numel() == 0:
            return {}, None
        report = calibrate(logits, labels, str(png) if png is not None and self.rank == 0 else None)
        return {"temperature": report["temperature"],
                "temperature_fitted_on": f"data.eval ({redact(str(self.cfg.data.eval))}) at step "
                                         f"{self.eval_logits_step}, the eval this export was made from",
                **{f"eval_{k}": report[k] for k in ("nll_before", "nll_after", "ece_before", "ece_after")}}, \
            (logits, labels)

    def _best_top1(self) -> float:
        """The best eval top-1 so far (model_best.json, read by rank 0 and shared), -1 before any."""
        best = -1.0
        if self.rank == 0:
            try:
                best = float(json.loads((self.out / outputs.BEST_META_NAME).read_text())["eval_top1"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return self._sum_over_ranks([best if self.rank == 0 else 0.0])[0].item()

    def export(self, last_eval: dict, name: str = outputs.WEIGHTS_NAME, calibration: Optional[dict] = None
               ) -> Optional[Path]:
        """EMA weights -> out_dir/NAME.safetensors + NAME.json (every rank gathers, rank 0 writes): the final
        ones as model.*, the best eval's as model_best.* (as timm's CheckpointSaver keeps the best)."""
        state = gather_ema_state(self.engine.module, self.ema)
        if self.rank != 0:
            return None
        state = without_aux_heads(state)  # the exported model is the plain timm one
        d = self.cfg.data
        calibration = dict(calibration or {})
        temperature = calibration.pop("temperature", None)
        meta = model_meta(self.cfg.model.name, self.cfg.model.num_classes, d.image_size, d.mean, d.std,
                          self.evalset.class_names or self.labeled.class_names or [],
                          {"eval_top1": last_eval.get("top1"), "weights": "ema", **calibration},
                          crop_pct=self.views.eval_crop_pct, interpolation=self.views.interpolation,
                          run=redact(str(self.out)), step=self.step, temperature=temperature)
        return write_export(state, meta, self.out / name)

    def _final_details(self) -> dict:
        """Collective: the final EMA weights on the eval set, per class (accuracy, precision, the confusion
        matrix, on rank 0 as confusion.png) and their softmax temperature, fitted by temperature scaling
        (distssl-predict applies it), with the eval's NLL and ECE before and after (reliability.png)."""
        from distssl.train.evaluate import per_class, plot_confusion

        if self.eval_logits_step != self.step:  # the last step's eval is the final one
            self.evaluate()
        calibration, got = self.calibration(self.out / "reliability.png")
        if got is None:
            return {}
        names = self.evalset.class_names or self.labeled.class_names or []
        classes, confusion = per_class(*got, names)
        if self.rank == 0:
            plot_confusion(confusion, names, self.out / "confusion.png")
        return {"calibration": calibration, "per_class": classes}

    def _check_bad_fraction(self, samples_per_step: int, min_samples: int = 1000) -> None:
        """Bad samples are skipped and counted; too many of them means broken data, not bad luck."""
        skipped = self.state.skipped_total
        seen = self.step * samples_per_step + skipped
        if seen >= min_samples and skipped > self.cfg.train.max_bad_fraction * seen:
            raise DataError(f"{skipped} of {seen} samples were unusable (undecodable image, missing cls "
                            f"or unreadable shard), more than train.max_bad_fraction="
                            f"{self.cfg.train.max_bad_fraction}: check the shards with distssl-inspect "
                            f"--verify, or raise train.max_bad_fraction")

    def _finished_outputs(self) -> Optional[dict]:
        """The final eval from summary.json when it holds this step and the export is beside it, on
        every rank (all or none skip, since the eval and the export are collective), else None."""
        try:
            summary = json.loads((self.out / "summary.json").read_text())
            exported = (self.out / outputs.WEIGHTS_NAME).exists()
            found = summary.get("step") == self.step and exported and "top1" in summary
        except (OSError, ValueError):
            found = False
        if self._sum_over_ranks([float(found)])[0] < self.world:
            return None
        return {k: summary[k] for k in ("top1", "top5", "eval_images", "eval_skipped") if k in summary}

    # -- checkpoints (distssl.checkpoint.state) --
    def save(self) -> None:
        self.checkpoints.save(self.state, self.engine, self.ema, self.algorithm, self.cta)

    def resume(self) -> Optional[int]:
        """Load the newest complete checkpoint; its step, or None when the run starts fresh."""
        def replan(which: str, plan: StreamPlan, cursors: dict[int, int], old_readers: int) -> StreamPlan:
            return self._stream(which, self.sets[which], 1, None, plan).replan(cursors, old_readers)

        resumed = self.checkpoints.resume(self.state, self.engine, self.ema, self.algorithm, replan,
                                          self.cfg.run.seed, self.cfg.train.batch_size, self.cta)
        if resumed is None:
            return None
        self.state = resumed
        return resumed.step

    # -- the loop: resume, then steps (each: train, report, eval, save, preemption), then the outputs --
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        resumed = self.resume()
        metrics = MetricsWriter(str(self.out), self.rank == 0, self.step, t.steps, tuple(cfg.run.loggers),
                                redacted_dict(cfg))  # credentials in URLs never reach a tracker
        if resumed is not None:
            metrics.message(f"resumed from {self.checkpoints.path(resumed)} at step {resumed}")
        progress = Progress(self, metrics)
        batches = self._batches()
        self._watch_peers()
        while self.step < t.steps:
            lb, ub = (self.decode_on_device(b) for b in next(batches))
            skipped = float(lb.pop("skipped", 0) + (ub.pop("skipped", 0) if ub else 0))
            stats = self.train_step(lb, ub)
            # one all-reduce per step carries both: every rank learns of a preemption at the same step
            sums = self._sum_over_ranks([skipped, float(self.preempt.requested)])
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
        return self._finish(progress, metrics)

    def _batches(self) -> Iterator[tuple[dict, Optional[dict]]]:
        """(labeled batch, unlabeled batch or None) per step, from where the run state says each stream is."""
        cfg = self.cfg
        on_device = cfg.data.decode_on == "device"  # the JPEGs decoded here, so the views made here too
        if self.cta is not None:  # the policies the loader may still draw with: the restored ones on a resume
            self.cta.publish_all()
        strong_labeled = cfg.data.labeled_view == "strong"
        labeled = self._train_batches("labeled", self.labeled, self.B,
                                      labeled_encoded_item(self.views, self.label_maps.get("labeled"), strong_labeled)
                                      if on_device else
                                      labeled_item(self.views, self.label_maps.get("labeled"), strong_labeled,
                                                   probe=self.cta_views,
                                                   soft_classes=cfg.model.num_classes
                                                   if cfg.data.labeled_targets == "soft" else 0))
        if not self.uses_unlabeled:
            return ((lb, None) for lb in labeled)
        make = unlabeled_encoded_item if on_device else \
            unlabeled_plan_item if cfg.data.augment_on == "device" else unlabeled_item
        extra = {"cta": self.cta_views} if self.cta_views is not None else {}
        unlabeled = self._train_batches("unlabeled", self.unlabeled, self.B * cfg.ssl.mu,
                                        make(self.views, self.label_maps.get("unlabeled"),
                                             self.unlabeled.sample_ids(), self.algorithm.needs.views, **extra))
        return zip(labeled, unlabeled)

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
        stop = Preempted(self.step, self.checkpoints.path(self.step),
                         self.preempt.signame or "a signal to another rank")
        metrics.message(str(stop))
        metrics.close()
        raise stop

    def _finish(self, progress: Progress, metrics: MetricsWriter) -> dict:
        """The final eval, exports and summary; a rerun of a finished run reports them again and leaves them."""
        last_eval = progress.last_eval
        if not last_eval:  # the run was already finished
            written = self._finished_outputs()
            # else it was killed between its last checkpoint and its outputs
            last_eval = written if written is not None else self.evaluate()
            if self.on_eval is not None:  # a restored sweep trial reports its result again (Ray expects one)
                self.on_eval(self.step, dict(last_eval), self.checkpoints.path(self.step))
            if written is not None:
                metrics.message(f"already finished at step {self.step}: eval top-1 {100 * written['top1']:.2f}% "
                                f"(from {self.out / 'summary.json'})")
                metrics.close()
                return written
        details = self._final_details()
        exported = self.export(last_eval, calibration=details.get("calibration"))
        if exported is not None:
            metrics.message(f"exported EMA weights to {exported} (+ {outputs.META_NAME}; load with timm, see README); "
                            f"the best eval's ({100 * progress.best_top1:.2f}%) to {self.out / outputs.BEST_NAME}")
        if self.rank == 0:
            plot(self.out / "metrics.jsonl", self.out / "curves.png")
            if self.cta is not None:  # the policy learned, pictured and in numbers
                ctaugment.write_outputs(self.cta, self.out, self.step)
            summary = {"step": self.step, **last_eval, "best_top1": progress.best_top1, "out_dir": str(self.out),
                       **progress.throughput(),
                       **details, **({"derived": self.algorithm.derived} if self.algorithm.derived else {})}
            atomic.write_text(self.out / "summary.json", json.dumps(summary, indent=1))
            if details:  # per class and the calibration, to the trackers too
                metrics.log("final_eval", self.step, {
                    **{f"per_class/{name}/{k}": c[k] for name, c in details["per_class"].items()
                       for k in ("accuracy", "precision")},
                    **{k: v for k, v in details["calibration"].items() if isinstance(v, (int, float))}})
            metrics.artifacts([self.out / n for n in ("config.yaml", "summary.json", "curves.png", "confusion.png",
                                                      "ctaugment.png", "ctaugment.json",
                                                      outputs.WEIGHTS_NAME,
                                                      outputs.META_NAME, outputs.BEST_NAME, outputs.BEST_META_NAME)])
        metrics.close()
        return last_eval


def prepare_out_dir(cfg: Config) -> None:
    """Refuse a resume whose config changed in a way that breaks it; write the resolved config."""
    import yaml

    out = Path(cfg.run.out_dir)
    saved_path = out / "config.yaml"
    if saved_path.exists() and ckpt.complete_tags(out / "checkpoints"):
        conflicts = resume_conflicts(yaml.safe_load(saved_path.read_text()) or {}, cfg)
        if conflicts:
            raise ConfigError(f"run.out_dir={out} holds a run whose config differs in keys that break resuming it: "
                              + "; ".join(conflicts) + ". Use another run.out_dir, or the same values.")


def write_config(cfg: Config) -> None:
    """config.yaml, rewritten only when it changes (a resume with the same config leaves its mtime alone)."""
    import yaml

    path = Path(cfg.run.out_dir) / "config.yaml"
    if path.exists() and path.read_text() == yaml.safe_dump(redacted_dict(cfg), sort_keys=False):
        return
    dump_yaml(cfg, path)


def finished(cfg: Config) -> Optional[dict]:
    """The result of a run that already reached train.steps (summary.json at that step, its export and its
    last checkpoint beside it), else None: a finished run is read, not written."""
    out = Path(cfg.run.out_dir)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    found = ckpt.latest(out / "checkpoints")
    if summary.get("step") != cfg.train.steps or not (out / outputs.WEIGHTS_NAME).exists() or found is None \
            or found[0] != cfg.train.steps or "top1" not in summary:
        return None
    return summary


def run(cfg: Config, on_eval: Optional[Callable] = None) -> dict:
    """Train (or resume) to ``train.steps``; returns the final eval of the EMA weights.
    ``on_eval(step, metrics, checkpoint_dir)`` runs on every rank after each eval's checkpoint."""
    filled = fill_input_defaults(cfg)
    if filled and os.environ.get("RANK", "0") == "0":
        log.warning("from the model's pretrained config: %s", ", ".join(filled))
    label_maps = preflight.check(cfg)  # the user's mistakes, before any process group starts
    prepare_out_dir(cfg)
    done = finished(cfg) if on_eval is None else None  # a restored sweep trial reports its result again instead
    if done is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"already finished at step {done['step']}: eval top-1 {100 * done['top1']:.2f}% (from "
                  f"{Path(cfg.run.out_dir) / 'summary.json'}); nothing was written", flush=True)
        return {**done, "already_finished": True}
    owns_group = not dist.is_initialized()  # Ray Train brings its own process group: not ours to end
    rank, world, local_rank = init_distributed(cfg.deepspeed.timeout_minutes)
    random.seed(cfg.run.seed + rank)
    np.random.seed(cfg.run.seed + rank)
    if rank == 0:
        write_config(cfg)
        environment.record(cfg.run.out_dir)  # env.json, or what differs from it on a resume
    trainer = Trainer(cfg, rank, world, local_rank, on_eval, label_maps)
    result = trainer.fit()  # on failure no barrier: a dead peer would make the error wait for a second timeout
    write_heartbeat(trainer.out, rank, trainer.step, done=True)  # peers still exporting must not mourn it
    if owns_group:
        end_group()
    return result
