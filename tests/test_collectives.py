"""The collectives' arithmetic that needs no process group: ZeRO-3's partition layout, and every
reduction being the identity in a world of one (the maths that calls them is tested on one rank)."""
import ast
from pathlib import Path

import torch

from distssl.distributed import collectives as c


def test_partitions_of_any_world_put_back_together_give_the_tensor():
    full = torch.arange(14.0).reshape(2, 7)
    for world in (1, 2, 3, 5):
        per_rank = -(-full.numel() // world)  # ZeRO-3: ceil(numel / world), the last rank padded
        parts = [c.partition_of(full, per_rank, r, world) for r in range(world)]
        assert all(p.numel() == per_rank for p in parts)
        assert torch.equal(c.from_partitions(parts, full.shape), full)
    assert c.partition_of(full, 5, 2, 3).tolist() == [10.0, 11.0, 12.0, 13.0, 0.0]  # the padding is zeros


def test_a_whole_copy_is_taken_as_it_is():
    whole = torch.randn(3, 4)
    back = c.from_partitions([whole, whole.clone()], whole.shape)  # a persistent parameter on two ranks
    assert torch.equal(back, whole) and back.data_ptr() != whole.data_ptr()


def test_without_a_process_group_every_reduction_is_the_identity():
    t = torch.tensor([1.0, 2.0, 4.0])
    assert c.world_size() == 1 and c.rank() == 0
    for reduce in (c.sum_over_ranks, c.mean_over_ranks, c.min_over_ranks, c.gather_cat):
        assert torch.equal(reduce(t), t)
    assert c.sum_numbers([1, 2]).dtype == torch.float64 and c.sum_numbers([1, 2]).tolist() == [1.0, 2.0]
    counts = torch.tensor([3, 4])
    assert c.mean_over_ranks(counts) is counts  # integer counters are not averaged


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object",
               "scatter", "scatter_object_list", "barrier", "monitored_barrier", "all_to_all", "all_to_all_single",
               "send", "recv", "isend", "irecv"}
DIST_MODULES = ("torch.distributed", "deepspeed.comm")


def collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, name) of every call of a torch.distributed (or deepspeed.comm) collective in ``source``, however
    the module was imported: ``torch.distributed.x(...)``, ``import torch.distributed as d; d.x(...)``,
    ``from torch import distributed``, ``from torch.distributed import x``."""
    tree = ast.parse(source)
    aliases, direct = set(), set()  # names bound to a distributed module; collective functions imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name in DIST_MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in DIST_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in COLLECTIVES:
                    direct.add(a.asname or a.name)

    def dotted(expr) -> str:
        return f"{dotted(expr.value)}.{expr.attr}" if isinstance(expr, ast.Attribute) else \
            expr.id if isinstance(expr, ast.Name) else ""

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and (dotted(f.value) in aliases
                                                                       or dotted(f.value) in DIST_MODULES):
            found.append((node.lineno, f.attr))
        elif isinstance(f, ast.Name) and f.id in direct:
            found.append((node.lineno, f.id))
    return found


def test_the_scan_finds_a_collective_however_it_is_imported():
    assert collective_calls("import torch\ntorch.distributed.all_reduce(t)") == [(2, "all_reduce")]
    assert collective_calls("import torch.distributed as d\nd.barrier()") == [(2, "barrier")]
    assert collective_calls("from torch import distributed as dd\ndd.broadcast(t, 0)") == [(2, "broadcast")]
    assert collective_calls("from torch.distributed import all_gather as ag\nag(x, t)") == [(2, "ag")]
    assert collective_calls("from deepspeed import comm\ncomm.all_reduce(t)") == [(2, "all_reduce")]
    assert collective_calls("import torch.distributed as dist\ndist.get_rank()\nx.all_reduce(t)") == []


def test_no_module_but_the_collectives_module_calls_a_collective():
    """NCCL reduces only tensors on the GPU and the CPU tests run gloo, which takes any: a collective written
    outside distssl/distributed/collectives.py would pass every test here and fail on a GPU cluster
    (distssl-predict's sum of a CPU tensor did, at the end of a job, after its parts were written)."""
    package = Path(c.__file__).parents[1]
    strays = [f"{p.relative_to(package.parent)}:{line} {name}" for p in sorted(package.rglob("*.py"))
              if p != Path(c.__file__) for line, name in collective_calls(p.read_text())]
    assert not strays, f"collectives outside distssl/distributed/collectives.py: {strays}"
