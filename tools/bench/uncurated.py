#!/usr/bin/env python
"""Buckets as they are: open-set and long-tailed splits of any class-folder set, and what each method does on them.

From SOURCE/train/<class>/ and SOURCE/eval/<class>/ (``demo``: the demo's 5,000 MNIST digits; ``digits8``:
scikit-learn's 8x8 digits; or a folder of yours) it builds, once:

- ``longtail``: class k (in sorted order) keeps n_k = round(N_k x (1/ratio)^(k/(K-1))) train images,
  --label-fraction of each labelled; the unlabeled set's class mix is ``consistent`` (the rest of each class: the
  same tail), ``reversed`` (class k gets class K-1-k's count) or ``uniform`` (the same total, evenly), each
  capped by the images a class has; eval is SOURCE/eval as it is. Reported: top-1, balanced top-1 and the
  tail's recall (the third of the classes with the fewest labels).
- ``openset``: the first --known classes are the label set (--labels-per-class each); the unlabeled set is every
  train image of every class, so the rest lie outside the label set; eval is the known classes'. Also the clean
  bucket (unlabeled from the known classes only) for FixMatch. Reported: top-1 on the known classes, and the
  outlier AUROC of ``distssl-predict``'s outlier_score (known eval images against the unknown classes' eval
  images) where the model has an outlier head.

Each method is the demo recipe (FixMatch + DA, 400 steps, 1 process) with its keys; finished runs are not rerun.

  python tools/bench/uncurated.py [--source demo] [--setting longtail,openset] [--ratio 50] [--mix consistent]
                                  [--known 6] [--seeds 0,1,2] [--steps 400] [--out runs/bench-uncurated]

Ends with RESULT lines.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import digits8, machine, result, table
from support.servers import launch_env

ROOT = Path(__file__).resolve().parents[2]

LONGTAIL = {"supervised": ["ssl.lambda_u=0"], "fixmatch+da": [], "fixmatch": ["ssl.dist_align=false"],
            "fixmatch+acr": ["ssl.imbalance=acr"], "fixmatch+abc": ["ssl.imbalance=abc"],
            "fixmatch+da(estimated)": ["ssl.dist_align_target=estimated"]}
OPENSET = {"supervised": ["ssl.lambda_u=0"], "fixmatch+da": [], "fixmatch+da+iomatch": ["ssl.open_set=iomatch"]}


def source_folder(name: str, out: Path) -> Path:
    if name == "demo":
        from distssl.shards.demo import ensure_demo_data

        return Path(ensure_demo_data(ROOT / "data/mnist5k")["raw"])
    if name == "digits8":
        digits8(out / "data-digits8")
        return out / "data-digits8/raw"
    return Path(name)


def classes_of(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir())


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def link(files: list[Path], dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = dst / f.name
        if not target.exists():
            os.link(f, target)


def shards(src: Path, dst: Path, *flags: str) -> str:
    if not (dst / "index.json").exists() and not (dst / "labeled/index.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), str(src), str(dst), "--min-shards", "4",
                        "--quiet", *flags], check=True, cwd=ROOT, env=launch_env())
    return str(dst)


def longtail_split(src: Path, out: Path, ratio: float, mix: str, label_fraction: float) -> list[str]:
    """data keys of the long-tailed split: labelled and unlabeled from separate images of each class."""
    classes = classes_of(src / "train")
    k = len(classes)
    files = [images(src / "train" / c) for c in classes]
    sizes = [max(2, round(len(f) * (1 / ratio) ** (i / max(1, k - 1)))) for i, f in enumerate(files)]
    labelled = [max(1, round(n * label_fraction)) for n in sizes]
    consistent = [n - m for n, m in zip(sizes, labelled)]
    wanted = {"consistent": consistent, "reversed": consistent[::-1],
              "uniform": [round(sum(consistent) / k)] * k}[mix]
    for i, c in enumerate(classes):
        link(files[i][:labelled[i]], out / "raw/labeled" / c)
        link(files[i][labelled[i]:labelled[i] + wanted[i]], out / "raw/unlabeled" / c)  # capped by what it has
    lab = shards(out / "raw/labeled", out / "shards/labeled")
    unl = shards(out / "raw/unlabeled", out / "shards/unlabeled", "--unlabeled")
    ev = shards(src / "eval", out / "shards/eval")
    return [f"data.labeled={lab}", f"data.unlabeled={unl}", f"data.eval={ev}", "data.demo_root=null"]


def openset_split(src: Path, out: Path, known: int, per_class: int) -> tuple[list[str], str, Path, Path]:
    """(data keys of the open bucket, the clean bucket's unlabeled set, known eval images, unknown eval images)."""
    classes = classes_of(src / "train")
    for c in classes[:known]:
        link(images(src / "train" / c), out / "raw/known/train" / c)
        link(images(src / "eval" / c), out / "raw/known/eval" / c)
    for c in classes[known:]:
        link(images(src / "eval" / c), out / "raw/unknown" / c)
    known_sets = shards(out / "raw/known/train", out / "shards/known", "--labels-per-class", str(per_class))
    ev = shards(out / "raw/known/eval", out / "shards/eval")
    bucket = shards(src / "train", out / "shards/open", "--unlabeled")
    keys = [f"model.num_classes={known}", f"data.labeled={known_sets}/labeled", f"data.eval={ev}",
            "data.demo_root=null", f"data.unlabeled={bucket}"]
    return keys, f"data.unlabeled={known_sets}/unlabeled", out / "raw/known/eval", out / "raw/unknown"


def train(out: Path, seed: int, steps: int, keys: list[str]) -> dict:
    if not (out / "summary.json").exists():
        cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/demo.yaml"),
               f"run.out_dir={out}", f"run.seed={seed}", f"train.steps={steps}", f"train.eval_every={steps}", *keys]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=launch_env())
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def outlier_auroc(run: Path, known: Path, unknown: Path) -> float:
    """AUROC of outlier_score, unknown images against known ones (NaN when the model has no outlier head)."""
    import pyarrow.parquet as pq

    scores = {}
    for name, folder in (("known", known), ("unknown", unknown)):
        dst = run / f"predict-{name}"
        if not (dst / "summary.json").exists():
            subprocess.run([sys.executable, str(ROOT / "launch/predict.py"), str(run), "--data", str(folder),
                            "--out", str(dst)], check=True, capture_output=True, cwd=ROOT, env=launch_env())
        files = sorted(glob.glob(f"{dst}/**/*.parquet", recursive=True))
        col = pq.ParquetDataset(files).read().column("outlier_score").to_pylist()
        if any(v is None for v in col):
            return float("nan")
        scores[name] = col
    k, u = scores["known"], scores["unknown"]
    wins = sum((a > b) + 0.5 * (a == b) for a in u for b in k)
    return wins / (len(u) * len(k))


def mean_range(values: list[float]) -> tuple[str, str]:
    good = [v for v in values if v == v]
    if not good:
        return "-", ""
    return f"{statistics.mean(good):.1f}", f"{min(good):.1f}-{max(good):.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="demo", help="demo, digits8, or a folder with train/<class>/ and eval/<class>/")
    p.add_argument("--setting", default="longtail,openset")
    p.add_argument("--ratio", type=float, default=50.0, help="long tail: head / tail class size")
    p.add_argument("--mix", default="consistent", choices=("consistent", "uniform", "reversed"),
                   help="long tail: the unlabeled set's class mix")
    p.add_argument("--label-fraction", type=float, default=0.1, help="long tail: share of each class labelled")
    p.add_argument("--known", type=int, default=6, help="open set: the first KNOWN classes are the label set")
    p.add_argument("--labels-per-class", type=int, default=4, help="open set: labels a known class")
    p.add_argument("--methods", default="", help="a comma list of the settings' methods (default: all)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default=str(ROOT / "runs/bench-uncurated"))
    a = p.parse_args(argv)
    out, seeds, res = Path(a.out), [int(s) for s in a.seeds.split(",")], {}
    src = source_folder(a.source, out)
    tag = Path(a.source).name
    wanted = set(a.methods.split(",")) if a.methods else None
    if "longtail" in a.setting:
        where = out / f"{tag}-longtail-{a.ratio:g}-{a.mix}"
        keys = longtail_split(src, where / "data", a.ratio, a.mix, a.label_fraction)
        rows = []
        for method, extra in LONGTAIL.items():
            if wanted and method not in wanted:
                continue
            runs = [train(where / f"{method}-s{s}", s, a.steps, keys + extra) for s in seeds]
            top, bal, tail = ([100 * r.get(k, float("nan")) for r in runs]
                              for k in ("top1", "balanced_top1", "tail_recall"))
            rows.append((method, *mean_range(top), *mean_range(bal), mean_range(tail)[0]))
            res[f"longtail_{method}_balanced_top1"] = statistics.mean(bal)
        print(f"# {machine()}; {tag} long tail 1/{a.ratio:g}, unlabeled {a.mix}, {a.steps} steps, seeds {seeds}")
        table(rows, ("method", "top-1 %", "range", "balanced top-1 %", "range", "tail recall %"))
    if "openset" in a.setting:
        where = out / f"{tag}-openset-{a.known}"
        keys, clean, known_eval, unknown_eval = openset_split(src, where / "data", a.known, a.labels_per_class)
        rows = []
        methods = {"fixmatch+da (clean bucket)": [clean], **OPENSET}
        for method, extra in methods.items():
            if wanted and method not in wanted:
                continue
            outs = [where / f"{method.replace(' ', '_').replace('(', '').replace(')', '')}-s{s}" for s in seeds]
            runs = [train(o, s, a.steps, keys + extra) for o, s in zip(outs, seeds)]
            top = [100 * r["top1"] for r in runs]
            auroc = [outlier_auroc(o, known_eval, unknown_eval) if "iomatch" in method else float("nan")
                     for o in outs]
            rows.append((method, *mean_range(top), f"{statistics.mean(auroc):.3f}" if auroc[0] == auroc[0] else "-"))
            res[f"openset_{method.split(' ')[0]}_top1"] = statistics.mean(top)
        print(f"# {machine()}; {tag} open set, {a.known} known classes, {a.steps} steps, seeds {seeds}")
        table(rows, ("method", "top-1 % (known)", "range", "outlier AUROC"))
    result(**res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
