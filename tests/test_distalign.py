import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distssl.ssl.distalign import DistributionAlignment, align, target_from_histogram, update_running_mean


def test_align_multiplies_by_target_over_model_and_renormalises():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    p_model = torch.tensor([0.5, 0.25, 0.25])
    p_target = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    out = align(probs, p_model, p_target)
    raw = probs * p_target / p_model
    torch.testing.assert_close(out, raw / raw.sum(1, keepdim=True))
    torch.testing.assert_close(out.sum(1), torch.ones(2))
    # a model that already predicts the target is left alone
    torch.testing.assert_close(align(probs, p_target, p_target), probs)


def test_running_mean_starts_at_first_batch_then_moves_by_one_minus_momentum():
    a, b = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])
    p = update_running_mean(None, a, 0.9)
    torch.testing.assert_close(p, a)
    torch.testing.assert_close(update_running_mean(p, b, 0.9), 0.9 * a + 0.1 * b)


def test_labeled_target_follows_histogram_and_rejects_empty():
    torch.testing.assert_close(target_from_histogram([1, 3]), torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="histogram"):
        target_from_histogram([0, 0])


def test_da_pushes_skewed_predictions_towards_the_target():
    da = DistributionAlignment(2, momentum=0.0)
    probs = torch.tensor([[0.9, 0.1]] * 8)
    out = da(probs)
    torch.testing.assert_close(out.mean(0), torch.tensor([0.5, 0.5]))
    state = da.state_dict()
    da2 = DistributionAlignment(2)
    da2.load_state_dict(state)
    torch.testing.assert_close(da2.p_model, da.p_model)


def _global_batches(steps=5, n=12, c=4):
    g = torch.Generator().manual_seed(0)
    return [torch.softmax(torch.randn(n, c, generator=g) * 3, 1) for _ in range(steps)]


def _da_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    da = DistributionAlignment(4, momentum=0.7)
    aligned = []
    for batch in _global_batches():
        local = batch.chunk(world)[rank]
        aligned.append(da(local))
    torch.save({"p_model": da.p_model, "aligned": torch.cat(aligned)}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_give_the_one_rank_result_on_the_same_global_batch(tmp_path):
    from conftest import free_port

    single = DistributionAlignment(4, momentum=0.7)
    ref_aligned = [single(b) for b in _global_batches()]
    mp.spawn(_da_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(r0["p_model"], r1["p_model"], rtol=0, atol=0)  # every rank holds the same
    torch.testing.assert_close(r0["p_model"], single.p_model, rtol=1e-6, atol=1e-7)
    # each rank's aligned half equals the 1-rank result for those rows
    halves = [torch.cat([b.chunk(2)[r] for b in ref_aligned]) for r in (0, 1)]
    torch.testing.assert_close(r0["aligned"], halves[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r1["aligned"], halves[1], rtol=1e-5, atol=1e-6)


def test_align_now_update_once_is_the_same_for_one_batch_or_its_halves():
    """What an accumulating step does: align each micro-batch with the step's p_model, then one
    update with all of them; the halves must give what the whole batch gives."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(8, 4), dim=1)
    whole, halves = (DistributionAlignment(4, momentum=0.9, reduce=lambda t: t) for _ in range(2))
    assert torch.equal(whole.align_with_current(probs), probs)  # no p_model yet: nothing to align to
    for da in (whole, halves):
        da.update(torch.softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), dim=1))
    aligned_whole = whole.align_with_current(probs)
    aligned_halves = torch.cat([halves.align_with_current(h) for h in probs.chunk(2)])
    torch.testing.assert_close(aligned_whole, aligned_halves)
    assert not torch.allclose(aligned_whole, probs)
    whole.update(probs)
    halves.update(torch.cat(list(probs.chunk(2))))
    torch.testing.assert_close(whole.p_model, halves.p_model)
    # __call__ keeps ReMixMatch's order: update with this batch, then align with the new p_model
    da = DistributionAlignment(4, momentum=0.9, reduce=lambda t: t)
    da.update(probs)
    after = DistributionAlignment(4, momentum=0.9, reduce=lambda t: t)
    after.update(probs)
    out = after(probs)
    da.update(probs)
    torch.testing.assert_close(out, da.align_with_current(probs))
