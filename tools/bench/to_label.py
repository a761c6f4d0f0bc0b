#!/usr/bin/env python
"""What N labels chosen by ``distssl-predict --select N`` add to a demo run, against N labels drawn at random.

Per seed: the demo recipe (4 labels a class, FixMatch + DA) for --steps steps is the base run; its model
predicts the demo's unlabeled shards with ``--select N``, and an oracle fills the list's labels with the true
classes (the shards keep them); N images drawn at random from the same unlabeled set get their true labels
too. Each list is built into a labeled shard set by ``distssl-shards`` (the path a user takes) and trained on
beside the 40 human labels (``data.labeled=[demo, new]``, ``data.class_match=by_name``), from scratch, with the
base run's recipe, steps and seed. Finished runs are not rerun.

  python tools/bench/to_label.py [--n 20] [--seeds 0,1,2] [--steps 300] [--out runs/bench-select]

Prints each seed's top-1 for the base, + N selected and + N random, and the means. Ends with RESULT lines.
"""
import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine, result, table
from distssl.predict.parts import make_parts
from distssl.predict.select import CSV_NAME, candidates, images_of, location
from support.servers import launch_env, train_command

ROOT = Path(__file__).resolve().parents[2]
UNLABELED = ROOT / "data/mnist5k/shards/train/unlabeled"
LABELED = ROOT / "data/mnist5k/shards/train/labeled"


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=launch_env())
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr[-3000:]}")


def train(out: Path, seed: int, steps: int, labeled: list[str]) -> float:
    if not (out / "summary.json").exists():
        keys = [f"run.out_dir={out}", f"run.seed={seed}", f"train.steps={steps}", f"train.eval_every={steps}"]
        if len(labeled) > 1:
            keys += [f"data.labeled=[{','.join(labeled)}]", "data.class_match=by_name", "data.demo_root=null"]
        run(train_command(keys))
    return 100 * json.loads((out / "summary.json").read_text())["top1"]


def true_labels(pred: Path) -> dict[tuple[str, str], str]:
    """(key, source) -> the true class name, from the predictions' parts (the unlabeled shards keep it)."""
    import pyarrow.parquet as pq

    names = [str(i) for i in range(10)]
    out = {}
    for f in sorted((pred / "parts").glob("*.parquet")):
        for r in pq.read_table(f, columns=["key", "source", "true_label"]).to_pylist():
            out[(r["key"], r["source"])] = names[r["true_label"]]
    return out


def labeled_list(rows: list[dict], truth: dict, dst: Path) -> str:
    """The list with its labels filled in by the oracle, built into a shard set; the set's path."""
    for r in rows:
        r["label"] = truth[(r["key"], r["source"])]
    filled = dst.with_suffix(".csv")
    with filled.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "key", "pred_name", "margin", "label"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if not (dst / "index.json").exists():
        run([sys.executable, str(ROOT / "tools/make_shards.py"), str(filled), str(dst), "--quiet"])
    return str(dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=str(ROOT / "runs/bench-select"))
    a = p.parse_args(argv)
    out, rows, tops = Path(a.out), [], {"base": [], "selected": [], "random": []}
    for seed in (int(s) for s in a.seeds.split(",")):
        base = out / f"base-s{seed}"
        tops["base"].append(train(base, seed, a.steps, [str(LABELED)]))
        pred = out / f"pred-s{seed}"
        if not (pred / CSV_NAME).exists():
            run([sys.executable, str(ROOT / "launch/predict.py"), str(base), "--data", str(UNLABELED), "--out",
                 str(pred), "--select", str(a.n), "--quiet"])
        truth = true_labels(pred)
        chosen = list(csv.DictReader((pred / CSV_NAME).open()))
        by_key = {r["key"]: r for r in chosen}
        parts = make_parts(str(UNLABELED))
        found = candidates(str(pred), parts)
        selected = [{**by_key[c.key], "source": c.source} for c in found if c.key in by_key]
        drawn = random.Random(seed).sample(found, a.n)  # the same unlabeled set, N at random
        data = images_of(parts, drawn)
        by_number = {q.number: q for q in parts}
        copies = str(out / f"random-s{seed}")
        randoms = [{"path": location(by_number[c.part], c, data[(c.part, c.key, c.source)], copies), "key": c.key,
                    "source": c.source, "pred_name": c.pred_name, "margin": c.margin} for c in drawn]
        for name, picked in (("selected", selected), ("random", randoms)):
            new = labeled_list(picked, truth, out / f"{name}-labels-s{seed}")
            tops[name].append(train(out / f"{name}-s{seed}", seed, a.steps, [str(LABELED), new]))
        rows.append((f"seed {seed}", *(f"{tops[k][-1]:.1f}" for k in tops),
                     f"{sum(r['label'] != r['pred_name'] for r in selected)} of {len(selected)}"))
    rows.append(("mean", *(f"{statistics.mean(v):.1f}" for v in tops.values()), ""))
    print(f"# {machine()}; the demo recipe, {a.steps} steps, 1 process, 40 labels + {a.n}")
    table(rows, ("", "40 labels", f"+ {a.n} selected", f"+ {a.n} random", "selected the model got wrong"))
    result(**{f"{k}_top1": statistics.mean(v) for k, v in tops.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
