"""Re-trace a function so that every convolution in it takes XLA:CPU's fast path.

Two rewrites at the jaxpr level, each measured on this project's CPU (2026-12-02):
- Canonical layout. XLA:CPU rewrites convolutions with unusual dimension orders (the weight- and
  input-gradient convs of a backward pass) into transposes plus a fast canonical conv, but not inside
  the branches of a conditional, where they fall back to a naive loop: a conv backward inside
  `lax.switch` ran 50x slower than outside. The mesh engines run each stage in a `lax.switch` branch.
- Weight gradients over batch chunks. The weight-gradient conv contracts over the batch, and XLA:CPU's
  cost per example grows with it: ResNet-20's 16-channel 3x3 layers at 32x32 take 58 µs per example at
  batch 16 and 210 at 128. Summing the convs of chunks of `WEIGHT_GRAD_CHUNK` examples takes 60 at any
  batch; a ResNet-20 BP step at batch 128 on one core went from 6.6 to 4.4 ms per example.
And one rewrite that is not about convolutions but rides on the same re-trace:
- No-op `reduce_precision`. `jax.checkpoint` marks each residual it saves (the "selective" stash's conv
  outputs) with a reduce_precision to the residual's own precision, against excess precision. XLA:CPU
  keeps it as a copy of the array: twice per saved conv output, 96 MB a tick for ResNet-20's first stage
  at batch 128. For float32 and float64 it is the identity here (XLA:CPU computes those in their own
  precision; only narrower floats are computed wider), so it is dropped for them.
GPU/TPU compilers choose layouts and algorithms themselves and are left alone (`fast_convolutions`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np
from jax import lax
from jax.extend.core import Literal
from jax.extend.core.primitives import conv_general_dilated_p, reduce_precision_p

WEIGHT_GRAD_CHUNK = 16  # examples per weight-gradient conv; the fastest of 4-32 on this CPU at batch 64 and 128


def fast_convolutions(fn: Callable, platform: str) -> Callable:
    """`cpu_convolutions(fn)` on the "cpu" platform, `fn` itself on any other."""
    return cpu_convolutions(fn) if platform == "cpu" else fn


def cpu_convolutions(fn: Callable) -> Callable:
    """`fn` with the same results (up to the order of the weight gradients' sums), its convolutions in
    (batch, spatial.., feature) layout and its weight-gradient convolutions summed over batch chunks."""

    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outputs = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outputs)

    return wrapped


def _evaluate(jaxpr, consts, args) -> list:
    env = {}
    read = lambda v: v.val if isinstance(v, Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        if eqn.primitive is conv_general_dilated_p:
            outputs = [_fast_conv(*inputs, out_shape=eqn.outvars[0].aval.shape, **eqn.params)]
        elif eqn.primitive is reduce_precision_p and is_identity_precision(eqn.invars[0].aval.dtype, **eqn.params):
            outputs = inputs
        elif eqn.primitive.name in ("pjit", "jit"):  # nested jit: look inside it too
            inner = eqn.params["jaxpr"]
            outputs = _evaluate(inner.jaxpr, inner.consts, inputs)
        elif eqn.primitive.name in ("checkpoint", "remat2"):  # jax.checkpoint (remat), e.g. the "selective" stash's
            # re-run forward: inlined, which keeps its numbers (nothing differentiates this trace again)
            outputs = _evaluate(eqn.params["jaxpr"], [], inputs)
        else:
            with eqn.ctx.manager:
                result = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
            outputs = result if eqn.primitive.multiple_results else [result]
        env.update(zip(eqn.outvars, outputs))
    return [read(v) for v in jaxpr.outvars]


def is_identity_precision(dtype, exponent_bits: int, mantissa_bits: int) -> bool:
    """Whether reduce_precision to (exponent_bits, mantissa_bits) leaves a `dtype` array unchanged on
    XLA:CPU: its own precision or wider, for float32 and float64 (computed in their own precision)."""
    if dtype not in (np.float32, np.float64):
        return False
    info = jax.numpy.finfo(dtype)
    return exponent_bits >= info.nexp and mantissa_bits >= info.nmant


def is_weight_gradient(lhs_shape, rhs_shape, out_shape, dimension_numbers, feature_group_count: int,
                       batch_group_count: int) -> bool:
    """Whether a conv is an ungrouped weight gradient: its "kernel" (an activation gradient) covers more
    positions than its output (the weights' window), and it sums over more than one chunk of examples."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    window = math.prod(rhs_shape[d] for d in rhs_spec[2:])
    positions = math.prod(out_shape[d] for d in out_spec[2:])
    return (feature_group_count == 1 and batch_group_count == 1 and window > positions
            and lhs_shape[lhs_spec[1]] > WEIGHT_GRAD_CHUNK)


def _fast_conv(lhs, rhs, *, out_shape, **params):
    """The conv (its output of `out_shape`) in canonical layout; a weight gradient as the sum of its batch
    chunks' convs."""
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    if not is_weight_gradient(lhs.shape, rhs.shape, out_shape, params["dimension_numbers"],
                              params["feature_group_count"], params["batch_group_count"]):
        return _canonical_conv(lhs, rhs, **params)
    examples = lhs.shape[lhs_spec[1]]
    spans = [(start, min(start + WEIGHT_GRAD_CHUNK, examples)) for start in range(0, examples, WEIGHT_GRAD_CHUNK)]
    chunks = [_canonical_conv(lax.slice_in_dim(lhs, *span, axis=lhs_spec[1]),
                              lax.slice_in_dim(rhs, *span, axis=rhs_spec[1]), **params) for span in spans]
    return sum(chunks[1:], chunks[0])


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
    """The same convolution with operands transposed to lhs (b, s.., f), rhs (s.., i, o), out (b, s.., f)."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    spatial = len(lhs_spec) - 2
    canonical = lax.ConvDimensionNumbers(
        lhs_spec=(0, spatial + 1, *range(1, spatial + 1)),
        rhs_spec=(spatial + 1, spatial, *range(spatial)),
        out_spec=(0, spatial + 1, *range(1, spatial + 1)),
    )
    if tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, canonical)):
        return conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
    lhs_order = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    rhs_order = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    out_order = (out_spec[0], *out_spec[2:], out_spec[1])
    out = conv_general_dilated_p.bind(
        lax.transpose(lhs, lhs_order), lax.transpose(rhs, rhs_order), dimension_numbers=canonical, **params
    )
    inverse = tuple(sorted(range(len(out_order)), key=out_order.__getitem__))
    return lax.transpose(out, inverse)
