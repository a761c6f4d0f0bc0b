"""FlexMatch against USB's: the learning status and class thresholds after every step."""
import pytest
import torch

from distssl.ssl.flexmatch import FlexMatch
from support.parity import STEPS, C, Net, USBNet, assert_losses, batch, close, ours_step


@pytest.mark.parametrize("warmup", [True, False])
def test_parity_flexmatch(ref, warmup):
    """No departure: USB's FlexMatch masks with the status as of the step's start too."""
    net, n = Net(), 40
    ours = FlexMatch(C, tau=0.95, lambda_u=1.0, num_unlabeled=n, warmup=warmup)
    theirs = ref.make("flexmatch", num_classes=C, model=USBNet(net), p_cutoff=0.95, T=0.5, use_hard_label=True,
                      args={"ulb_dest_len": n, "thresh_warmup": warmup})
    for t in range(STEPS + 2):
        b = batch(t, n_total=n)
        loss, stats = ours_step(ours, net, b, t, 100)
        _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["ids"], b["weak"], b["strong"])
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["mask_rate"], log["train/util_ratio"])
        hook = theirs.hooks_dict["MaskingHook"]
        assert torch.equal(ours.status, hook.selected_label), f"learning status after step {t}"
        acc = hook.classwise_acc
        assert close(ours.thresholds, 0.95 * acc / (2 - acc)), f"class thresholds after step {t}"
    assert (ours.status >= 0).any() and (ours.status < 0).any()
