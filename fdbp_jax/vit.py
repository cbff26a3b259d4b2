"""A Vision Transformer for CIFAR-sized images as a flat block sequence (patch embedding, `depth`
uniform pre-norm transformer blocks, head): uniform blocks are where deep pipelines balance best, so
it cuts evenly into 8-16 stages. Registered in `models.MODELS` as "vit"."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class PatchEmbedding(nn.Module):
    """Non-overlapping `patch` x `patch` patches -> tokens of `width` features, plus learned positions."""

    width: int
    patch: int = 4

    @nn.compact
    def __call__(self, x):
        tokens = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID")(x)
        tokens = tokens.reshape(tokens.shape[0], -1, self.width)  # (batch, patches, width)
        positions = self.param("positions", nn.initializers.normal(0.02), tokens.shape[1:])
        return tokens + positions


class TransformerBlock(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual connection; (batch, tokens, width) in and out."""

    heads: int
    mlp_ratio: int = 2

    @nn.compact
    def __call__(self, h):
        width = h.shape[-1]
        attended = nn.LayerNorm()(h)
        h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads)(attended, attended)
        mlp = nn.Dense(self.mlp_ratio * width)(nn.LayerNorm()(h))
        return h + nn.Dense(width)(nn.gelu(mlp))


class TokenHead(nn.Module):
    """Final LayerNorm, mean over tokens and the classifier."""

    classes: int = 10

    @nn.compact
    def __call__(self, h):
        return nn.Dense(self.classes)(jnp.mean(nn.LayerNorm()(h), axis=1))


def cifar_vit(classes: int, depth: int = 16, width: int = 96, heads: int = 4, patch: int = 4) -> list[nn.Module]:
    """Patch embedding, `depth` transformer blocks and the head: 18 blocks by default (~1.2 M parameters,
    64 tokens of 96 features for 32x32 images), small enough to train on CPU cores."""
    return [PatchEmbedding(width, patch), *(TransformerBlock(heads) for _ in range(depth)), TokenHead(classes)]
