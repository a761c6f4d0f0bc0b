"""SoftMatch against USB's: weights from aligned probabilities, pseudo-labels from raw ones."""

from distssl.ssl.distalign import DistributionAlignment
from distssl.ssl.softmatch import SoftMatch
from support.parity import STEPS, AtStepStart, C, Net, USBNet, assert_losses, batch, close, ours_step


def test_parity_softmatch(ref):
    """SoftMatch with uniform alignment (USB's defaults): the weights from the aligned probabilities, the
    pseudo-labels from the raw ones; mean and variance, and DA's p_model, move with the same momentum."""
    net, m = Net(), 0.7
    ours = SoftMatch(C, tau=0.95, lambda_u=1.0, momentum=m, n_sigma=2.0, da=DistributionAlignment(C, momentum=m))
    theirs = ref.make("softmatch", num_classes=C, model=USBNet(net), T=0.5, use_hard_label=True, ema_p=m,
                      args={"ema_p": m, "n_sigma": 2, "per_class": False, "dist_uniform": True})
    relabelled = 0
    for t in range(STEPS):
        b = batch(t)
        step = AtStepStart(theirs, ("MaskingHook", "update"), ("DistAlignHook", "update_p"))
        _, log = step.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
        if ours.da.p_model is not None:  # samples whose aligned argmax is not their raw one: the labels differ
            raw = (b["weak"].flatten(1) @ net.w).softmax(1)
            relabelled += int((ours.da.align_with_current(raw).argmax(1) != raw.argmax(1)).sum())
        loss, stats = ours_step(ours, net, b, t, 100)
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["weight_mean"], log["train/util_ratio"])  # USB logs the mean weight as util_ratio
        step.commit()
        hook = theirs.hooks_dict["MaskingHook"]
        assert close(ours.mu, hook.prob_max_mu_t) and close(ours.var, hook.prob_max_var_t), f"mu, var after step {t}"
        assert close(ours.da.p_model, theirs.hooks_dict["DistAlignHook"].p_model), f"p_model after step {t}"
    assert relabelled > 0  # alignment moved some argmax: labels from the aligned probabilities would differ
