"""WRN-28-2, the FixMatch paper's CIFAR backbone, registered as a timm model (``wrn28_2``).

Follows the paper's reference code: pre-activation wide residual blocks, BatchNorm momentum 0.001
(PyTorch convention; 0.999 in TensorFlow's), LeakyReLU(0.1), no dropout. Registered so that every
timm entry point works on it: ``timm.create_model("wrn28_2", num_classes=10)``, pretrained
loading through ``pretrained_cfg_overlay=dict(file=...)``, ``set_grad_checkpointing``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.001)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The paper's TensorFlow block: the first block of the network takes its shortcut from the
        # activated input, every other block from the raw input.
        act = F.leaky_relu(self.bn1(x), 0.1)
        residual = act if self.activate_before_residual else x
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(act)), 0.1))
        return out + (self.shortcut(residual) if self.shortcut is not None else residual)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen_factor: int = 2, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, **_ignored):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes, self.num_features, self.drop_rate = num_classes, widths[3], drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [_Block(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1,
                             activate_before_residual=(i == 0 and j == 0)) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(widths[3], momentum=0.001)
        self.fc = nn.Linear(widths[3], num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return F.leaky_relu(self.bn(x), 0.1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        if self.drop_rate:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    # No hosted weights: "pretrained" means a local file given by pretrained_cfg_overlay=dict(file=...).
    "wrn28_2.untrained": {
        "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "first_conv": "conv1", "classifier": "fc",
    },
})


@register_model
def wrn28_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-2 (1.5M parameters), FixMatch's CIFAR-10 backbone."""
    return build_model_with_cfg(WideResNet, "wrn28_2", pretrained, depth=28, widen_factor=2, **kwargs)
