"""FixMatch, and FixMatch + distribution alignment, against USB's FixMatch (with its DistAlignEMAHook)."""
import torch

from distssl.ssl.distalign import DistributionAlignment, target_from_histogram
from distssl.ssl.fixmatch import FixMatch
from support.parity import STEPS, AtStepStart, C, Net, USBNet, assert_losses, batch, close, ours_step


def test_parity_fixmatch(ref):
    net = Net()
    ours = FixMatch(C, tau=0.95, lambda_u=1.0)
    theirs = ref.make("fixmatch", num_classes=C, model=USBNet(net), p_cutoff=0.95, T=0.5, use_hard_label=True)
    rates = []
    for t in range(STEPS):
        b = batch(t)
        loss, stats = ours_step(ours, net, b, t, 100)
        _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["mask_rate"], log["train/util_ratio"])
        rates.append(log["train/util_ratio"])
    assert 0 < min(rates) and max(rates) < 1  # the threshold separates: the masks were compared, not all-or-none


def test_parity_fixmatch_with_distribution_alignment(ref):
    """FixMatch + DA: USB's DistAlignEMAHook (p_target the labeled distribution, as ReMixMatch) on its FixMatch."""
    net, m = Net(), 0.7
    hist = torch.tensor([3.0, 1, 2, 2, 4])
    da = DistributionAlignment(C, momentum=m, p_target=target_from_histogram(hist))
    ours = FixMatch(C, tau=0.95, lambda_u=1.0, da=da)
    theirs = ref.make("fixmatch", num_classes=C, model=USBNet(net), p_cutoff=0.95, T=0.5, use_hard_label=True)
    theirs.register_hook(ref.hooks.DistAlignEMAHook(num_classes=C, momentum=m, p_target_type="gt",
                                                    p_target=hist / hist.sum()), "DistAlignHook")
    for t in range(STEPS):
        b = batch(t)
        step = AtStepStart(theirs, ("DistAlignHook", "update_p"))
        _, log = step.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
        loss, stats = ours_step(ours, net, b, t, 100)
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["mask_rate"], log["train/util_ratio"])
        step.commit()
        assert close(ours.da.p_model, theirs.hooks_dict["DistAlignHook"].p_model), f"p_model after step {t}"
