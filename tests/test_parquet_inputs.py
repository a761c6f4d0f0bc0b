"""The builder reads Parquet: a manifest of paths and labels like a CSV one, and a table with the images
embedded (``datasets``' ``{bytes, path}`` struct, or raw bytes), read a row group at a time."""
import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import export_digits
from distssl.data.streams import tar_samples
from distssl.shards import inputs, make_shards
from distssl.shards.listing import list_inputs


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    export_digits(root / "raw", n_train=120, n_eval=0)
    train = root / "raw/train"
    rels = sorted(os.path.relpath(os.path.join(d, f), train) for d, _, fs in os.walk(train) for f in fs)
    return root, train, rels


def _shas(set_dir) -> dict:
    """{sha256 of the original bytes: label} over a set, from the samples' json."""
    out = {}
    for tar in sorted(set_dir.glob("*.tar")):
        for raw in tar_samples(str(tar)):
            meta = json.loads(raw.fields["json"])
            out[meta["sha256"]] = meta.get("label")
    return out


def test_a_parquet_manifest_builds_like_a_csv_one(digits, tmp_path):
    root, train, rels = digits
    labels = [r.split("/")[0] for r in rels]
    pq.write_table(pa.table({"path": rels, "label": labels}), train / "manifest.parquet", row_group_size=32)
    with open(train / "manifest.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{r},{lb}\n" for r, lb in zip(rels, labels)))
    built = {}
    for ext in ("parquet", "csv"):
        sets = make_shards(str(train / f"manifest.{ext}"), str(tmp_path / ext), labels_per_class=2, progress=False)
        built[ext] = sets
    assert built["parquet"]["labeled"]["class_histogram"] == [2] * 10 == built["csv"]["labeled"]["class_histogram"]
    assert built["parquet"]["unlabeled"]["count"] == 120
    assert _shas(tmp_path / "parquet/unlabeled") == _shas(tmp_path / "csv/unlabeled")


@pytest.mark.parametrize("as_struct", [True, False])
def test_a_table_with_embedded_images_builds_without_a_file_per_image(digits, tmp_path, as_struct, monkeypatch):
    root, train, rels = digits
    blobs = [(train / r).read_bytes() for r in rels]
    if as_struct:  # what `datasets` writes for an Image feature
        images = pa.array([{"bytes": b, "path": r} for b, r in zip(blobs, rels)],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        images = pa.array(blobs, type=pa.binary())
    table = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": images, "label": [int(r.split("/")[0]) for r in rels]}), table,
                   row_group_size=25)

    listing = list_inputs(str(table))
    assert len(listing) == 120 and listing.url(7) == f"{table}#row=7" and listing.class_names[:2] == ["0", "1"]

    groups_read = []
    real = inputs.EmbeddedTable.read_group
    monkeypatch.setattr(inputs.EmbeddedTable, "read_group", lambda self, g: groups_read.append(g) or real(self, g))
    got = list(inputs.read_many([f"{table}#row={i}" for i in (99, 3, 4, 98, 50)]))
    assert got == [blobs[i] for i in (99, 3, 4, 98, 50)]
    assert sorted(groups_read) == [0, 2, 3]  # each row group once, only those holding a wanted row

    sets = make_shards(str(table), str(tmp_path / "out"), labels_per_class=2, progress=False)
    assert sets["labeled"]["class_histogram"] == [2] * 10 and sets["unlabeled"]["count"] == 120
    want = {hashlib.sha256(b).hexdigest(): int(r.split("/")[0]) for b, r in zip(blobs, rels)}
    assert _shas(tmp_path / "out/unlabeled") == want  # every image, its bytes kept, its label


def test_a_parquet_input_without_paths_or_images_is_refused_clearly(tmp_path):
    pq.write_table(pa.table({"caption": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="'path' or 'url' column .* or an image column"):
        list_inputs(str(tmp_path / "t.parquet"))
    pq.write_table(pa.table({"image": pa.array([b"x"], type=pa.binary())}), tmp_path / "one.parquet")
    with pytest.raises(FileNotFoundError, match="no row 5"):
        inputs.read_input(f"{tmp_path / 'one.parquet'}#row=5")
