"""UDA against USB's (with the paper's sharpening) and training-signal annealing against the paper's code."""
import math

import pytest
import torch
import torch.nn.functional as F

from distssl.ssl.uda import UDA
from support.parity import STEPS, C, Net, USBNet, assert_losses, batch, close, ours_step


def paper_sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """UDA's sharpening as its paper writes it (Xie et al. 2020, section 3.2): softmax(z / T), i.e. p^(1/T)
    renormalised."""
    q = p ** (1 / temperature)
    return q / q.sum(dim=-1, keepdim=True)


def test_parity_uda(ref, monkeypatch):
    """USB's UDA never sharpens: it asks for targets with softmax=False, which returns the probabilities as
    they are, whatever T. The test follows the paper: USB's pseudo-label hook given the paper's sharpening."""
    net = Net()
    ours = UDA(C, tau=0.95, lambda_u=1.0, temperature=0.4, threshold=0.8, tsa="none")
    theirs = ref.make("uda", num_classes=C, model=USBNet(net), T=0.4, p_cutoff=0.8, tsa_schedule="none")
    hook = theirs.hooks_dict["PseudoLabelingHook"]
    usb_targets = hook.gen_ulb_targets
    monkeypatch.setattr(hook, "gen_ulb_targets", lambda alg, logits, use_hard_label=True, T=1.0, softmax=True, **k:
                        paper_sharpen(usb_targets(alg, logits, use_hard_label, T, softmax, **k), T))
    for t in range(STEPS):
        b = batch(t)
        loss, stats = ours_step(ours, net, b, t, 100)
        _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["mask_rate"], log["train/util_ratio"])


@pytest.mark.parametrize("schedule", ["linear", "log", "exp"])
def test_parity_uda_training_signal_annealing_follows_the_papers_code(schedule):
    """TSA as google-research/uda's main.py has it: a labeled sample leaves the loss when the probability of
    its *correct* class exceeds eta_t, and the kept samples' loss is summed and divided by their count (at
    least 1). USB tests the largest probability and averages over the whole batch; the paper's code is followed."""
    g = torch.Generator().manual_seed(5)
    logits, y = torch.randn(16, C, generator=g) * 3, torch.randint(0, C, (16,), generator=g)
    ours = UDA(C, tau=0.95, lambda_u=1.0, tsa=schedule)
    for step in (0, 30, 70, 100):
        t = step / 100
        alpha = {"linear": t, "log": 1 - math.exp(-5 * t), "exp": math.exp(5 * (t - 1))}[schedule]
        eta = alpha * (1 - 1 / C) + 1 / C
        correct = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
        keep = (correct <= eta).float()
        want = (F.cross_entropy(logits, y, reduction="none") * keep).sum() / keep.sum().clamp_min(1)
        loss, _ = ours.labeled_loss(logits, y, step, 100)
        assert close(loss, want)
