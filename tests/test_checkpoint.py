"""Checkpoint folders: only complete ones are resumed; nothing in them is unpickled freely."""
import pickle

import pytest
import torch

from distssl.checkpoint import layout as ckpt


def _fake_complete(d, step):
    p = d / ckpt.tag_for(step)
    p.mkdir(parents=True)
    (p / ckpt.MARKER).write_text('{"step": %d, "world_size": 2}' % step)


def test_latest_skips_cut_short_checkpoints_and_warns(tmp_path, caplog):
    _fake_complete(tmp_path, 10)
    (tmp_path / "tmp_step_00000020").mkdir()  # killed while DeepSpeed was writing
    (tmp_path / ckpt.tag_for(30)).mkdir()  # renamed but never marked complete
    step, tag, info = ckpt.latest(tmp_path)
    assert (step, tag, info["world_size"]) == (10, "step_00000010", 2)
    assert "incomplete checkpoint" in caplog.text and "tmp_step_00000020" in caplog.text
    assert ckpt.latest(tmp_path / "nothing") is None


def test_finalize_renames_marks_and_prunes(tmp_path):
    for s in (10, 20):
        _fake_complete(tmp_path, s)
    (tmp_path / "tmp_step_00000025").mkdir()
    (tmp_path / "tmp_step_00000030").mkdir()
    (tmp_path / "tmp_step_00000030" / "weights.pt").write_bytes(b"x")
    ckpt.finalize(tmp_path, "tmp_step_00000030", 30, {"world_size": 1}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000030"]
    assert (tmp_path / "step_00000030" / "weights.pt").exists()
    assert ckpt.latest(tmp_path)[0] == 30


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {_Payload.target}",))


def test_a_pickle_payload_in_a_checkpoint_is_not_executed(tmp_path):
    _Payload.target = tmp_path / "pwned"
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Payload()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.safe_load(bad)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_rank_state(bad)
    assert not _Payload.target.exists()


def test_the_run_and_feed_state_round_trip_through_the_rank_file_torch_loads_safely(tmp_path):
    import torch

    from distssl.checkpoint.state import RunState, by_name
    from distssl.config import load_config
    from distssl.data.feed import Feed
    from distssl.data.position import StreamPlan, Unit

    def feed():
        cfg = load_config("configs/demo.yaml", ["data.demo_root=null"])
        return Feed(cfg, rank=0, world=1, batch=4, device=torch.device("cpu"), dtype=torch.float32,
                    channels_last=False, wanted=("weak", "strong"), sets={})

    run, first = RunState(step=37, skipped_total=5), feed()
    first.cursors = {"labeled": {0: 12, 3: 9}, "unlabeled": {1: 40}}
    first.plans = {"labeled": StreamPlan([Unit(2, frozenset({0, 5}))], next_epoch=3), "unlabeled": StreamPlan()}
    path = tmp_path / "distssl_rank00000.pt"
    ckpt.save_rank_state(path, {"run": run.state_dict(), "feed": first.state_dict()})
    saved = ckpt.load_rank_state(path)  # weights_only: plain types only
    back, again = RunState(), feed()
    back.load_state_dict(saved["run"])
    again.load_state_dict(saved["feed"])
    assert back == run and again.cursors == first.cursors and again.plans == first.plans
    # a checkpoint from before the state was kept by name: the run's and the streams' fields flat
    flat = {**run.state_dict(), **first.state_dict(), "ema": {}}
    assert by_name(flat)["run"] == run.state_dict() and by_name(flat)["feed"] == first.state_dict()
