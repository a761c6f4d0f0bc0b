"""VAT against USB's: the adversarial direction from a shared random start."""
import functools

import torch
import torch.nn.functional as F

from distssl.ssl.vat import VAT
from support.parity import C, Net, USBNet, batch, close, ours_step


def test_parity_vat(ref, monkeypatch):
    """USB's random start, drawn from torch's global generator, is the one ours uses (shared, as the module
    says); both sides take xi = 1e-2 (USB's train_step passes no xi, so its vat_loss is given it), since at the
    default 1e-6 a float32 finite difference of these inputs is rounding. USB's .cuda() calls are the
    identity on this CPU."""
    net, weight, it, eps, xi = Net(), 0.3, 60, 6.0, 1e-2
    ours = VAT(C, tau=0.95, lambda_u=1.0, weight=weight, rampup=0.4, eps=eps, xi=xi, entropy_weight=0.06)
    theirs = ref.make("vat", num_classes=C, model=USBNet(net), lambda_u=weight, it=it, num_train_iter=100,
                      unsup_warm_up=0.4, vat_eps=eps, vat_embed=False, lambda_ent=0.06)
    theirs.vat_loss = functools.partial(theirs.vat_loss, xi=xi)
    b = batch(it, views=("weak",))
    torch.manual_seed(11)
    start = torch.Tensor(b["weak"].size()).normal_()
    monkeypatch.setattr("distssl.ssl.vat.random_directions", lambda shape, *a, **k: start.clone())
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    loss, stats = ours_step(ours, net, b, it, 100)
    torch.manual_seed(11)
    _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"])
    assert close(stats["loss_x"], log["train/sup_loss"]) and close(stats["loss_u"], log["train/unsup_loss"])
    assert close(stats["loss_entropy"], log["train/loss_entmin"])
    assert close(loss, log["train/total_loss"])  # past the warm-up both ramps are 1
    at_start = b["weak"] + eps * start / start.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    no_attack = F.kl_div((at_start.flatten(1) @ net.w).log_softmax(1), (b["weak"].flatten(1) @ net.w).log_softmax(1),
                         log_target=True, reduction="batchmean")  # KL(p(x) || p(x + eps d0 / |d0|))
    assert float(stats["loss_u"]) > float(no_attack.detach())  # the power iteration found a worse direction
