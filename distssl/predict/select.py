"""The next images worth labelling (``distssl-predict --select N``): the ones the model is least sure between two
classes, spread over the classes it predicts, each distinct image once.

Uncertainty is the margin between the top two calibrated probabilities (margin sampling, Scheffer et al. 2001):
a small margin is a decision the model could flip, where a human label teaches it most. Taking the N smallest
margins alone would spend them on one confusable pair of classes, so the list is drawn round-robin over the
predicted classes, each class's smallest margins first. Exact duplicates (the same sha256) count once.

``OUT/to_label.csv`` lists them with the columns ``path`` (the image's location as the shard builder's manifests
name it: the original file or URL for raw inputs; for images read from shards, a copy under
``OUT/to_label/``), ``key``, ``pred_name``, ``margin`` and an empty ``label``. Filled in, the same file is a
manifest that ``distssl-shards`` reads, so the new labels join the labeled set (``--extend``).
``OUT/to_label.png`` is a contact sheet of the N images with the model's guess.
"""
from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from dataclasses import dataclass

from distssl.predict.parts import Part, part_samples
from distssl.predict.pseudo import _image_ext
from distssl.predict.rank_parts import read_part
from distssl.storage import store

CSV_NAME, SHEET_NAME, COPIES = "to_label.csv", "to_label.png", "to_label"
COLUMNS = ("path", "key", "pred_name", "margin", "label")


@dataclass
class Candidate:
    part: int
    key: str
    source: str
    sha256: str
    pred_name: str
    margin: float


def candidates(out: str, parts: list[Part]) -> list[Candidate]:
    """Every predicted image with its top-two margin, duplicates (by sha256) after their first dropped, and the
    images the outlier head names unknown left out (no class of the label set to give them)."""
    seen, found = set(), []
    for part in parts:
        rows = read_part(out, part, ["key", "source", "sha256", "pred_name", "topk_probs", "unknown"])
        for r in rows:
            if r["sha256"] in seen or r["unknown"]:
                continue
            seen.add(r["sha256"])
            probs = r["topk_probs"]
            margin = probs[0] - probs[1] if len(probs) > 1 else 1.0
            found.append(Candidate(part.number, r["key"], r["source"], r["sha256"], r["pred_name"], float(margin)))
    return found


def choose(found: list[Candidate], n: int) -> list[Candidate]:
    """``n`` candidates round-robin over the predicted classes (the class whose smallest margin is smallest
    first), each class's smallest margins first; ties in input order."""
    by_class: dict[str, list[Candidate]] = defaultdict(list)
    for c in sorted(found, key=lambda c: c.margin):
        by_class[c.pred_name].append(c)
    queues = sorted(by_class.values(), key=lambda q: q[0].margin)
    chosen, depth = [], 0
    while len(chosen) < n and any(depth < len(q) for q in queues):
        chosen += [q[depth] for q in queues if depth < len(q)][: n - len(chosen)]
        depth += 1
    return chosen


def images_of(parts: list[Part], chosen: list[Candidate]) -> dict[tuple[int, str, str], bytes]:
    """The chosen images' bytes, read once from their parts' inputs."""
    wanted = {(c.part, c.key, c.source) for c in chosen}
    got = {}
    for part in parts:
        if not any(w[0] == part.number for w in wanted):
            continue
        for s in part_samples(part):
            if (part.number, s.key, s.source) in wanted and s.data is not None:
                got[(part.number, s.key, s.source)] = s.data
    return got


def location(part: Part, c: Candidate, data: bytes, out: str) -> str:
    """Where the builder can read the image: a raw input's own URL, else a copy in OUT/to_label/."""
    for url, rel, _label in part.inputs:
        if rel == c.source:
            return absolute(url)
    name = f"{c.source.rsplit('/', 1)[-1].removesuffix('.tar')}-{c.key}.{_image_ext(data)}".replace("/", "_")
    copy = store.join(out, COPIES, name)
    store.write_bytes(copy, data)
    return absolute(copy)


def absolute(url: str) -> str:
    """A local path made absolute: the builder reads a manifest's relative paths from the manifest's own folder,
    so a path relative to where the command ran would name another file once the list is copied or filled."""
    return url if "://" in url else os.path.abspath(url)


def write_selection(out: str, parts: list[Part], n: int) -> list[dict]:
    """OUT/to_label.csv and OUT/to_label.png for the ``n`` images worth labelling; returns the csv's rows."""
    chosen = choose(candidates(out, parts), n)
    data = images_of(parts, chosen)
    by_number = {p.number: p for p in parts}
    rows = []
    for c in chosen:
        image = data.get((c.part, c.key, c.source))
        if image is None:  # unreadable since it was predicted: not offered to an annotator
            continue
        rows.append({"path": location(by_number[c.part], c, image, out), "key": c.key, "pred_name": c.pred_name,
                     "margin": round(c.margin, 6), "label": "", "_image": image})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    store.write_bytes(store.join(out, CSV_NAME), buf.getvalue().encode())
    contact_sheet(rows, store.join(out, SHEET_NAME))
    return [{k: r[k] for k in COLUMNS} for r in rows]


def contact_sheet(rows: list[dict], url: str, per_row: int = 8) -> None:
    """The images in a grid, each titled with the model's guess and its margin."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = max(1, len(rows))
    cols = min(per_row, n)
    lines = -(-n // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(1.6 * cols, 1.9 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        ax.imshow(Image.open(io.BytesIO(r["_image"])).convert("RGB"))
        ax.set_title(f"{r['pred_name']}? m {r['margin']:.2f}", fontsize=7)
    fig.suptitle("to label: the model's guess and its top-two margin", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    store.write_bytes(url, buf.getvalue())
