"""What went wrong in a new user's first hour, each mistake made as the user made it: the exit code and the
one line that names the input and what to do, and nothing lost."""
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, launch_env, run_train, tiny_overrides, train_command
from distssl.config import load_config
from distssl.errors import ConfigError, DamagedFile, PortInUse

DEMO = str(ROOT / "configs/demo.yaml")


def _one_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The run exited ``code`` with no traceback, and one line of its stderr holds every needle."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if all(n in x for n in needles)]
    assert lines, r.stderr[-2000:]
    return lines[0]


def _own_sets(tiny_data) -> list[str]:
    """The user's own labeled and unlabeled sets on top of the demo's recipe, data.eval forgotten."""
    return [f"data.labeled={tiny_data['labeled']}", f"data.unlabeled={tiny_data['unlabeled']}"]


# --- 1. a forgotten data.eval ----------------------------------------------------------------------

def test_own_sets_beside_the_demos_eval_are_refused_naming_the_key(tiny_data):
    from distssl.train import preflight

    cfg = load_config(DEMO, _own_sets(tiny_data))
    with pytest.raises(ConfigError, match=r"data.eval is still the demo's \(data/mnist5k/shards/eval\) while "
                                          r"data.labeled and data.unlabeled are your own"):
        preflight.check(cfg)
    mixed = load_config(DEMO, [f"data.eval={tiny_data['eval']}"])  # the other way round: own eval only
    with pytest.raises(ConfigError, match="data.labeled and data.unlabeled are still the demo's"):
        preflight.check_not_mixed(mixed.data)
    preflight.check_not_mixed(load_config(DEMO).data)  # the demo itself
    # the demo's task with unlabeled images of one's own: its labeled set and eval stay consistent
    preflight.check_not_mixed(load_config(DEMO, [f"data.unlabeled={tiny_data['unlabeled']}"]).data)
    preflight.check_not_mixed(load_config(DEMO, [*_own_sets(tiny_data), f"data.eval={tiny_data['eval']}"]).data)
    preflight.check_not_mixed(load_config(DEMO, [*_own_sets(tiny_data), "data.demo_root=null"]).data)  # on purpose


@pytest.mark.slow
def test_a_forgotten_data_eval_stops_the_run_before_anything_is_built(tiny_data, tmp_path):
    r = run_train([*_own_sets(tiny_data), f"run.out_dir={tmp_path / 'run'}", "train.steps=5"])
    line = _one_line(r, 2, "config error:", "data.eval is still the demo's", "data.eval=YOUR_EVAL_SHARDS")
    assert not (tmp_path / "run").exists(), line


# --- 2. a taken rendezvous port --------------------------------------------------------------------

def _hold_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_a_taken_port_is_named_by_rank_0_and_not_called_a_dead_peer(monkeypatch):
    import torch.distributed as dist

    from distssl.distributed.peers import check_rendezvous_port, is_peer_failure

    holder, port = _hold_port()
    with holder:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(PortInUse, match=rf"rendezvous port {port} .* in use by another process.*"
                                            r"deepspeed --master_port N"):
            check_rendezvous_port()
        monkeypatch.setenv("RANK", "1")  # the others connect to it: not theirs to check
        check_rendezvous_port()
        # the same taken port as torch's own store reports it, should it be taken after the check
        with pytest.raises(RuntimeError) as raised:
            dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
        assert not is_peer_failure(raised.value)
    assert is_peer_failure(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:4242"))


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_rank_launch_on_a_taken_port_names_it_and_how_to_pick_another(tiny_data, tmp_path):
    holder, port = _hold_port()
    with holder:
        r = subprocess.run(train_command(tiny_overrides(tiny_data, tmp_path / "run"), nproc=2, master_port=port,
                                               launcher="deepspeed"),
                           capture_output=True, text=True, timeout=240, env=launch_env(), cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert f"rendezvous port {port}" in out and "--master_port N" in out, out[-3000:]
    assert "peer rank died" not in out and "Rerun the same command" not in out, out[-3000:]


# --- 3. a truncated index.json ---------------------------------------------------------------------

@pytest.fixture()
def truncated_eval(tiny_data, tmp_path) -> Path:
    bad = tmp_path / "bad_eval"
    shutil.copytree(tiny_data["eval"], bad)
    (bad / "index.json").write_bytes((Path(tiny_data["eval"]) / "index.json").read_bytes()[:200])
    return bad


def test_a_truncated_index_is_a_damaged_file_named_with_the_fix(truncated_eval):
    from distssl.data.index import read_index, resolve

    with pytest.raises(DamagedFile, match=rf"{truncated_eval}/index.json is damaged \(200 bytes .*rerun the build"):
        read_index(str(truncated_eval))
    (truncated_eval / "index.json").write_text('{"format": "distssl.shardset/1"}')  # parses, but no shards
    with pytest.raises(DamagedFile, match="is not a shard-set index"):
        resolve(str(truncated_eval))


@pytest.mark.slow
def test_training_and_inspect_on_a_truncated_index_exit_2_naming_it(tiny_data, truncated_eval, tmp_path):
    r = run_train(tiny_overrides({**tiny_data, "eval": str(truncated_eval)}, tmp_path / "run", **{"train.steps": 2}))
    _one_line(r, 2, "damaged file:", f"{truncated_eval}/index.json is damaged")
    r = subprocess.run([sys.executable, str(ROOT / "tools/inspect_shards.py"), str(truncated_eval)],
                       capture_output=True, text=True, timeout=120)
    _one_line(r, 2, f"{truncated_eval}/index.json is damaged")


# --- 4. Ctrl-C -------------------------------------------------------------------------------------

def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.2)


def _steps(out: Path) -> list[int]:
    return sorted(int(d.name.removeprefix("step_")) for d in (out / "checkpoints").glob("step_*")
                  if (d / "COMPLETE").exists())


@pytest.mark.slow
def test_ctrl_c_saves_at_the_next_step_with_one_line_and_the_run_resumes(tiny_data, tmp_path):
    """SIGINT to the whole process group, as a terminal sends it: the rank and its loader worker."""
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 3000, "train.ckpt_every": 5, "train.eval_every": 3000,
                                             "train.num_workers": 1})
    log = tmp_path / "run.log"
    proc = subprocess.Popen(train_command(args), stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            env=launch_env(), cwd=ROOT, start_new_session=True)
    try:
        _wait_for(out / "checkpoints/step_00000010/COMPLETE", proc)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = log.read_text()
    assert rc == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    saved = _steps(out)[-1]
    assert saved > 10, saved
    assert re.search(rf"interrupted \(Ctrl-C\) at step {saved}: saved .*step_{saved:08d}\. Rerun the same command",
                     err), err[-2000:]
    assert not (out / "summary.json").exists()
    r = run_train([*args, f"train.steps={saved + 2}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{saved:08d}'}" in r.stdout + r.stderr


@pytest.mark.slow
def test_a_second_ctrl_c_leaves_at_once_keeping_the_last_complete_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 3000, "train.ckpt_every": 5, "train.eval_every": 3000})
    log = tmp_path / "run.log"
    proc = subprocess.Popen(train_command(args), stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            env=launch_env(), cwd=ROOT, start_new_session=True)
    try:
        _wait_for(out / "checkpoints/step_00000005/COMPLETE", proc)
        os.killpg(proc.pid, signal.SIGINT)
        for _ in range(100):  # the first is noted ...
            if "Ctrl-C: saving" in log.read_text():
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # ... the second leaves, whether or not the save has begun
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = log.read_text()
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    assert "interrupted again: leaving without saving" in err or "interrupted (Ctrl-C) at step" in err, err[-2000:]
    assert _steps(out) and _steps(out)[0] >= 5  # what was complete is still complete


# --- 6. raw images where shards belong -------------------------------------------------------------

def test_raw_images_given_as_a_shard_set_are_named_as_images_with_the_build_command(tiny_data):
    from distssl.data.index import describe_missing

    raw_eval = str(tiny_data["raw"] / "eval")
    problem = describe_missing(raw_eval)
    assert problem.startswith(f"{raw_eval} holds 97 images in 10 class folders (0, 1, 2, 3, 4, ...), not shards")
    assert f"distssl-shards {raw_eval} SHARDS" in problem and "to finish it" not in problem
    assert "holds 1 images" not in (describe_missing(str(next((tiny_data["raw"] / "eval").iterdir()))) or "")


def test_raw_images_under_a_store_prefix_are_named_as_images_too(tiny_data):
    import fsspec

    from distssl.data.index import resolve
    from distssl.errors import MissingShardSet

    fs = fsspec.filesystem("memory")
    for digit in ("3", "7"):
        for f in sorted((tiny_data["raw"] / "eval" / digit).iterdir())[:4]:
            fs.pipe(f"/raw-bucket/eval/{digit}/{f.name}", f.read_bytes())
    with pytest.raises(MissingShardSet, match=r"memory://raw-bucket/eval holds 8 images in 2 class folders "
                                              r"\(3, 7\), not shards: build a shard set from it first"):
        resolve("memory://raw-bucket/eval")
    with pytest.raises(FileNotFoundError, match="has no index.json: it is not a complete shard set"):
        resolve("memory://raw-bucket/nothing-here")  # still a FileNotFoundError for "not built yet" callers


@pytest.mark.slow
def test_training_on_raw_images_exits_2_saying_they_are_images(tiny_data, tmp_path):
    r = run_train(tiny_overrides({**tiny_data, "eval": str(tiny_data["raw"] / "eval")}, tmp_path / "run"))
    _one_line(r, 2, "config error: data.eval:", "holds 97 images in 10 class folders", "distssl-shards")


# --- 8. exports and other atomic writes follow the umask -------------------------------------------

@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_written_atomically_get_the_mode_the_umask_gives(tmp_path, mask, want):
    import torch

    from distssl.models.export import write_export
    from distssl.models.identity import fingerprint
    from distssl.storage import atomic

    old = os.umask(mask)
    try:
        meta = {"architecture": "test_resnet", "fingerprint": fingerprint("test_resnet", 10, [], "run", 0, None)}
        weights = write_export({"w": torch.zeros(3)}, meta, tmp_path / "model.safetensors")
        atomic.write_text(tmp_path / "summary.json", "{}")
    finally:
        os.umask(old)
    for path in (weights, weights.with_suffix(".json"), tmp_path / "summary.json"):
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors", "summary.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from distssl.storage import atomic

    target = tmp_path / "config.yaml"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# --- 5. README commands as pasted --------------------------------------------------------------------

def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_install_lines_activate_the_venv_and_ci_runs_the_readme_test_command():
    lines = _readme_commands()
    installs = [line for line in lines if line.startswith("python3 -m venv .venv")]
    assert len(installs) == 2, installs
    for line in installs:  # later commands (python tools/..., $(which distssl-train)) run in that venv
        assert line.startswith("python3 -m venv .venv && . .venv/bin/activate && "), line
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci == installs[1], (ci, installs[1])
    for line in lines:  # every script a README command names exists
        for script in re.findall(r"\b((?:tools|launch)/[\w/]+\.(?:py|sh))", line):
            assert (ROOT / script).exists(), (script, line)
        for cfg in re.findall(r"--config (configs/[\w/]+\.yaml)", line):
            assert (ROOT / cfg).exists(), (cfg, line)


# --- 9. what people look for -----------------------------------------------------------------------

def test_print_config_and_keys_answer_without_training(capsys, tmp_path):
    from distssl.cli.train import main

    assert main(["--config", DEMO, "--print-config", "ssl.tau=0.8", f"run.out_dir={tmp_path / 'r'}"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["ssl"]["tau"] == 0.8 and printed["train"]["steps"] == 1000 and printed["data"]["flip"] is False
    assert not (tmp_path / "r").exists()  # nothing was run or written
    assert main(["--keys", "ssl."]) == 0
    listing = capsys.readouterr().out
    assert "ssl.tau = 0.95  (float)\n    confidence threshold" in listing
    assert "ssl.freematch.momentum = null  (float or null)" in listing
    assert "\ntrain.steps = " not in "\n" + listing  # only the ssl. keys are listed
    assert main(["--keys"]) == 0
    everything = capsys.readouterr().out
    from distssl.config import Config
    from distssl.config.coerce import describe_keys

    keys = [k for k, tp, _, _ in describe_keys(Config) if tp != "section"]
    assert all(f"\n{k} = " in "\n" + everything for k in keys)
    undocumented = [k for k, tp, _, doc in describe_keys(Config) if tp != "section" and not doc]
    assert len(undocumented) < len(keys) // 3, undocumented  # most keys say what they mean


def test_curves_show_the_losses_beside_the_rates(tmp_path):
    from PIL import Image

    from distssl.tracking.metrics import plot

    lines = [{"kind": "train", "step": s, "loss": 2.0 / s, "loss_x": 1.5 / s, "loss_u": 0.5 / s, "mask_rate": s / 10}
             for s in range(1, 10)] + [{"kind": "eval", "step": 9, "top1": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert plot(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (1200, 400)  # two panels: losses, rates
