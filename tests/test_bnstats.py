import copy

import pytest
import timm
import torch

from distssl.train.bnstats import BatchStatsSharing


def _batch_stats(model, x):
    """Each BatchNorm layer's input mean and biased variance in a train-mode forward of x."""
    stats, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: stats.__setitem__(
                name, (inp[0].mean((0, 2, 3)), inp[0].var((0, 2, 3), unbiased=False)))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return stats


@pytest.fixture
def models():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).train()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative-average"])
def test_recorded_forward_is_an_ordinary_train_forward(models, momentum):
    model, plain = models
    for m in [*model.modules(), *plain.modules()]:
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    sharing = BatchStatsSharing(model)
    for step in range(2):  # the second step starts from moved statistics (and, cumulative, a count of 1)
        x = torch.randn(12, 3, 32, 32) + step
        with sharing.record():
            out = model(x)
        torch.testing.assert_close(out, plain(x))
        for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
            torch.testing.assert_close(a, b, msg=name)  # running statistics moved exactly as usual
        out.sum().backward()  # the buffers autograd saved were not touched afterwards


def test_replayed_forward_normalises_with_the_recorded_batch_and_changes_nothing(models):
    model, reference = models
    sharing = BatchStatsSharing(model)
    x, weak = torch.randn(12, 3, 32, 32), torch.randn(6, 3, 32, 32) * 2 + 1
    stats = _batch_stats(reference, x)  # what x's forward normalises with, layer by layer
    with sharing.record():
        model(x)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad(), sharing.replay():
        got = model(weak)
    # the same weights with each BatchNorm in eval mode on x's batch statistics
    for name, m in reference.named_modules():
        if name in stats:
            m.running_mean.copy_(stats[name][0])
            m.running_var.copy_(stats[name][1])
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "running" not in k}, strict=False)
    torch.testing.assert_close(got, reference.eval()(weak), atol=1e-4, rtol=1e-4)
    # its own forward in train mode would differ: the weak batch's statistics are not x's
    assert not torch.allclose(got, copy.deepcopy(model)(weak), atol=1e-3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)  # the replay moved no running statistics
    assert all(m.training for m in model.modules())


def test_replay_before_any_record_is_refused(models):
    with pytest.raises(RuntimeError, match="record"):
        with BatchStatsSharing(models[0]).replay():
            pass


def test_a_layer_kept_in_eval_mode_stays_so_and_keeps_its_statistics(models):
    model, _ = models
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()  # e.g. statistics frozen for fine-tuning
    mean, var = frozen.running_mean.clone(), frozen.running_var.clone()
    sharing = BatchStatsSharing(model)
    with sharing.record():
        model(torch.randn(8, 3, 32, 32))
    with torch.no_grad(), sharing.replay():
        model(torch.randn(4, 3, 32, 32))
    assert not frozen.training
    torch.testing.assert_close(frozen.running_mean, mean)
    torch.testing.assert_close(frozen.running_var, var)
