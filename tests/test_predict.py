"""distssl-predict: every image of a data spec predicted exactly once, on any number of ranks, into
Parquet parts written atomically; a rerun of a finished prediction rewrites nothing, a killed one
predicts only what is missing; raw folders are read directly."""
import hashlib
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT
from distssl.data.index import resolve
from distssl.data.streams import tar_samples
from distssl.predict.model import load_predictor
from distssl.predict.parts import make_parts
from distssl.predict.rank_parts import COLUMNS, predict_parts, summarise
from support.servers import launch_env, ranks_command

CPU = torch.device("cpu")


def _rows(out) -> list[dict]:
    return [r for f in sorted((out / "parts").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_a_shard_set_is_predicted_once_per_image_with_the_columns_and_a_summary(tiny_data, exported, tmp_path):
    predictor = load_predictor(str(exported), CPU)
    parts = make_parts(tiny_data["eval"])
    shards = resolve(tiny_data["eval"])
    assert len(parts) == len(shards.urls)
    out = tmp_path / "pred"
    results = predict_parts(predictor, parts, str(out), 0, 1, batch_size=16, topk=3, device=CPU, progress=False)
    rows = _rows(out)
    keys = [(raw.key, url) for url in shards.urls for raw in tar_samples(url)]
    assert sorted((r["key"], r["source"]) for r in rows) == sorted(keys) and len(rows) == 97
    assert set(rows[0]) == set(COLUMNS)
    first = rows[0]
    assert len(first["topk_ids"]) == 3 and first["topk_ids"][0] == first["pred"]
    assert first["topk_probs"] == sorted(first["topk_probs"], reverse=True)
    assert first["confidence"] == pytest.approx(first["topk_probs"][0]) and first["pred_name"] == str(first["pred"])
    assert all(r["true_label"] is not None and len(r["sha256"]) == 64 for r in rows)  # the eval set's cls
    # the same image through the model by hand gives the same probabilities
    raw = next(tar_samples(shards.urls[0]))
    mine = next(r for r in rows if r["key"] == raw.key and r["source"] == shards.urls[0])
    x = predictor.views.eval(predictor.views.eval_image(raw.fields["png"]))[None].float() / 255
    x = (x - 0.5) / 0.25
    with torch.no_grad():
        p = predictor.model(x).softmax(1)[0]
    assert mine["confidence"] == pytest.approx(float(p.max()), rel=1e-4) and mine["pred"] == int(p.argmax())

    summary = summarise(str(out), parts, predictor.class_names, 1.0, sum(r.rows for r in results), "eval", "m")
    assert summary["predicted"] == 97 and sum(summary["class_histogram"].values()) == 97
    agree = sum(r["pred"] == r["true_label"] for r in rows) / 97
    assert summary["agreement"] == pytest.approx(agree) and summary["with_true_label"] == 97

    # a rerun of the finished prediction rewrites nothing; a lost part is the only one predicted again
    mtimes = {f.name: f.stat().st_mtime_ns for f in (out / "parts").iterdir()}
    again = predict_parts(predictor, parts, str(out), 0, 1, 16, 3, CPU, progress=False)
    assert not any(r.written for r in again)
    assert {f.name: f.stat().st_mtime_ns for f in (out / "parts").iterdir()} == mtimes
    (out / "parts" / "part-000001.parquet").unlink()
    again = predict_parts(predictor, parts, str(out), 0, 1, 16, 3, CPU, progress=False)
    assert [r.name for r in again if r.written] == ["part-000001"] and len(_rows(out)) == 97


def test_ranks_split_the_parts_and_together_predict_each_image_once(tiny_data, exported, tmp_path):
    predictor = load_predictor(str(exported), CPU)
    parts = make_parts(tiny_data["unlabeled"])
    for rank in range(3):
        predict_parts(predictor, parts, str(tmp_path / "three"), rank, 3, 32, 2, CPU, progress=False)
    predict_parts(predictor, parts, str(tmp_path / "one"), 0, 1, 32, 2, CPU, progress=False)
    three, one = _rows(tmp_path / "three"), _rows(tmp_path / "one")
    assert len(three) == 600 and len({(r["key"], r["source"]) for r in three}) == 600
    assert sorted(three, key=lambda r: (r["source"], r["key"])) == sorted(one, key=lambda r: (r["source"], r["key"]))
    # decoded by 2 loader processes (parts interleaved as they come): the same rows, part for part
    results = predict_parts(predictor, parts, str(tmp_path / "workers"), 0, 1, 32, 2, CPU, progress=False, workers=2)
    assert sorted(r.name for r in results) == sorted(p.name for p in parts)
    for f in sorted((tmp_path / "one" / "parts").glob("*.parquet")):
        mine = pq.read_table(tmp_path / "workers" / "parts" / f.name).to_pylist()
        assert mine == pq.read_table(f).to_pylist()


def test_a_raw_folder_is_read_directly_with_its_class_folders_as_true_labels(tiny_data, exported, tmp_path):
    raw = tiny_data["raw"] / "eval"
    predictor = load_predictor(str(exported / "model.safetensors"), CPU)
    (raw / "3" / "broken.png").write_bytes(b"not an image")
    try:
        parts = make_parts(str(raw), part_size=40)
        results = predict_parts(predictor, parts, str(tmp_path / "p"), 0, 1, 16, 1, CPU, progress=False)
    finally:
        (raw / "3" / "broken.png").unlink()
    rows = _rows(tmp_path / "p")
    assert len(parts) == 3 and len(rows) == 97 and sum(r.unreadable for r in results) == 1
    r = rows[0]
    assert r["source"] == r["key"] and "/" in r["key"] and r["true_label"] == int(r["key"].split("/")[0])
    assert r["sha256"] == hashlib.sha256((raw / r["key"]).read_bytes()).hexdigest()


def test_a_path_without_an_export_is_refused_clearly(tmp_path):
    with pytest.raises(Exception, match="no model.safetensors there"):
        load_predictor(str(tmp_path), CPU)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_predict_each_image_once(tiny_data, exported, tmp_path):
    out = tmp_path / "pred"
    args = [str(exported), "--data", tiny_data["unlabeled"], "--out", str(out), "--quiet"]
    cmd = ranks_command(ROOT / "launch/predict.py", args + ["--calibrate-on", tiny_data["eval"]], nproc=2)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=launch_env())
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 600 and len({(r["key"], r["source"]) for r in rows}) == 600
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == 600 and summary["parts"] == len(resolve(tiny_data["unlabeled"]).urls)
    assert summary["with_true_label"] == 600  # the unlabeled set keeps the true labels in its json
    cal = summary["calibration"]
    assert cal["samples"] == 97 and cal["nll_after"] <= cal["nll_before"] and (out / "reliability.png").exists()
    # a rerun of the finished prediction rewrites no file, its summary and the reliability picture included
    mtimes = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=launch_env())
    assert r.returncode == 0 and "already finished: nothing rewritten" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()} == mtimes
    # the same output without the calibration would mix two temperatures: refused, nothing written
    r = subprocess.run([sys.executable, str(ROOT / "launch/predict.py"), *args], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=launch_env())
    assert r.returncode == 2 and "predicted at temperature" in r.stderr, r.stderr[-2000:]


def test_temperature_scaling_recovers_the_temperature_that_made_the_labels():
    """Labels drawn from softmax(z / 2.5): the fitted T is ~2.5, the NLL and ECE fall, the top-1 stays."""
    from distssl.calibration import calibrate, ece, fit_temperature, reliability

    g = torch.Generator().manual_seed(0)
    z = 4 * torch.randn(20000, 10, generator=g)
    labels = torch.multinomial((z / 2.5).softmax(1), 1, generator=g).squeeze(1)
    assert fit_temperature(z, labels) == pytest.approx(2.5, rel=0.05)
    report = calibrate(z, labels)
    assert report["nll_after"] < report["nll_before"] and report["ece_after"] < 0.5 * report["ece_before"]
    assert report["ece_after"] < 0.02 and report["samples"] == 20000
    # ECE by hand on a tiny case: two bins' worth of gaps
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 0, 0])
    assert ece(probs, labels, bins=10) == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert sum(b["count"] for b in reliability(probs, labels, bins=10)) == 4


def test_calibrate_on_a_labeled_set_scales_the_parts_and_refuses_to_mix_two_temperatures(tiny_data, exported,
                                                                                          tmp_path):
    from distssl.calibration import calibrate
    from distssl.predict.rank_parts import check_temperature, labeled_logits

    predictor = load_predictor(str(exported), CPU)
    logits, labels = labeled_logits(predictor, make_parts(tiny_data["eval"]), 32, CPU)
    assert logits.shape == (97, 10) and labels.min() >= 0
    report = calibrate(logits, labels, str(tmp_path / "reliability.png"))
    assert (tmp_path / "reliability.png").stat().st_size > 1000 and report["nll_after"] <= report["nll_before"]
    predictor.temperature = report["temperature"]
    out = tmp_path / "pred"
    parts = make_parts(tiny_data["eval"])
    predict_parts(predictor, parts, str(out), 0, 1, 32, 2, CPU, progress=False)
    rows = _rows(out)
    raw_max = logits.softmax(1).max(1).values  # uncalibrated, in the same order as the eval parts
    scaled_max = (logits / report["temperature"]).softmax(1).max(1).values
    assert sorted(round(r["confidence"], 4) for r in rows) == sorted(round(float(c), 4) for c in scaled_max)
    assert report["temperature"] == 1.0 or sorted(round(float(c), 4) for c in raw_max) != sorted(
        round(r["confidence"], 4) for r in rows)
    check_temperature(str(out), parts, report["temperature"])  # the same launch again: fine
    with pytest.raises(ValueError, match="predicted at temperature"):
        check_temperature(str(out), parts, 1.0 if report["temperature"] != 1.0 else 2.0)


def test_confident_predictions_become_a_labeled_shard_set_with_their_provenance(tiny_data, exported, tmp_path):
    from distssl.predict.pseudo import confident_rows, write_pseudo_index, write_pseudo_shard

    predictor = load_predictor(str(exported), CPU)
    parts = make_parts(tiny_data["unlabeled"])
    out, dst = tmp_path / "pred", tmp_path / "pseudo"
    predict_parts(predictor, parts, str(out), 0, 1, 64, 1, CPU, progress=False)
    rows = _rows(out)
    p = sorted(r["confidence"] for r in rows)[len(rows) // 2]  # the median: about half the images pass
    want = {r["sha256"]: r for r in rows if r["confidence"] >= p}
    info = {"teacher": "teacher-run", "data": "u", "min_confidence": p}
    assert write_pseudo_index(str(dst), parts, predictor.class_names, info) is None  # nothing yet
    for part in parts[:2]:
        chosen, predicted = confident_rows(str(out), part, p)
        write_pseudo_shard(str(dst), part, chosen, "teacher-run", predicted)
    assert not (dst / "index.json").exists()  # not usable while shards are missing
    assert write_pseudo_index(str(dst), parts, predictor.class_names, info) is None
    first = {f.name: f.stat().st_mtime_ns for f in dst.glob("*.tar")}
    for part in parts:
        chosen, predicted = confident_rows(str(out), part, p)
        write_pseudo_shard(str(dst), part, chosen, "teacher-run", predicted)
    assert {n: (dst / n).stat().st_mtime_ns for n in first} == first  # a shard with stats is not written again
    index = write_pseudo_index(str(dst), parts, predictor.class_names, info)
    shards = resolve(str(dst))
    assert shards.labeled and index["count"] == len(want) == sum(shards.counts)
    assert sum(index["class_histogram"]) == len(want) and index["pseudo_labels"]["min_confidence"] == p
    assert index["pseudo_labels"]["predicted"] == len(rows)
    got = [raw for url in shards.urls for raw in tar_samples(url)]
    for raw in got:
        meta = json.loads(raw.fields["json"])
        row = want[meta["sha256"]]
        assert int(raw.fields["cls"]) == row["pred"] and meta["confidence"] == pytest.approx(row["confidence"])
        assert meta["teacher"] == "teacher-run" and meta["source_key"] == row["key"]
        assert meta["source"] == row["source"] and meta.get("true_label") == row["true_label"]
    assert len({json.loads(raw.fields["json"])["sha256"] for raw in got}) == len(got)
