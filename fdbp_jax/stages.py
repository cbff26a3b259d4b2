"""One pipeline stage as pure functions of (params, model_state, input): forward, the last stage's
loss gradient, and the delayed vector-Jacobian product that stage k < K-1 applies to a returned
input-gradient. Both engines (mesh and emulator) and the baselines use these."""

from __future__ import annotations

import dataclasses
import inspect
from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Stage:
    """A flax module used as one stage. If its ``__call__`` takes ``train``, it is passed
    ``train=True`` while training and ``train=False`` in `predict`; every variable collection other
    than ``params`` (e.g. ``batch_stats``) is model state, updated by training forwards."""

    module: nn.Module
    compute_dtype: Any = None  # e.g. jnp.bfloat16: params and input cast to it for the computation

    @property
    def takes_train(self) -> bool:
        return "train" in inspect.signature(self.module.__call__).parameters

    def init(self, rng: jax.Array, x: jax.Array) -> dict:
        return dict(self.module.init(rng, x, **self._train_kwargs(False)))

    def apply(self, params: PyTree, model_state: dict, x: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        """Run the stage; returns (output, new model state). Inference leaves the state as it is. With a
        compute dtype, the float32 parameters and the input are cast to it (their gradients come back
        in float32 through the cast) and the output stays in it; model state keeps its own dtypes."""
        if self.compute_dtype is not None:
            params, x = cast_floating((params, x), self.compute_dtype)
        variables = {"params": params, **model_state}
        if train and model_state:
            y, new_state = self.module.apply(variables, x, mutable=list(model_state), **self._train_kwargs(True))
            return y, jax.tree.map(lambda new, old: new.astype(old.dtype), dict(new_state), model_state)
        return self.module.apply(variables, x, **self._train_kwargs(train)), model_state

    def _train_kwargs(self, train: bool) -> dict:
        return {"train": train} if self.takes_train else {}


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
    """Floating leaves of `tree` cast to `dtype`; other leaves as they are."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def split_variables(variables: dict) -> tuple[PyTree, dict]:
    """Flax variables -> (params, model state: every other collection)."""
    variables = dict(variables)
    params = variables.pop("params", {})
    return params, variables


def join_variables(params: PyTree, model_state: dict) -> dict:
    return {"params": params, **model_state}


def forward(stage: Stage, params: PyTree, model_state: dict, x: jax.Array) -> tuple[jax.Array, dict]:
    """Training forward of one stage (one replica's shard)."""
    return stage.apply(params, model_state, x, train=True)


def last_stage_grads(
    stage: Stage, loss_fn: LossFn, params: PyTree, model_state: dict, x: jax.Array, labels: jax.Array,
    input_grad: bool,
) -> tuple[jax.Array, dict, PyTree, jax.Array | None]:
    """The last stage's forward, loss and gradients at once: (loss, new state, dparams, dinput)."""

    def loss_of(p, inputs):
        logits, new_state = stage.apply(p, model_state, inputs, train=True)
        return float32_loss(loss_fn, logits, labels), new_state

    if input_grad:
        (loss, new_state), (d_params, d_input) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(params, x)
        return loss, new_state, d_params, d_input
    (loss, new_state), d_params = jax.value_and_grad(loss_of, has_aux=True)(params, x)
    return loss, new_state, d_params, None


def float32_loss(loss_fn: LossFn, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """`loss_fn` on float32 logits, whatever the compute dtype: a bfloat16 softmax or log-sum-exp
    loses the small differences the loss is made of; the gradient flows back through the cast."""
    if jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(jnp.float32)
    return loss_fn(logits, labels)


def delayed_grads(
    stage: Stage, params: PyTree, model_state: dict, x: jax.Array, output_grad: jax.Array, input_grad: bool
) -> tuple[PyTree, jax.Array | None, dict]:
    """Backpropagate `output_grad` through the forward that ran on `x` with `params`, `model_state`
    (the ones stashed when that forward ran), running it again: (dparams, dinput or None, the
    model state that forward returns)."""

    def out_of(p, inputs):
        return stage.apply(p, model_state, inputs, train=True)

    if input_grad:
        _, vjp, new_state = jax.vjp(out_of, params, x, has_aux=True)
        d_params, d_input = vjp(output_grad)
        return d_params, d_input, new_state
    _, vjp, new_state = jax.vjp(lambda p: out_of(p, x), params, has_aux=True)
    return vjp(output_grad)[0], None, new_state


def backprop_grads(
    stages: Sequence[Stage], loss_fn: LossFn, params: list, model_states: list, x: jax.Array, labels: jax.Array
) -> tuple[jax.Array, list, list]:
    """Synchronous backprop through all stages back to back: (loss, new states, dparams per stage)."""

    def loss_of(all_params):
        h, new_states = x, []
        for stage, p, s in zip(stages, all_params, model_states):
            h, new_state = stage.apply(p, s, h, train=True)
            new_states.append(new_state)
        return float32_loss(loss_fn, h, labels), new_states

    (loss, new_states), d_params = jax.value_and_grad(loss_of, has_aux=True)(list(params))
    return loss, new_states, d_params


def apply_update(
    optimizer: optax.GradientTransformation, params: PyTree, opt_state: PyTree, grads: PyTree
) -> tuple[PyTree, PyTree]:
    """One optax step on one stage."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def averaged_over_replicas(leaf: jax.Array) -> bool:
    """The one rule for model state across data-parallel replicas: floating leaves (BatchNorm
    statistics) are averaged; others (integer counters, identical on every replica) are kept as they are."""
    return jnp.issubdtype(leaf.dtype, jnp.inexact)


def replica_state_mean(tree: PyTree, axis_mean: Callable[[jax.Array], jax.Array],
                       one_replica: Callable[[jax.Array], jax.Array]) -> PyTree:
    """Model state averaged over replicas by `averaged_over_replicas`: `axis_mean` averages a leaf over
    the replicas (a mean over a vmapped axis, or a pmean over "data"), `one_replica` takes one replica's."""
    return jax.tree.map(lambda a: axis_mean(a) if averaged_over_replicas(a) else one_replica(a), tree)


def split_replicas(x: jax.Array, replicas: int) -> jax.Array:
    """(B, ...) -> (replicas, B / replicas, ...): replica r gets the r-th contiguous slice."""
    return x.reshape(replicas, x.shape[0] // replicas, *x.shape[1:])


def replica_mean(tree: Any) -> Any:
    """Gradients (or losses) averaged over the leading replica axis."""
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), tree)


def replica_state(tree: Any) -> Any:
    """Model state of the replicas (leading axis) merged by the one rule of `replica_state_mean`."""
    return replica_state_mean(tree, lambda a: jnp.mean(a, axis=0), lambda a: a[0])


def all_finite(tree: PyTree) -> jax.Array:
    """True iff every entry of every leaf is finite (no NaN or inf)."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)] or [True]))


def select_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Elementwise `pred ? on_true : on_false` over two pytrees of the same structure."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def finish_stage(
    update: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]], params: PyTree, opt_state: PyTree,
    model_state: PyTree, grads: PyTree, new_model_state: PyTree, has_forward: jax.Array, has_gradient: jax.Array,
    skip_nonfinite: bool,
) -> tuple[PyTree, PyTree, PyTree, jax.Array]:
    """The end of one stage's tick, the same in every engine, after the gradients and the forward's
    model state were averaged over the replicas: flag a non-finite gradient, skip it if asked,
    apply `update` (params, opt_state, grads) -> (params, opt_state) where the stage has a gradient,
    keep the new model state where it ran a forward. A skipped tick (non-finite gradient, or a forward
    whose model state is non-finite) also keeps the previous model state, so a bad forward's BatchNorm
    statistics never reach later ticks. Returns (params, opt_state, model_state, nonfinite)."""
    nonfinite = has_gradient & ~all_finite(grads)
    if skip_nonfinite:
        has_gradient = has_gradient & ~nonfinite
        has_forward = has_forward & ~nonfinite & all_finite(new_model_state)
    new_params, new_opt_state = update(params, opt_state, grads)
    return (select_tree(has_gradient, new_params, params), select_tree(has_gradient, new_opt_state, opt_state),
            select_tree(has_forward, new_model_state, model_state), nonfinite)


def synchronous_update(
    optimizers: Sequence[optax.GradientTransformation], params: list, opt_state: list, model_state: list,
    grads: list, new_model_state: list, skip_nonfinite: bool,
) -> tuple[list, list, list, jax.Array]:
    """The end of a step in which every stage ran forwards and has a gradient (BP, GPipe, 1F1B): the
    shared `finish_stage` of each stage. Returns (params, opt_state, model_state, K nonfinite flags)."""
    every = jnp.asarray(True)
    finished = [
        finish_stage(partial(apply_update, o), p, os, s, g, new_s, every, every, skip_nonfinite)
        for o, p, os, s, g, new_s in zip(optimizers, params, opt_state, model_state, grads, new_model_state)
    ]
    new_params, new_opt_state, new_state, nonfinite = (list(part) for part in zip(*finished))
    return new_params, new_opt_state, new_state, jnp.stack(nonfinite)


def predict_stages(stages: Sequence[Stage], variables: Sequence[dict], x: jax.Array) -> jax.Array:
    """Full inference forward through all stages."""
    h = x
    for stage, v in zip(stages, variables):
        params, state = split_variables(v)
        h, _ = stage.apply(params, state, h, train=False)
    return h


def trace_shapes(
    stages: Sequence[Stage], variables: Sequence[dict], x: jax.ShapeDtypeStruct
) -> list[jax.ShapeDtypeStruct]:
    """Shape of each stage's input and of the final output (K+1 entries), checking that each
    stage accepts what the previous one gives; a mismatch is a ValueError naming the stage."""
    shapes = [x]
    for k, (stage, v) in enumerate(zip(stages, variables)):
        params, state = split_variables(v)
        try:
            out = jax.eval_shape(lambda p, s, h: stage.apply(p, s, h, train=True)[0], params, state, shapes[-1])
        except Exception as err:  # flax/XLA shape errors come in many types
            source = "the input batch" if k == 0 else f"stage {k - 1}"
            raise ValueError(
                f"stage {k} ({type(stage.module).__name__}) cannot take the output of {source}: "
                f"got shape {tuple(shapes[-1].shape)} {shapes[-1].dtype}, but {_expected_input(params)}"
                f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise ValueError(f"stage {k} must return one array, got {jax.tree.structure(out)}")
        shapes.append(out)
    return shapes


def _expected_input(params: PyTree) -> str:
    """Best-effort description of the input a stage's first layer (in creation order) was built for."""
    kernel = _first_kernel(params)
    if kernel is not None and kernel.ndim == 2:
        return f"its first Dense kernel {tuple(kernel.shape)} expects {kernel.shape[0]} input features"
    if kernel is not None and kernel.ndim >= 3:
        return f"its first conv kernel {tuple(kernel.shape)} expects {kernel.shape[-2]} input channels"
    return "its parameters were built for another input shape"


def _first_kernel(tree: PyTree):
    if not isinstance(tree, dict):
        return None
    if "kernel" in tree and hasattr(tree["kernel"], "ndim"):
        return tree["kernel"]
    for value in tree.values():
        found = _first_kernel(value)
        if found is not None:
            return found
    return None
