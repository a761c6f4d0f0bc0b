"""distssl-predict --select N: the images worth labelling (smallest top-two margin, spread over the predicted
classes, each distinct image once), a contact sheet, and a list that, labelled, is a manifest the builder reads."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distssl.predict.select import Candidate, choose
from support.servers import launch_env

ROOT = Path(__file__).resolve().parents[1]


def C(name, margin, i=0):
    return Candidate(0, f"k{i}", "s", f"h{i}", name, margin)


def test_the_list_goes_round_robin_over_the_classes_smallest_margins_first():
    found = [C("a", 0.01, 1), C("a", 0.02, 2), C("a", 0.03, 3), C("b", 0.5, 4), C("c", 0.2, 5), C("c", 0.05, 6)]
    picked = choose(found, 5)
    assert [c.key for c in picked] == ["k1", "k6", "k4", "k2", "k5"]  # a, c, b, then each one's second
    assert [c.key for c in choose(found, 2)] == ["k1", "k6"]
    assert len(choose(found, 50)) == 6  # no more than there are


@pytest.mark.slow
@pytest.mark.parametrize("source", ["raw", "shards"])
def test_select_writes_the_list_and_the_sheet_and_the_labelled_list_builds_as_labels(tiny_data, exported, tmp_path,
                                                                                    source):
    data = str(tiny_data["raw"] / "train") if source == "raw" else tiny_data["unlabeled"]
    out = tmp_path / "pred"
    # --out relative to where the user stands: the list still names files a builder finds from anywhere
    r = subprocess.run([sys.executable, str(ROOT / "launch/predict.py"), str(exported), "--data", data, "--out",
                        "pred", "--select", "12", "--quiet"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=launch_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "12 images to label" in r.stdout and (out / "to_label.png").stat().st_size > 1000
    rows = list(csv.DictReader((out / "to_label.csv").open()))
    assert len(rows) == 12 and list(rows[0]) == ["path", "key", "pred_name", "margin", "label"]
    assert all(r["label"] == "" for r in rows) and len({r["path"] for r in rows}) == 12
    margins = [float(r["margin"]) for r in rows]
    assert all(0 <= m <= 1 for m in margins)
    for r in rows:  # the annotator fills the label in (here: the image's true class)
        r["label"] = Path(r["path"]).parent.name if source == "raw" else r["pred_name"]
        assert Path(r["path"]).exists()
    if source == "shards":
        assert all(Path(r["path"]).parent == out / "to_label" for r in rows)  # copies a builder can read
    filled = tmp_path / "annotated" / "filled.csv"  # filled in and saved elsewhere, as annotators do
    filled.parent.mkdir()
    with filled.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    b = subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), str(filled), str(tmp_path / "new"),
                        "--quiet"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert b.returncode == 0, b.stderr[-2000:]
    index = json.loads(next((tmp_path / "new").rglob("index.json")).read_text())
    assert index["count"] == 12 and sum(index["class_histogram"]) == 12


def test_a_list_whose_every_path_is_missing_is_refused_and_leaves_no_index(tmp_path, capsys):
    """Relative paths that name nothing from the manifest's folder: one line naming the first, exit 2, no set."""
    from distssl.cli import shards as shards_cli

    lst = tmp_path / "lists" / "filled.csv"
    lst.parent.mkdir()
    lst.write_text("path,label\nelsewhere/a.png,3\nelsewhere/b.png,4\n")
    assert shards_cli.main([str(lst), str(tmp_path / "new"), "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "none of its inputs could be written" in err and "elsewhere/a.png" in err and "Traceback" not in err
    assert not list((tmp_path / "new").rglob("index.json"))
