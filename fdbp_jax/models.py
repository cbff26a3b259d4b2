"""Models as flat sequences of blocks (stem, residual blocks, head), so they can be cut into K
contiguous stages: CIFAR ResNet-20/32/44/56/110 (He et al. 2016), WRN-28-10 (Zagoruyko & Komodakis
2016; its head here omits the final BN-ReLU of the original), a small fast CNN and a ViT (`vit.py`)."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fdbp_jax.stages import Stage
from fdbp_jax.vit import cifar_vit

RESNET_DEPTHS = (20, 32, 44, 56, 110)


class ConvBN(nn.Module):
    """3x3 conv, BatchNorm, ReLU."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity shortcut; on downsampling the shortcut subsamples and
    zero-pads channels (He et al.'s option A for CIFAR, no extra parameters)."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = ConvBN(self.features, self.strides)(x, train)
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, scale_init=nn.initializers.zeros)(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = x[:, :: self.strides, :: self.strides]
            extra = self.features - x.shape[-1]
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(y + shortcut)


class WideBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis 2016), 1x1 conv shortcut on a change."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
        h = nn.relu(bn()(x))
        y = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False)(h)
        y = nn.Conv(self.features, (3, 3), use_bias=False)(nn.relu(bn()(y)))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(h)
        return x + y


class Head(nn.Module):
    """Global average pool and the classifier."""

    classes: int = 10

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


class Blocks(nn.Module):
    """A contiguous run of blocks: one pipeline stage."""

    blocks: Sequence[nn.Module]

    @nn.compact
    def __call__(self, x, train: bool = False):
        for block in self.blocks:
            x = block(x, train) if Stage(block).takes_train else block(x)
        return x


def small_cnn(classes: int) -> list[nn.Module]:
    """Five conv-BN-ReLU blocks and the head: the quick preset's model."""
    widths = [(16, 1), (32, 2), (32, 1), (64, 2), (64, 1)]
    return [ConvBN(w, s) for w, s in widths] + [Head(classes)]


def wide_resnet28_10(classes: int) -> list[nn.Module]:
    blocks: list[nn.Module] = [nn.Conv(16, (3, 3), use_bias=False)]
    for group, width in enumerate((160, 320, 640)):
        blocks += [WideBlock(width, 2 if group > 0 and i == 0 else 1) for i in range(4)]
    return blocks + [Head(classes)]


def cifar_resnet(depth: int) -> Callable[[int], list[nn.Module]]:
    """ResNet-`depth` for CIFAR: a stem, three groups of (depth - 2) / 6 basic blocks, the head."""

    def build(classes: int) -> list[nn.Module]:
        per_group = (depth - 2) // 6
        blocks: list[nn.Module] = [ConvBN(16)]
        for group, width in enumerate((16, 32, 64)):
            blocks += [BasicBlock(width, 2 if group > 0 and i == 0 else 1) for i in range(per_group)]
        return blocks + [Head(classes)]

    return build


# the registry: model name -> its block sequence for a number of classes
MODELS: dict[str, Callable[[int], list[nn.Module]]] = {
    **{f"resnet{depth}": cifar_resnet(depth) for depth in RESNET_DEPTHS}, "wrn28_10": wide_resnet28_10, "cnn": small_cnn,
    "vit": cifar_vit,
}


def model_blocks(name: str, classes: int = 10) -> list[nn.Module]:
    """The flat block sequence of a registered model."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")
    return MODELS[name](classes)
