"""The first hour, again: each mistake or habit a new user met gets the one clear line it is due, once, with
the right exit; nothing is lost or written twice. The commands run as a user runs them, and the tests read
what a user reads (stdout and stderr together)."""
import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from conftest import ROOT, run_train, tiny_overrides
from distssl.cli import train as train_cli
from distssl.config import Config, ConfigError, load_config
from distssl.config.coerce import describe_keys
from distssl.data.index import describe_missing
from distssl.errors import MissingCredentials, MissingExtra
from distssl.shards.listing import list_inputs
from distssl.storage import store
from distssl.tracking import environment
from distssl.tracking.progress import PlainProgress
from support.servers import deepspeed_command, launch_env

DEMO = str(ROOT / "configs/demo.yaml")


def _main(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = train_cli.main(list(argv))
    return code, out.getvalue()


def test_a_mistyped_key_gets_a_did_you_mean_even_for_a_transposition():
    with pytest.raises(ConfigError, match=r"unknown key 'ssl.tua': did you mean ssl.tau\?"):
        load_config(DEMO, ["ssl.tua=0.9"])
    with pytest.raises(ConfigError, match=r"did you mean train.batch_size\?"):
        load_config(DEMO, ["train.bach_size=8"])


def test_keys_of_no_section_exit_2_naming_every_section_and_every_key_says_what_it_means():
    code, said = _main("--keys", "foo.")
    assert code == 2 and "no key starts with 'foo.'" in said and "selftrain" in said and "run, train, ssl" in said
    rows = describe_keys(Config)
    assert [r[0] for r in rows if r[1] != "section" and not r[3]] == []  # no key without a meaning
    constants = [(r[0], c) for r in rows for c in re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", r[3])
                 if not c.startswith(("AWS_", "AZURE_", "GOOGLE_", "MLFLOW_", "WANDB_", "STORAGE_", "DISTSSL_"))]
    assert constants == []  # a meaning shows values, not an internal constant's name
    from distssl.ssl.flexmatch import WARMUP_MIN_EPOCHS

    assert f"{WARMUP_MIN_EPOCHS} times" in dict((r[0], r[3]) for r in rows)["ssl.flexmatch.warmup"]


def test_print_config_shows_a_recipe_whose_data_is_not_set_yet_and_marks_what_is_missing():
    code, said = _main("--print-config", "--config", "starter")
    assert code == 0
    for key in ("labeled", "unlabeled", "eval"):
        assert re.search(rf"^  {key}: ''  # NOT SET", said, re.M), said
    with pytest.raises(ConfigError, match="data.labeled is not set"):  # training still needs them
        load_config("starter")


def test_the_parent_of_a_builds_sets_is_met_with_did_you_mean(tiny_data):
    parent = str(Path(tiny_data["labeled"]).parent)
    said = describe_missing(parent, "unlabeled")
    assert f"did you mean {parent}/unlabeled?" in said and "also there: labeled" in said


def test_files_that_are_not_inputs_are_counted_and_linked_class_folders_followed(tmp_path, tiny_data):
    """Class folders as links (a subset made without copying), a link to nothing, a notes.txt, a link that
    loops back: the linked images are listed once each, the rest counted by reason."""
    real = tiny_data["raw"] / "eval"
    src = tmp_path / "src"
    (src / "0").mkdir(parents=True)
    for p in sorted((real / "0").iterdir())[:3]:
        (src / "0" / p.name).write_bytes(p.read_bytes())
    (src / "0" / "notes.txt").write_text("see the wiki")
    (src / "1").symlink_to(real / "1", target_is_directory=True)
    (src / "2").symlink_to(tmp_path / "nowhere")
    (src / "0" / "loop").symlink_to(src, target_is_directory=True)
    listing = list_inputs(str(src))
    assert len(listing) == 3 + len(list((real / "1").iterdir())) and listing.class_names == ["0", "1"]
    assert dict(listing.skipped) == {"0/notes.txt": "not an image (.txt)", "2": "a link to nothing"}


def test_an_object_store_without_its_extra_or_its_credentials_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the [s3] extra were not installed
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)  # none cached from before
    with pytest.raises(MissingExtra, match=r's3:// needs the \[s3\] extra.*pip install "distssl\[s3\]"'):
        store.filesystem("s3://bucket/shards")
    monkeypatch.undo()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(MissingCredentials, match=r"no credentials .* AWS_ACCESS_KEY_ID"):
        store.check_access("s3://my-bukcet/shards/unlabeled")
    calls = []
    with pytest.raises(MissingCredentials):  # never retried: no attempt can find credentials
        store.retry(lambda: calls.append(1) or store.filesystem("s3://my-bukcet/x")[0].info("my-bukcet/x"),
                    what="s3://my-bukcet/x")
    assert calls == [1]


def test_progress_in_a_log_file_is_a_plain_line_now_and_then(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 40.0, 40.0, 41.0, 90.0])  # start; each update's look; each line's own
    monkeypatch.setattr("distssl.tracking.progress.time.monotonic", lambda: next(clock))
    bar = PlainProgress(100, desc="train", unit="step", every=30)
    bar.set_postfix({"loss": 1.5}, refresh=False)
    bar.update(10)  # t=10: not yet
    bar.update(30)  # t=40: a line
    bar.update(10)  # t=41: too soon
    bar.close()  # the last line
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "\r" not in "".join(lines)
    assert lines[0].startswith("train: 40/100 step (40%), 1 step/s, loss 1.5") and "1m00s left" in lines[0]


def test_a_resume_in_another_environment_names_what_differs():
    now = environment.collect()
    assert now["packages"]["torch"] and now["device"] and "timm" in now["packages"]
    before = json.loads(json.dumps(now))
    before["packages"]["timm"], before["device"] = "0.9.0", "NVIDIA H100"
    assert environment.differences(before, now) == [f"timm 0.9.0 -> {now['packages']['timm']}",
                                                     f"device NVIDIA H100 -> {now['device']}"]
    assert environment.differences(now, now) == []


@pytest.mark.slow
def test_a_listing_cut_by_a_closed_pipe_ends_quietly():
    r = subprocess.run(f"{sys.executable} {ROOT}/launch/train.py --keys ssl. | head -1", shell=True,
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.stdout.startswith("ssl.algorithm") and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_a_refusal_under_two_ranks_is_said_once(tiny_data, tmp_path):
    args = tiny_overrides(tiny_data, tmp_path / "run", **{"train.batch_size": 5})  # not divisible by 2 ranks
    r = subprocess.run(deepspeed_command(ROOT / "launch/train.py", ["--config", DEMO, *args], nproc=2),
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=launch_env())
    said = r.stdout + r.stderr
    assert r.returncode != 0 and said.count("divisible") == 1, said[-2000:]


@pytest.mark.slow
def test_a_run_in_a_log_file_a_finished_rerun_and_its_summary(tiny_data, tmp_path):
    """Plain progress lines (no carriage returns), env.json and the throughput in summary.json; a rerun of the
    finished run prints its result and writes nothing (every file's mtime as it was)."""
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 6, "train.eval_every": 6})
    r = run_train(args, env={**launch_env(), "DISTSSL_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    said = r.stdout + r.stderr
    assert "\r" not in said and re.search(r"train: \d+/6 step", said)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_seconds_this_launch"] > 0 and summary["images_per_s"] > 0 and summary["steps_this_launch"] == 6
    assert json.loads((out / "env.json").read_text())["packages"]["torch"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    r = run_train(args)
    assert r.returncode == 0 and "already finished at step 6" in r.stdout and "nothing was written" in r.stdout
    assert "train:" not in r.stdout + r.stderr  # no progress bar for a run that does nothing
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    assert os.path.exists(out / "tb") and len(list((out / "tb").rglob("*"))) == len(
        [p for p in mtimes if "tb" in p.parts])  # no empty TensorBoard events file added
