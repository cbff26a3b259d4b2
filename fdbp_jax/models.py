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
SPLIT_UNITS = ("block", "half-block")  # what a stage boundary may fall between: whole blocks, or block halves


class ConvBN(nn.Module):
    """3x3 conv, BatchNorm, ReLU."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))


def option_a_shortcut(x, features: int, strides: int):
    """He et al.'s option A for CIFAR: identity, or on downsampling subsample and zero-pad the channels."""
    if strides == 1 and x.shape[-1] == features:
        return x
    extra = features - x.shape[-1]
    return jnp.pad(x[:, ::strides, ::strides], ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


def second_conv(h, x, features: int, strides: int, train: bool):
    """A basic block's second half: 3x3 conv, BatchNorm (zero-initialised scale), the shortcut of the
    block's input `x` added, ReLU. Called inside a compact module, whose submodules it creates."""
    y = nn.Conv(features, (3, 3), use_bias=False)(h)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, scale_init=nn.initializers.zeros)(y)
    return nn.relu(y + option_a_shortcut(x, features, strides))


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity shortcut; on downsampling the shortcut subsamples and
    zero-pads channels (He et al.'s option A for CIFAR, no extra parameters)."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        return second_conv(ConvBN(self.features, self.strides)(x, train), x, self.features, self.strides, train)


class BasicBlockIn(nn.Module):
    """A basic block's first half: conv-BN-ReLU, handing on its output and the block's input (for the
    shortcut) as the boundary {"h", "skip"}."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        return {"h": ConvBN(self.features, self.strides)(x, train), "skip": x}


class BasicBlockOut(nn.Module):
    """A basic block's second half, on the boundary {"h", "skip"} of `BasicBlockIn`."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        return second_conv(x["h"], x["skip"], self.features, self.strides, train)


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


def half_blocks(blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """`blocks` with every residual block cut into its two halves, so a stage boundary can fall inside
    a block (finer cuts balance K=2 better); the network computes the same function."""
    halved = [half for block in blocks for half in (
        [BasicBlockIn(block.features, block.strides), BasicBlockOut(block.features, block.strides)]
        if isinstance(block, BasicBlock) else [block])]
    if len(halved) == len(blocks):
        raise ValueError("these blocks have no residual block to cut in half (only the ResNets' basic blocks "
                         "can be): use the whole blocks (--split-unit block)")
    return halved


def model_blocks(name: str, classes: int = 10, split_unit: str = "block") -> list[nn.Module]:
    """The flat block sequence of a registered model; with ``split_unit="half-block"`` each residual
    block is cut in two (`half_blocks`), so stage boundaries can fall inside one."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")
    if split_unit not in SPLIT_UNITS:
        raise ValueError(f"split unit {split_unit!r} is not known: use one of {', '.join(SPLIT_UNITS)}")
    blocks = MODELS[name](classes)
    return half_blocks(blocks) if split_unit == "half-block" else blocks
