"""Re-trace a function so that every convolution in it uses XLA:CPU's canonical layout.

XLA:CPU rewrites convolutions with unusual dimension orders (the weight- and input-gradient convs
of a backward pass) into transposes plus a fast canonical conv, but not inside the branches of a
conditional, where they fall back to a naive loop: measured here, a conv backward inside
`lax.switch` ran 50x slower than outside. The mesh engine runs each stage in a `lax.switch`
branch, so on CPU it wraps the stage work with `canonical_convolutions`, which makes the same
rewrite at the jaxpr level. GPU/TPU compilers handle layouts themselves and are left alone.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax import lax
from jax.extend.core import Literal
from jax.extend.core.primitives import conv_general_dilated_p


def canonical_convolutions(fn: Callable) -> Callable:
    """`fn` with the same results, its convolutions in (batch, spatial.., feature) layout."""

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
            outputs = [_canonical_conv(*inputs, **eqn.params)]
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
