"""PyTorch versions of the isomax_jax backbones, for parity tests (written for this project).

Each model has its backbone layers at the top level and the reference head
(``robust_deep_learning``'s ``*LossFirstPart``) as ``classifier``, so ``state_dict()`` keys are
those of the reference code (``conv1.weight``, ``layer1.0.bn1.running_mean``,
``block1.layer.0.conv1.weight``, ``classifier.prototypes``, ...). ``forward`` returns logits;
``features`` returns the pooled features. Inputs are NCHW.

Usage: ``build("resnet34", num_classes=10, head="isomax")``.
"""

from __future__ import annotations

import math

import robust_deep_learning as rdl
import torch
import torch.nn.functional as F
from torch import nn

HEADS = {
    "softmax": rdl.SoftMaxLossFirstPart,
    "isomax": rdl.IsoMaxLossFirstPart,
    "isomax_plus": rdl.IsoMaxPlusLossFirstPart,
    "dismax": rdl.DisMaxLossFirstPart,
}


def _conv(cin, cout, k, stride=1, bias=False):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)


class _Classifier(nn.Module):
    def forward(self, x):
        return self.classifier(self.features(x))

    def _init(self, zero_init_last_bn=False):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, shortcut):
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv(cout, cout, 3)
        self.bn2 = nn.BatchNorm2d(cout)
        self.kind = None
        if stride != 1 or cin != cout:
            self.kind = shortcut
            self.stride = stride
            if shortcut == "projection":
                self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
            else:
                self.pad = cout // 4

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.kind == "projection":
            x = self.shortcut(x)
        elif self.kind == "zero_pad":
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + x)


class ResNet(_Classifier):
    def __init__(self, stages, widths, stem_width, stem_stride, shortcut, zero_init, head):
        super().__init__()
        self.conv1 = _conv(3, stem_width, 3, stem_stride)
        self.bn1 = nn.BatchNorm2d(stem_width)
        cin = stem_width
        for i, (blocks, width) in enumerate(zip(stages, widths, strict=True)):
            layers = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, width, stride, shortcut))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(stages)
        self.classifier = head(cin)
        self._init(zero_init)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class Bottleneck(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv(cin, 4 * growth, 1)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = _conv(4 * growth, growth, 3)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class DenseStage(nn.Module):
    def __init__(self, layers, cin, growth):
        super().__init__()
        self.layer = nn.Sequential(*[Bottleneck(cin + i * growth, growth) for i in range(layers)])

    def forward(self, x):
        return self.layer(x)


class TransitionBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv(cin, cout, 1)

    def forward(self, x):
        return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)


class DenseNet(_Classifier):
    def __init__(self, depth, growth, compression, head):
        super().__init__()
        n = (depth - 4) // 6
        c = 2 * growth
        self.conv1 = _conv(3, c, 3)
        for i in range(3):
            setattr(self, f"block{i + 1}", DenseStage(n, c, growth))
            c += n * growth
            if i < 2:
                cout = int(math.floor(c * compression))
                setattr(self, f"trans{i + 1}", TransitionBlock(c, cout))
                c = cout
        self.bn1 = nn.BatchNorm2d(c)
        self.classifier = head(c)
        self._init()

    def features(self, x):
        x = self.conv1(x)
        x = self.trans1(self.block1(x))
        x = self.trans2(self.block2(x))
        x = F.relu(self.bn1(self.block3(x)))
        return F.avg_pool2d(x, 8).flatten(1)


class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv(cin, cout, 3, bias=True)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv(cout, cout, 3, stride, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride, bias=True))

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(_Classifier):
    def __init__(self, depth, widen, head):
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = _conv(3, 16, 3, bias=True)
        cin = 16
        for i, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(cin)
        self.classifier = head(cin)
        self._init()

    def features(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return F.avg_pool2d(F.relu(self.bn1(x)), 8).flatten(1)


def build(name: str, *, num_classes: int, head: str, temperature: float = 1.0) -> nn.Module:
    """The PyTorch twin of ``isomax_jax.models.get_model(name, num_classes=..., head=...)``."""

    def make_head(dim):
        return HEADS[head](dim, num_classes, temperature=temperature)

    if name == "densenet_bc100":
        return DenseNet(100, 12, 0.5, make_head)
    if name == "resnet34":
        return ResNet((3, 4, 6, 3), (64, 128, 256, 512), 64, 1, "projection", True, make_head)
    if name == "resnet110":
        return ResNet((18, 18, 18), (16, 32, 64), 16, 1, "zero_pad", False, make_head)
    if name == "small_resnet":
        return ResNet((1, 1, 1), (32, 64, 128), 32, 2, "zero_pad", False, make_head)
    if name == "wrn28_10":
        return WideResNet(28, 10, make_head)
    raise ValueError(f"unknown model {name!r}")


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (BN scale/bias and running statistics too), in place.

    Scales keep activations O(1) through deep nets so relative comparisons are meaningful.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                module.num_batches_tracked.fill_(7)
            elif isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
                module.weight.mul_(math.sqrt(1.0 / fan_in))
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
        for pname, param in model.classifier.named_parameters():
            if pname == "temperature":
                continue
            param.copy_(torch.randn(param.shape, generator=gen) * (0.1 if pname != "bias" else 1))
            if pname == "distance_scale":
                param.copy_(1.0 + torch.rand(param.shape, generator=gen))
    return model
