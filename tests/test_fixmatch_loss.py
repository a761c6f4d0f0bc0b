import math

import pytest
import torch
import torch.nn.functional as F

from distssl.ssl.fixmatch import fixmatch_loss


def test_loss_is_labeled_ce_plus_masked_unlabeled_ce_over_whole_batch():
    torch.manual_seed(0)
    logits_x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    logits_s = torch.randn(6, 3)
    probs_w = torch.tensor([[0.97, 0.02, 0.01], [0.1, 0.85, 0.05], [0.0, 0.01, 0.99],
                            [0.5, 0.25, 0.25], [0.02, 0.96, 0.02], [0.3, 0.3, 0.4]])
    loss, stats = fixmatch_loss(logits_x, y, logits_s, probs_w, tau=0.95, lambda_u=2.0)
    mask = torch.tensor([1.0, 0, 1, 0, 1, 0])
    pseudo = torch.tensor([0, 1, 2, 0, 1, 2])
    expected_u = (F.cross_entropy(logits_s, pseudo, reduction="none") * mask).sum() / 6
    expected = F.cross_entropy(logits_x, y) + 2.0 * expected_u
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["mask_rate"] == pytest.approx(0.5)
    assert stats["loss_u"] == pytest.approx(expected_u.item(), rel=1e-6)


def test_gradient_flows_only_through_labeled_and_strong_logits():
    logits_x = torch.randn(2, 4, requires_grad=True)
    logits_s = torch.randn(3, 4, requires_grad=True)
    probs_w = torch.softmax(torch.randn(3, 4) * 10, 1).requires_grad_()
    loss, _ = fixmatch_loss(logits_x, torch.tensor([0, 1]), logits_s, probs_w, tau=0.0, lambda_u=1.0)
    loss.backward()
    assert logits_x.grad.abs().sum() > 0 and logits_s.grad.abs().sum() > 0
    assert probs_w.grad is None


def test_lambda_zero_is_supervised_only():
    logits_x, y = torch.randn(3, 5), torch.tensor([1, 2, 3])
    loss, _ = fixmatch_loss(logits_x, y, torch.randn(4, 5), torch.full((4, 5), 0.2), tau=0.1, lambda_u=0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits_x, y).item())


def test_pseudo_label_accuracy_counts_masked_known_samples_only():
    probs_w = torch.tensor([[0.99, 0.01], [0.99, 0.01], [0.01, 0.99], [0.6, 0.4]])
    true_u = torch.tensor([0, 1, 1, 0])
    _, stats = fixmatch_loss(torch.randn(1, 2), torch.tensor([0]), torch.randn(4, 2), probs_w,
                             tau=0.95, lambda_u=1.0, true_u=true_u)
    assert stats["pseudo_acc"] == pytest.approx(2 / 3)  # masked: 0 ok, 1 wrong, 2 ok
    assert stats["pseudo_acc_all"] == pytest.approx(3 / 4)
    _, stats = fixmatch_loss(torch.randn(1, 2), torch.tensor([0]), torch.randn(4, 2), probs_w,
                             tau=0.95, lambda_u=1.0, true_u=torch.full((4,), -1))
    assert math.isnan(stats["pseudo_acc"])


def test_empty_unlabeled_batch_gives_the_supervised_loss_not_nan():
    logits_x, y = torch.randn(3, 5), torch.tensor([1, 2, 3])
    loss, stats = fixmatch_loss(logits_x, y, torch.zeros(0, 5), torch.zeros(0, 5), tau=0.95, lambda_u=1.0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits_x, y).item())
    assert math.isnan(stats["mask_rate"])


def test_step_stats_stay_on_the_device_until_the_log_interval_reads_them_back_at_once():
    """The loss's stats are tensors (no host sync per step); averaging micro-batches and steps keeps NaN out
    (no masked pseudo-label in a step), and one read-back gives floats."""
    from distssl.train.progress import nanmean_by_key, read_back

    steps = [{"loss": torch.tensor(2.0), "pseudo_acc": torch.tensor(float("nan")), "lr": 0.1},
             {"loss": torch.tensor(1.0), "pseudo_acc": torch.tensor(0.5), "lr": 0.1},
             {"loss": torch.tensor(3.0), "pseudo_acc": float("nan"), "lr": 0.2}]
    means = nanmean_by_key({k: [s[k] for s in steps] for k in steps[0]})
    assert isinstance(means["loss"], torch.Tensor) and isinstance(means["lr"], float)
    got = read_back(means)
    assert got == {"loss": 2.0, "pseudo_acc": 0.5, "lr": pytest.approx(0.4 / 3)}
    assert all(isinstance(v, float) for v in got.values())
    none = read_back(nanmean_by_key({"pseudo_acc": [torch.tensor(float("nan"))]}))
    assert math.isnan(none["pseudo_acc"])
