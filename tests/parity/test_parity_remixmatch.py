"""ReMixMatch against USB's: the weak view mixed too, the pre-mixup and rotation losses, DA."""
import pytest
import torch

from distssl.ssl.distalign import DistributionAlignment, target_from_histogram
from distssl.ssl.remixmatch import ReMixMatch, rotate_quarters
from support.parity import AtStepStart, C, Net, USBNet, assert_losses, batch, close, ours_step, shared_mixup


@pytest.mark.parametrize("it", [1, 30])
def test_parity_remixmatch(ref, monkeypatch, it):
    """K = 2 (USB's): the labeled batch, both strong views and the weak one mixed, the first strong view's
    unmixed loss, the rotation loss; DA towards the labeled distribution (USB's 'gt')."""
    net, alpha = Net(), 0.75
    labels = [0, 0, 1, 2, 2, 3, 4, 4, 1, 3]
    hist = torch.bincount(torch.tensor(labels), minlength=C).float()
    da = DistributionAlignment(C, momentum=0.999, p_target=target_from_histogram(hist))
    ours = ReMixMatch(C, tau=0.95, lambda_u=1.0, da=da, k=2, temperature=0.5, alpha=alpha, weight=1.5,
                      pre_mixup_weight=0.5, rotation_weight=0.5, rampup=1 / 64)
    theirs = ref.make("remixmatch", num_classes=C, model=USBNet(net), lambda_u=1.5, it=it, num_train_iter=100,
                      T=0.5, unsup_warm_up=1 / 64, mixup_alpha=alpha, mixup_manifold=False, lambda_kl=0.5,
                      lambda_rot=0.5, use_rot=True, dataset_dict={"train_lb": type("Set", (), {"targets": labels})})
    for step in range(2):
        b = batch(10 * it + step, views=("weak", "strong", "strong_2"), n_lb=6, n_ulb=6)
        gen = torch.Generator().manual_seed(31 + step)
        usb_step = AtStepStart(theirs, ("DistAlignHook", "update_p"))
        with monkeypatch.context() as patched:
            replay = shared_mixup(patched, gen, 6 * 4, alpha)
            quarters = torch.randint(0, 4, (6,), generator=replay)  # the rotations ours draws next
            _, log = usb_step.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"], b["strong_2"],
                                         rotate_quarters(b["strong"], quarters), quarters)
        loss, stats = ours_step(ours, net, b, it, 100, generator=gen)
        assert_losses(loss, stats, log, f"it {it}, step {step}")
        usb_step.commit()
        assert close(ours.da.p_model, theirs.hooks_dict["DistAlignHook"].p_model)
