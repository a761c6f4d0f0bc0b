"""Summaries, verification and a picture of a shard set (used by distssl-inspect)."""
from __future__ import annotations

from distssl.data.index import IMAGE_KEYS
from distssl.data.streams import tar_samples
from distssl.data.transforms import decode
from distssl.storage import store
from distssl.tracking.progress import bar as progress_bar


def summarize(index: dict) -> dict:
    names = index.get("class_names") or []
    hist = index.get("class_histogram") or []
    reasons: dict[str, int] = {}
    for f in index.get("failures", []):
        k = f["reason"].split(":", 1)[0]
        reasons[k] = reasons.get(k, 0) + 1
    return {"count": index["count"], "shards": len(index["shards"]), "bytes": sum(s["bytes"] for s in index["shards"]),
            "labeled": index.get("labeled"), "class_histogram": dict(zip(names, hist)) if hist else {},
            "num_failures": index.get("num_failures", 0), "failure_reasons": reasons}


def verify(url: str, index: dict) -> dict:
    decoded, bad, counts_match = 0, 0, True
    shown = progress_bar(total=len(index["shards"]), desc="verify", unit="shard")
    for shard in index["shards"]:
        n = 0
        for raw in tar_samples(store.join(url, shard["name"])):
            n += 1
            data = next((raw.fields[k] for k in IMAGE_KEYS if k in raw.fields), None)
            try:
                decode(data, 8)
                decoded += 1
            except Exception:
                bad += 1
        counts_match &= n == shard["count"]
        shown.update(1)
    shown.close()
    return {"decoded": decoded, "bad": bad, "counts_match": bool(counts_match)}


def draw_grid(url: str, index: dict, out_png: str, count: int) -> int:
    import json
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = index.get("class_names") or []
    images = []
    for shard in index["shards"]:
        for raw in tar_samples(store.join(url, shard["name"])):
            data = next((raw.fields[k] for k in IMAGE_KEYS if k in raw.fields), None)
            label = raw.fields.get("cls")
            label = int(label) if label is not None else json.loads(raw.fields.get("json", b"{}")).get("label")
            try:
                images.append((decode(data, 64), label))
            except Exception:
                continue
            if len(images) >= count:
                break
        if len(images) >= count:
            break
    side = max(1, math.ceil(math.sqrt(len(images))))
    fig, axes = plt.subplots(side, side, figsize=(side * 1.2, side * 1.3))
    for ax in getattr(axes, "flat", [axes]):
        ax.axis("off")
    for ax, (img, label) in zip(getattr(axes, "flat", [axes]), images):
        ax.imshow(img)
        if label is not None:
            ax.set_title(names[label] if label < len(names) else str(label), fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return len(images)
