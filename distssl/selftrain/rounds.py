"""Self-training rounds (Noisy Student, Xie et al. 2020), the loop distssl-selftrain runs.

Layout under the configured ``run.out_dir`` (ROOT), every round a run folder of its own:

  ROOT/round-0/                              the configured run (the first teacher)
  ROOT/round-K/teacher_predictions[/T]/      each teacher's calibrated predictions for data.unlabeled
  ROOT/round-K/pseudo_labeled/               the class-balanced pseudo-labeled set (index.json last)
  ROOT/round-K/                              round K's student, a run folder
  ROOT/selftrain.json                        every finished round (top-1, teachers, pseudo-labels), the best round
  ROOT/model.safetensors + model.json        the best round's export: the command's model

A student below its teacher is said in a warning line; the command's model is the best round's, so it never
ends on a model worse than round 0's. Every step is resumable on its own (a run resumes from its checkpoints,
a prediction writes only its missing parts, a pseudo-labeled shard only when its stats are missing), so a
rerun continues the round in progress and passes over the finished ones without rewriting them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from distssl.config import Config, check_paths, load_config
from distssl.data.index import resolve
from distssl.distributed.collectives import barrier, end_group
from distssl.distributed.peers import init_distributed, use_cuda
from distssl.errors import UserError
from distssl.models.export import META_NAME, WEIGHTS_NAME
from distssl.predict.job import PredictJob, run_job
from distssl.predict.parts import make_parts
from distssl.predict.pseudo import write_pseudo_index
from distssl.selftrain import pseudo_set
from distssl.selftrain.plan import PREDICTIONS, PSEUDO, round_config, round_dir, teachers_of
from distssl.shards import demo
from distssl.storage import atomic
from distssl.storage.store import redact

log = logging.getLogger(__name__)
RECORD = "selftrain.json"
TOPK = 20  # classes a teacher's prediction keeps (its soft target and the ensemble's mean are made of them)


def read_record(root: str) -> list[dict]:
    try:
        return json.loads((Path(root) / RECORD).read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def best_round(rounds: list[dict]) -> Optional[dict]:
    """The round whose final eval top-1 is highest (the earliest of equals)."""
    done = [r for r in rounds if r.get("top1") is not None]
    return max(done, key=lambda r: (r["top1"], -r["round"])) if done else None


def write_record(root: str, rounds: list[dict]) -> bool:
    """ROOT/selftrain.json (atomically), only when it changes: a rerun of finished rounds rewrites nothing."""
    best = best_round(rounds)
    text = json.dumps({"rounds": rounds, "best_round": best["round"] if best else None,
                       "best_top1": best["top1"] if best else None,
                       "model": str(Path(root) / WEIGHTS_NAME) if best else None}, indent=1)
    path = Path(root) / RECORD
    if path.exists() and path.read_text() == text:
        return False
    atomic.write_text(path, text)
    return True


def export_best(root: str, rounds: list[dict]) -> Optional[dict]:
    """ROOT/model.safetensors + model.json: the best round's export, byte for byte (its fingerprint names the
    round it was trained in); rewritten only when the best round changes."""
    best = best_round(rounds)
    if best is None:
        return None
    src, dst = Path(best["out_dir"]), Path(root)
    for name in (WEIGHTS_NAME, META_NAME):
        if not (dst / name).exists() or (dst / name).read_bytes() != (src / name).read_bytes():
            with atomic.atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)
    return best


def below_teacher(rounds: list[dict], k: int) -> Optional[str]:
    """The warning for a student whose final top-1 is under the round before's, or None."""
    student = next((r for r in rounds if r["round"] == k), None)
    teacher = next((r for r in rounds if r["round"] == k - 1), None)
    if student is None or teacher is None or student["top1"] >= teacher["top1"]:
        return None
    return (f"round {k}: the student ({100 * student['top1']:.2f}%) is below its teacher, round {k - 1} "
            f"({100 * teacher['top1']:.2f}%): the best round stays the command's model")


def round_entry(cfg: Config, k: int, result: dict, pseudo: Optional[dict], teachers: list[str]) -> dict:
    """What selftrain.json keeps of a finished round (its summary.json's top-1s where the result lacks them)."""
    try:
        summary = json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    entry = {"round": k, "out_dir": cfg.run.out_dir, "model": cfg.model.name,
             "top1": result.get("top1", summary.get("top1")),
             "best_top1": result.get("best_top1", summary.get("best_top1")),
             "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "ssl_loss": cfg.ssl.lambda_u > 0}
    if pseudo is not None:
        labels = pseudo.get("pseudo_labels", {})
        entry.update(teachers=teachers, teacher=teachers[0], targets=labels.get("targets"),
                     min_confidence=labels.get("min_confidence"), per_class=labels.get("per_class"),
                     pseudo_labeled=pseudo.get("count"), distinct=labels.get("distinct"),
                     predicted=labels.get("predicted"))
    return entry


def pseudo_labels(base: Config, k: int, root: str, rank: int, world: int, device, batch_size: int,
                  say: Callable[[str], None]) -> dict:
    """Collective: round ``k``'s teachers predict data.unlabeled, and their class-balanced pseudo-labels become
    ROOT/round-K/pseudo_labeled; returns its index (the same on every rank)."""
    out = round_dir(root, k)
    teachers = teachers_of(base, k, root)
    dirs = []
    for i, teacher in enumerate(teachers):
        pred_dir = os.path.join(out, PREDICTIONS, *([f"teacher-{i}"] if len(teachers) > 1 else []))
        job = PredictJob(teacher, base.data.unlabeled, pred_dir, batch_size=batch_size,
                         topk=min(TOPK, base.model.num_classes), progress=rank == 0)
        summary = run_job(job, rank, world, device)
        if rank == 0:
            cal = summary.get("calibration") or {}
            said = f"temperature {cal['temperature']:.4g}" if cal.get("temperature") else "not calibrated"
            say(f"round {k}: teacher {teacher} predicted {summary['predicted']} images ({said})")
        dirs.append(pred_dir)
    st, dst = base.selftrain, os.path.join(out, PSEUDO)
    parts = make_parts(base.data.unlabeled)
    copies, chosen = pseudo_set.selection(dirs, parts, base.model.num_classes, st.min_confidence, st.per_class,
                                          seed=base.run.seed * 1000 + k)
    pseudo_set.write_set(dirs, dst, parts, base.model.num_classes, copies, st.targets == "soft",
                         ", ".join(teachers), rank, world)
    barrier()  # every rank's shards are written before the index
    index_url = os.path.join(dst, "index.json")
    if rank == 0 and not os.path.exists(index_url):
        write_pseudo_index(dst, parts, resolve(base.data.labeled).class_names,
                           {"teacher": ", ".join(teachers), "teachers": teachers,
                            "data": redact(str(base.data.unlabeled)), "min_confidence": st.min_confidence,
                            "targets": st.targets, **chosen})
    barrier()  # the index is written before anyone trains on it
    index = json.loads(Path(index_url).read_text())
    if rank == 0:
        info = index["pseudo_labels"]
        say(f"round {k}: {info['confident']} of {info['predicted']} predictions at confidence >= {st.min_confidence}, "
            f"balanced to {info['per_class'] or 'no'} a class: {index['count']} pseudo-labels "
            f"({info['distinct']} distinct images, {st.targets} targets)")
    return index


def run_rounds(base: Config, rank: int, world: int, device, train: Callable[[Config], tuple[int, dict]],
               batch_size: int = 256, say: Callable[[str], None] = print) -> int:
    """Collective: every round of ``base`` (round 0 its own run), resumable; ``train`` runs one round's config
    and returns (exit code, final eval). Returns an exit code."""
    root, rounds = base.run.out_dir, base.selftrain.rounds
    record = read_record(root)
    for k in range(rounds):
        pseudo, teachers, labeled_count = None, [], None
        if k > 0:
            teachers = teachers_of(base, k, root)
            pseudo = pseudo_labels(base, k, root, rank, world, device, batch_size, say)
            labeled_count = pseudo["count"] + resolve(base.data.labeled).total
        cfg = round_config(base, k, root, labeled_count)
        if rank == 0:
            length = f": {cfg.train.steps} steps of {cfg.train.batch_size} ({base.selftrain.epochs:g} epochs of " \
                     f"{labeled_count} labeled images)" if k else ""
            say(f"round {k}: training {cfg.model.name} in {cfg.run.out_dir}{length}")
        code, result = train(cfg)
        if code:
            return code
        barrier()  # the round's model is exported before anyone predicts with it
        if rank == 0:
            entry = round_entry(cfg, k, result, pseudo, teachers)
            record = [r for r in record if r["round"] != k] + [entry]
            record.sort(key=lambda r: r["round"])
            say(f"round {k}: eval top-1 {100 * entry['top1']:.2f}%")
            worse = below_teacher(record, k)
            if worse:
                log.warning(worse)
            write_record(root, record)
            export_best(root, [r for r in record if r["round"] < rounds])
    if rank == 0:
        done = [r for r in record if r["round"] < rounds]
        best = best_round(done)
        say("self-training: " + "; ".join(f"round {r['round']} {100 * r['top1']:.2f}%" for r in done)
            + (f"; best round {best['round']} ({100 * best['top1']:.2f}%), exported to {root}/{WEIGHTS_NAME}"
               if best else "") + f" ({root}/{RECORD})")
    return 0


def run_command(config: Optional[str], overrides: list[str], batch_size: int,
                train: Callable[[Config], tuple[int, dict]]) -> int:
    """distssl-selftrain: the config checked (and the demo's data built) before any process group, one group for
    every round, the rounds, and the group ended on success. A user's mistake is raised (the command says it);
    a missing or unreadable input of a round is its line and exit 2."""
    base = load_config(config, overrides)
    demo.prepare(base.data, progress=os.environ.get("RANK", "0") == "0")
    check_paths(base)
    rank, world, local_rank = init_distributed(base.deepspeed.timeout_minutes)
    device = torch.device(f"cuda:{local_rank}") if use_cuda() else torch.device("cpu")
    try:
        code = run_rounds(base, rank, world, device, train, batch_size, say=lambda line: print(line, flush=True))
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        if rank == 0:
            print(f"distssl-selftrain: error: {e}", file=sys.stderr)
        return 2
    if code == 0:
        end_group()
    return code
