"""The collectives' arithmetic that needs no process group: ZeRO-3's partition layout, and every
reduction being the identity in a world of one (the maths that calls them is tested on one rank)."""
import torch

from distssl.dist import collectives as c


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
