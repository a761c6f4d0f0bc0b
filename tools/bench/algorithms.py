#!/usr/bin/env python
"""The whole algorithm family on the demo data, over several seeds: the pseudo-label rules (FixMatch
+ DA, FlexMatch, FreeMatch, SoftMatch, UDA) and the consistency methods (Pi-Model, Temporal
Ensembling, Mean Teacher, VAT), against the supervised baseline of the same steps.

Every run is the demo recipe (configs/demo.yaml: 40 labels, 1,000 steps, ZeRO-2) with only
``ssl.algorithm`` and ``run.seed`` changed, launched as a user would (``deepspeed launch/train.py``),
plus the supervised baseline of the same steps. A finished run (summary.json present) is not rerun,
so the benchmark resumes where it stopped.

  python tools/bench/algorithms.py [--quick] [--seeds 0,1] [--steps 1000] [--nproc 2] [--out runs/bench-algorithms]

Prints, per algorithm: eval top-1 (mean, min-max over seeds), the unlabeled mask rate and
pseudo-label accuracy (of the masked samples) early and at the end, from metrics.jsonl, and the
step's cost relative to FixMatch's (seconds per step from the logged throughput, in the same
runs: VAT's extra forward and input backward, Pi-Model's second view with gradient, Mean Teacher's
teacher forward).
Ends with: RESULT <algorithm>_top1=... and <algorithm>_step_cost=... for each
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine, result, table
from distssl import ssl as algorithms
from distssl.config import ALGORITHM_NAMES, load_config
from distssl.testing import launch_env, train_command

ROOT = Path(__file__).resolve().parents[2]

ALGORITHMS = ALGORITHM_NAMES


def run_one(out: Path, nproc: int, seed: int, steps: int, extra: list[str]) -> dict:
    if not (out / "summary.json").exists():
        cmd = train_command([f"run.out_dir={out}", f"run.seed={seed}", f"train.steps={steps}", *extra], nproc=nproc)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=launch_env())
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    train = [d for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if d.get("kind") == "train"]
    return {"top1": summary["top1"], "train": train}


def seconds_per_step(name: str, train: list[dict]) -> float:
    """From the last logged img/s (the run's average since it started) and the images one step reads."""
    demo = load_config(str(ROOT / "configs/demo.yaml"), ["data.demo_root=null"])
    views = 0 if name == "supervised" else len(algorithms.ALGORITHMS[name].needs.views)
    images = demo.train.batch_size * (1 + views * demo.ssl.mu)
    rates = [d["img_s"] for d in train if d.get("img_s")]
    return images / rates[-1] if rates else float("nan")


def at(train: list[dict], step: int, key: str) -> float:
    """The mean of ``key`` over the logged steps up to ``step`` since the previous tenth of the run."""
    span = max(1, step // 10)
    vals = [d[key] for d in train if step - span < d["step"] <= step and d.get(key) is not None and d[key] == d[key]]
    return statistics.mean(vals) if vals else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1", help="comma-separated run.seed values (default 0,1)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (default 2)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--out", default=str(ROOT / "runs/bench-algorithms"))
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (about a minute): one seed, 60 steps, fixmatch and flexmatch, into a temp folder")
    a = p.parse_args(argv)
    if a.quick:
        import tempfile

        a.seeds, a.steps, a.algorithms = "0", 60, "fixmatch,flexmatch"
        a.out = tempfile.mkdtemp(prefix="bench-algorithms-")
    seeds = [int(s) for s in a.seeds.split(",")]
    names = a.algorithms.split(",")
    early = max(1, a.steps // 10)
    rows, res = [], {}
    runs = {name: [run_one(Path(a.out) / f"{name}-s{s}", a.nproc, s, a.steps, [f"ssl.algorithm={name}"])
                   for s in seeds] for name in names}
    runs["supervised"] = [run_one(Path(a.out) / f"supervised-s{s}", a.nproc, s, a.steps, ["ssl.lambda_u=0"])
                          for s in seeds]
    for name, rs in runs.items():
        tops = [100 * r["top1"] for r in rs]
        cells = [f"{statistics.mean(tops):.1f}", f"{min(tops):.1f}-{max(tops):.1f}"]
        for key in ("mask_rate", "pseudo_acc"):
            cells += [f"{statistics.mean(at(r['train'], early, key) for r in rs):.2f}",
                      f"{statistics.mean(at(r['train'], a.steps, key) for r in rs):.2f}"]
        cells.append(f"{statistics.mean(at(r['train'], a.steps, 'weight_mean') for r in rs):.2f}")
        cost = statistics.mean(seconds_per_step(name, r["train"]) for r in rs)
        base = (statistics.mean(seconds_per_step("fixmatch", r["train"]) for r in runs["fixmatch"])
                if "fixmatch" in runs else float("nan"))
        cells.append(f"{cost / base:.2f}")
        rows.append((name, *cells))
        res[f"{name}_top1"] = statistics.mean(tops)
        res[f"{name}_step_cost"] = cost / base
    print(f"# {machine()}; demo recipe, {a.steps} steps, {a.nproc} ranks, seeds {seeds}")
    table(rows, ("algorithm", "top-1 %", "range", f"mask@{early}", "mask@end", f"pl-acc@{early}", "pl-acc@end",
                 "weight@end", "step cost"))
    result(**res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
