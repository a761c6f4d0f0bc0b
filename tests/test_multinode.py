"""A real 2-node run on this one machine: two deepspeed launcher invocations (--no_ssh, one process
per node) joined over gloo. Shards are split between the nodes, and DA and eval are all-reduced."""
import json
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port, tiny_overrides
from support.servers import launch_env, train_command


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_split_shards_and_share_da_and_eval(tiny_data, tmp_path):
    out = tmp_path / "run"
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    port = free_port()  # both nodes' launchers meet on it
    # 8 steps x 56 unlabeled images per node: each node reads its half of the 12 unlabeled shards
    # (epoch 0) and starts epoch 1.
    args = tiny_overrides(tiny_data, out, **{"train.steps": 8, "train.batch_size": 16, "ssl.mu": 7,
                                             "train.eval_every": 8, "train.ckpt_every": 8,
                                             "run.trace_shards": "true", "run.log_every": 4})
    procs = [subprocess.Popen(train_command(args, hostfile=hosts, node_rank=r, master_port=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=launch_env(), cwd=ROOT)
             for r in (0, 1)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    # shards: within epoch 0 the two nodes read disjoint halves that together cover the set
    index = json.loads((Path(tiny_data["unlabeled"]) / "index.json").read_text())
    n_shards = len(index["shards"])
    read = defaultdict(set)
    for f in (out / "trace").glob("unlabeled_g*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            read[(rec["rank"], rec["epoch"])].add(rec["shard"])
    node0, node1 = read[(0, 0)], read[(1, 0)]
    assert node0 and node1 and not node0 & node1
    assert node0 | node1 == set(range(n_shards))
    assert read[(0, 1)] or read[(1, 1)]  # the run went past one epoch of the finite set

    # DA: both nodes hold the same p_model although each saw different images
    ckpt = out / "checkpoints" / "step_00000008"
    states = [torch.load(p, weights_only=True) for p in sorted(ckpt.glob("distssl_rank*.pt"))]
    assert len(states) == 2
    p0, p1 = states[0]["algorithm"]["da"]["p_model"], states[1]["algorithm"]["da"]["p_model"]
    assert torch.equal(p0, p1) and not torch.allclose(p0, torch.full_like(p0, 0.1))
    assert states[0]["world_size"] == 2

    # eval: each node evaluates only its shards; the reported count is the whole eval set
    ev = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert ev[-1]["eval_images"] == 97
    assert (out / "model.safetensors").exists()
