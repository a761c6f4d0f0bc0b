"""Pi-Model against USB's: the loss, the ramp's shape, the gradient through both views."""
import pytest
import torch
import torch.nn.functional as F

from distssl.ssl.pimodel import PiModel
from support.parity import C, Net, USBNet, batch, close, laine_aila, ours_step, usb_ramp


@pytest.mark.parametrize("it", [30, 60])  # inside USB's 0.4 x 100-step warm-up, then past it
def test_parity_pimodel(ref, it):
    net, weight = Net(), 10.0
    ours = PiModel(C, tau=0.95, lambda_u=1.0, weight=weight, rampup=0.4)
    theirs = ref.make("pimodel", num_classes=C, model=USBNet(net), lambda_u=weight, it=it, num_train_iter=100,
                      unsup_warm_up=0.4)
    b = batch(it, views=("weak", "weak_2"))
    loss, stats = ours_step(ours, net, b, it, 100)
    _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"], b["weak_2"])
    assert close(stats["loss_x"], log["train/sup_loss"]) and close(stats["loss_u"], log["train/unsup_loss"])
    linear = usb_ramp(log, weight)
    assert close(linear, min(1.0, it / 40))
    assert close(stats["consistency_weight"], weight * laine_aila(linear))  # the ramp's shape: a departure
    assert close(loss, stats["loss_x"] + weight * laine_aila(linear) * stats["loss_u"])


def test_parity_pimodel_gradient_reaches_both_views():
    """The departure in the gradient: the paper's Pi-Model trains both branches ("both branches get
    gradients"); USB detaches the weak view's softmax. d loss / d logits of each view, by the formula."""
    algo = PiModel(C, tau=0.95, lambda_u=1.0, weight=1.0, rampup=0.0)
    g = torch.Generator().manual_seed(2)
    a, b_ = torch.randn(6, C, generator=g, requires_grad=True), torch.randn(6, C, generator=g, requires_grad=True)
    from distssl.ssl.algorithm import Forwarded

    fw = Forwarded(logits_x=torch.zeros(1, C), targets_x=torch.tensor([0]), logits_u={"weak": a, "weak_2": b_})
    algo.consistency(fw)[0].backward()
    ga, gb = a.grad.clone(), b_.grad.clone()
    a2, b2 = a.detach().requires_grad_(), b_.detach().requires_grad_()
    F.mse_loss(a2.softmax(1), b2.softmax(1)).backward()  # the paper: both softmaxes carry gradient
    assert torch.allclose(ga, a2.grad) and torch.allclose(gb, b2.grad) and gb.abs().sum() > 0
