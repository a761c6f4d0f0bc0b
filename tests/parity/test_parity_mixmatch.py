"""MixMatch against USB's: guesses, MixUp with a shared lambda' and permutation."""
import pytest
import torch

from distssl.ssl.mixmatch import MixMatch
from support.parity import C, Net, USBNet, assert_losses, batch, ours_step, shared_mixup


@pytest.mark.parametrize("it", [1, 30])  # USB's 1/64-of-the-run warm-up at 100 steps ends at step 1.6
def test_parity_mixmatch(ref, monkeypatch, it):
    net, weight, alpha = Net(), 75.0, 0.75
    ours = MixMatch(C, tau=0.95, lambda_u=1.0, k=2, temperature=0.5, alpha=alpha, weight=weight, rampup=1 / 64)
    theirs = ref.make("mixmatch", num_classes=C, model=USBNet(net), lambda_u=weight, it=it, num_train_iter=100,
                      T=0.5, unsup_warm_up=1 / 64, mixup_alpha=alpha, mixup_manifold=False)
    b = batch(it, views=("weak", "weak_2"), n_lb=8, n_ulb=8)
    gen = torch.Generator().manual_seed(21)
    with monkeypatch.context() as patched:
        shared_mixup(patched, gen, 8 * 3, alpha)
        _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"], b["weak_2"])
    loss, stats = ours_step(ours, net, b, it, 100, generator=gen)
    assert_losses(loss, stats, log, f"it {it}")
