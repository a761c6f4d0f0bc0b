"""Mean Teacher against USB's: the EMA teacher's target."""
import pytest
import torch
import torch.nn.functional as F

from distssl.ssl.meanteacher import MeanTeacher
from distssl.train.ema import EMA
from support.parity import C, Net, USBNet, batch, close, laine_aila, ours_step, usb_ramp


@pytest.mark.parametrize("it", [30, 60])
def test_parity_meanteacher(ref, it):
    """The teacher is the EMA weights (ours: distssl.train.ema swapped in; USB: ema.apply_shadow)."""
    net, weight = Net(), 50.0
    ema = EMA(net, decay=0.9, warmup=False)
    ema.shadow["w"] = net.w.detach() + 0.3 * torch.randn(net.w.shape, generator=torch.Generator().manual_seed(9))

    class USBEma:  # USB's EMA object as Mean Teacher calls it
        def apply_shadow(self):
            self.saved = net.w.detach().clone()
            net.w.data.copy_(ema.shadow["w"])

        def restore(self):
            net.w.data.copy_(self.saved)

    ours = MeanTeacher(C, tau=0.95, lambda_u=1.0, weight=weight, rampup=0.4)
    theirs = ref.make("meanteacher", num_classes=C, model=USBNet(net), lambda_u=weight, it=it, num_train_iter=100,
                      unsup_warm_up=0.4, ema=USBEma())
    b = batch(it)
    loss, stats = ours_step(ours, net, b, it, 100, ema=ema)
    _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
    assert close(stats["loss_x"], log["train/sup_loss"]) and close(stats["loss_u"], log["train/unsup_loss"])
    linear = usb_ramp(log, weight)
    assert close(linear, min(1.0, it / 40)) and close(stats["consistency_weight"], weight * laine_aila(linear))
    student_only = F.mse_loss((b["strong"].flatten(1) @ net.w).softmax(1),
                              (b["weak"].flatten(1) @ ema.shadow["w"]).softmax(1))
    assert close(stats["loss_u"], student_only) and not close(student_only, F.mse_loss(
        (b["strong"].flatten(1) @ net.w).softmax(1), (b["weak"].flatten(1) @ net.w).softmax(1)))  # the teacher mattered
