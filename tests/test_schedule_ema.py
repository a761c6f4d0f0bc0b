import math

import pytest
import torch

from distssl.train.ema import EMA, ema_decay_at
from distssl.train.schedule import lr_factor


def test_cosine_schedule_is_fixmatch_7_16():
    assert lr_factor(0, 1000) == 1.0
    assert lr_factor(500, 1000) == pytest.approx(math.cos(7 * math.pi * 500 / (16 * 1000)))
    assert lr_factor(1000, 1000) == pytest.approx(math.cos(7 * math.pi / 16))
    assert lr_factor(5000, 1000) == pytest.approx(math.cos(7 * math.pi / 16))  # never past K


def test_warmup_is_linear_then_cosine_over_the_rest():
    assert lr_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(100, 100, warmup_steps=10) == pytest.approx(math.cos(7 * math.pi / 16))


def test_ema_decay_warms_up_then_caps():
    assert ema_decay_at(0, 0.999, True) == 0.0
    assert ema_decay_at(100, 0.999, True) == pytest.approx(1 - 101 ** -0.75)
    assert ema_decay_at(10 ** 7, 0.999, True) == 0.999
    assert ema_decay_at(3, 0.999, False) == 0.999
    # a 1,000-step run must not evaluate mostly its initial weights
    w0 = math.prod(ema_decay_at(s, 0.999, True) for s in range(1, 1001))
    assert w0 < 1e-6


def test_ema_update_and_swap_restores_training_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.5, warmup=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))  # moves BN running stats
    ema.update(step=1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], 0.5 * start[n] + 0.5 * p.detach())
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_in():
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ema.shadow[n])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), trained[n])
    state = ema.state_dict()
    ema2 = EMA(model, decay=0.5, warmup=False)
    ema2.load_state_dict(state)
    for n in state["shadow"]:
        torch.testing.assert_close(ema2.shadow[n], ema.shadow[n])


def test_ema_averages_batchnorm_statistics_like_the_weights():
    # FixMatch's reference EMA covers every model variable: evaluating averaged weights with the live
    # model's latest statistics mixes two different models
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.5, warmup=False)
    bn = model[1]
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    model(torch.randn(8, 3) + 3.0)
    ema.update(step=1)
    torch.testing.assert_close(ema.buffers["1.running_mean"], 0.5 * mean0 + 0.5 * bn.running_mean)
    torch.testing.assert_close(ema.buffers["1.running_var"], 0.5 * var0 + 0.5 * bn.running_var)
    assert ema.buffers["1.num_batches_tracked"].item() == 1  # counters are copied, not averaged
    live = bn.running_mean.clone()
    with ema.swapped_in():
        torch.testing.assert_close(bn.running_mean, ema.buffers["1.running_mean"])
    torch.testing.assert_close(bn.running_mean, live)
