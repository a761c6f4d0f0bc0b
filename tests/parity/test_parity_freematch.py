"""FreeMatch against USB's: thresholds, the fairness loss (its sign and an empty class)."""
import torch

from distssl.ssl.freematch import FreeMatch, fairness_loss
from support.parity import STEPS, AtStepStart, C, Net, USBNet, assert_losses, batch, close, ours_step


def test_parity_freematch(ref):
    net, m = Net(), 0.7
    ours = FreeMatch(C, tau=0.95, lambda_u=1.0, momentum=m, fairness_weight=0.01)
    theirs = ref.make("freematch", num_classes=C, model=USBNet(net), T=0.5, use_hard_label=True, ema_p=m,
                      use_quantile=False, clip_thresh=False, lambda_e=0.01, args={"ema_p": m})
    for t in range(STEPS):
        b = batch(t)
        step = AtStepStart(theirs, ("MaskingHook", "update"))
        _, log = step.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
        hook = step.frozen.hooks_dict["MaskingHook"]
        loss, stats = ours_step(ours, net, b, t, 100)
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["mask_rate"], log["train/util_ratio"])
        if "loss_fair" in stats:  # the fairness term alone, against USB's entropy_loss on the same state
            mask = (b["weak"].flatten(1) @ net.w).softmax(1).max(1).values.ge(
                hook.time_p * (hook.p_model / hook.p_model.max())[(b["weak"].flatten(1) @ net.w).argmax(1)]).float()
            want, _ = ref.freematch.entropy_loss(mask, (b["strong"].flatten(1) @ net.w), hook.p_model, hook.label_hist)
            assert close(stats["loss_fair"], want)
        step.commit()
        state = theirs.hooks_dict["MaskingHook"]
        assert close(ours.time_p, state.time_p) and close(ours.p_model, state.p_model), f"thresholds after step {t}"
        assert close(ours.label_hist, state.label_hist), f"label histogram after step {t}"


def test_parity_freematch_fairness_when_a_class_was_never_predicted(ref):
    """A zero in the EMA histogram (momentum 0, or underflow): the class leaves the target, as in USB."""
    g = torch.Generator().manual_seed(3)
    logits_s, mask = torch.randn(12, C, generator=g) * 3, (torch.rand(12, generator=g) > 0.3).float()
    p_model = torch.softmax(torch.randn(C, generator=g), 0)
    label_hist = torch.tensor([0.4, 0.0, 0.3, 0.3, 0.0])
    want, _ = ref.freematch.entropy_loss(mask, logits_s, p_model, label_hist)
    assert close(fairness_loss(logits_s, mask, p_model, label_hist), want)
