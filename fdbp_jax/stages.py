"""One pipeline stage as pure functions of (params, model_state, input): forward, the last stage's
loss gradient, and the delayed vector-Jacobian product that stage k < K-1 applies to a returned
input-gradient. Both engines (mesh and emulator) and the baselines use these."""

from __future__ import annotations

import dataclasses
import inspect
import zlib
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Stage:
    """A flax.linen module used as one stage (`NnxStage`: a flax.nnx one). If its ``__call__`` takes
    ``train``, it is passed ``train=True`` while training and ``train=False`` in `predict`; every
    variable collection other than ``params`` (e.g. ``batch_stats``) is model state, updated by
    training forwards. A training forward given a key draws its randomness (``rngs={"dropout": key}``)
    from it; the engines give each forward the key of its batch (`forward_key`), so a forward that is
    run again in the backward draws the same dropout mask."""

    module: Any
    compute_dtype: Any = None  # e.g. jnp.bfloat16: params and input cast to it for the computation
    index: int = 0  # the stage's place in the pipeline, part of its forwards' keys
    seed: int = 0  # of the forwards' keys
    in_layout: Any = None  # a `boundaries.BoundaryLayout`: the input arrives packed (a pytree boundary)
    out_layout: Any = None  # the output leaves packed

    @property
    def takes_train(self) -> bool:
        return "train" in inspect.signature(self.module.__call__).parameters

    def init(self, rng: jax.Array, x: jax.Array) -> dict:
        if self.in_layout is not None:
            x = self.in_layout.unpack(x)
        rngs = {"params": rng, "dropout": jax.random.fold_in(rng, 1)}
        return dict(self.module.init(rngs, x, **self._train_kwargs(False)))

    def apply(self, params: PyTree, model_state: dict, x: PyTree, train: bool,
              key: jax.Array | None = None) -> tuple[PyTree, dict]:
        """Run the stage; returns (output, new model state). Inference leaves the state as it is. With a
        compute dtype, the float32 parameters and the input are cast to it (their gradients come back
        in float32 through the cast) and the output stays in it; model state keeps its own dtypes."""
        if self.in_layout is not None:
            x = self.in_layout.unpack(x)
        if self.compute_dtype is not None:
            params, x = cast_floating((params, x), self.compute_dtype)
        y, new_state = self._run(params, model_state, x, train, key)
        if train and model_state:
            new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, model_state)
        return (y if self.out_layout is None else self.out_layout.pack(y)), new_state

    def _run(self, params, model_state, x, train, key):
        variables = {"params": params, **model_state}
        rngs = {} if key is None or not train else {"rngs": {"dropout": key}}
        if train and model_state:
            y, new_state = self.module.apply(variables, x, mutable=list(model_state), **rngs,
                                             **self._train_kwargs(True))
            return y, dict(new_state)
        return self.module.apply(variables, x, **rngs, **self._train_kwargs(train)), model_state

    def _train_kwargs(self, train: bool) -> dict:
        return {"train": train} if self.takes_train else {}

    def public_variables(self, variables: dict) -> Any:
        """The engines' variables of this stage as the user sees them (linen: the variable dict)."""
        return variables

    def engine_variables(self, variables: Any) -> dict:
        """The inverse of `public_variables`."""
        return dict(variables)

    def forward_key(self, batch: jax.Array, replica: jax.Array, microbatch: jax.Array | int = 0) -> jax.Array:
        """The key of this stage's forward of `batch` (the global batch index) on `replica`: the same
        in every engine and whenever that forward is run again."""
        key = jax.random.fold_in(jax.random.key(self.seed), self.index)
        for part in (batch, replica, microbatch):
            key = jax.random.fold_in(key, jnp.maximum(jnp.asarray(part, jnp.int32), 0))
        return key


@dataclasses.dataclass(frozen=True, eq=False)
class NnxStage(Stage):
    """A flax.nnx module used as one stage. It trains from the weights the module holds (`nnx.Param`);
    every other variable except its random streams (BatchNorm's `nnx.BatchStat`, counters) is model
    state. Training forwards run it in ``train()`` mode, inference in ``eval()`` mode (and a ``train``
    argument of ``__call__`` is passed as for linen). In every training forward its `nnx.Rngs` streams
    are reseeded (`nnx.reseed`) from the forward's key, stream ``name`` with `stream_key(key, name)`;
    they are neither trained nor kept."""

    graphdef: Any = None
    rng_state: Any = None  # the module's random streams (RngKey, RngCount): a template, never updated
    held: tuple = ()  # (params, other state) as the module held them when the stage was made: their structure

    @classmethod
    def of(cls, module: Any, **settings) -> "NnxStage":
        graphdef, params, rng_state, other = nnx.split(module, nnx.Param, nnx.RngState, ...)
        return cls(module, graphdef=graphdef, rng_state=rng_state, held=(params, other), **settings)

    def init(self, rng: jax.Array, x: jax.Array) -> dict:
        """The weights the module holds now (copied: training never touches the module's arrays)."""
        _, params, _, other = nnx.split(self.module, nnx.Param, nnx.RngState, ...)
        params, other = jax.tree.map(jnp.array, (params, other))
        return {"params": params, **({"state": other} if jax.tree.leaves(other) else {})}

    def _run(self, params, model_state, x, train, key):
        other = model_state.get("state", self.held[1])
        model = nnx.merge(self.graphdef, params, self.rng_state, other, copy=True)
        model.train() if train else model.eval()
        if train and key is not None and self.stream_names:
            nnx.reseed(model, **{name: stream_key(key, name) for name in self.stream_names})
        y = model(x, **self._train_kwargs(train))
        if train and model_state:
            return y, {"state": nnx.split(model, nnx.Param, nnx.RngState, ...)[3]}
        return y, model_state

    @property
    def stream_names(self) -> tuple[str, ...]:
        """The names of the module's random streams (`nnx.Rngs(0)`: "default"; `nnx.Rngs(dropout=0)`: "dropout")."""
        variables = jax.tree.leaves(self.rng_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
        return tuple(sorted({v.tag for v in variables if isinstance(v, nnx.RngKey)}))

    def public_variables(self, variables: dict) -> Any:
        """One `nnx.State` of the stage (params and model state), usable with `nnx.update(module, ...)`."""
        return nnx.merge_state(variables["params"], variables.get("state", self.held[1]))

    def engine_variables(self, variables: Any) -> dict:
        if isinstance(variables, dict) and "params" in variables:
            return dict(variables)
        if not isinstance(variables, nnx.State):
            raise ValueError(f"variables of an NNX stage must be an nnx.State (e.g. nnx.state(module)), got "
                             f"{type(variables).__name__}")
        params, _, other = nnx.split_state(variables, nnx.Param, nnx.RngState, ...)
        return {"params": params, **({"state": other} if jax.tree.leaves(other) else {})}


def stream_key(key: jax.Array, name: str) -> jax.Array:
    """The key an NNX stream called `name` is reseeded with in a forward of key `key`: streams of
    different names draw different bits."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def as_stage(module: Any, **settings) -> Stage:
    """The stage of a flax.linen or a flax.nnx module; a ValueError for anything else."""
    if isinstance(module, nn.Module):
        return Stage(module, **settings)
    if isinstance(module, nnx.Module):
        return NnxStage.of(module, **settings)
    raise ValueError(f"a stage must be a flax.linen.Module or a flax.nnx.Module, got {type(module).__name__}")


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


def forward(stage: Stage, params: PyTree, model_state: dict, x: jax.Array,
            key: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Training forward of one stage (one replica's shard), its randomness drawn from `key`."""
    return stage.apply(params, model_state, x, train=True, key=key)


def last_stage_grads(
    stage: Stage, loss_fn: LossFn, params: PyTree, model_state: dict, x: jax.Array, labels: jax.Array,
    input_grad: bool, key: jax.Array | None = None,
) -> tuple[jax.Array, dict, PyTree, jax.Array | None]:
    """The last stage's forward, loss and gradients at once: (loss, new state, dparams, dinput)."""

    def loss_of(p, inputs):
        logits, new_state = stage.apply(p, model_state, inputs, train=True, key=key)
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
    stage: Stage, params: PyTree, model_state: dict, x: jax.Array, output_grad: jax.Array, input_grad: bool,
    key: jax.Array | None = None,
) -> tuple[PyTree, jax.Array | None, dict]:
    """Backpropagate `output_grad` through the forward that ran on `x` with `params`, `model_state`
    (the ones stashed when that forward ran) and `key`, running it again: (dparams, dinput or None,
    the model state that forward returns)."""

    def out_of(p, inputs):
        return stage.apply(p, model_state, inputs, train=True, key=key)

    if input_grad:
        _, vjp, new_state = jax.vjp(out_of, params, x, has_aux=True)
        d_params, d_input = vjp(output_grad)
        return d_params, d_input, new_state
    _, vjp, new_state = jax.vjp(lambda p: out_of(p, x), params, has_aux=True)
    return vjp(output_grad)[0], None, new_state


def backprop_grads(
    stages: Sequence[Stage], loss_fn: LossFn, params: list, model_states: list, x: jax.Array, labels: jax.Array,
    keys: Sequence[jax.Array | None] | None = None,
) -> tuple[jax.Array, list, list]:
    """Synchronous backprop through all stages back to back: (loss, new states, dparams per stage);
    `keys`: each stage's forward key."""
    keys = keys or [None] * len(stages)

    def loss_of(all_params):
        h, new_states = x, []
        for stage, p, s, key in zip(stages, all_params, model_states, keys):
            h, new_state = stage.apply(p, s, h, train=True, key=key)
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
    stages: Sequence[Stage], variables: Sequence[dict], x: jax.ShapeDtypeStruct, what: str = "stage",
    first: int = 0,
) -> list[PyTree]:
    """Shape of each stage's input and of the final output (K+1 entries; a boundary may be a pytree
    of shapes), checking that each stage accepts what the previous one gives; a mismatch is a
    ValueError naming the stage (or block: `what`; numbered from `first`) and the shapes."""
    shapes = [x]
    for k, (stage, v) in enumerate(zip(stages, variables), start=first):
        params, state = split_variables(v)
        run = lambda p, s, h: stage.apply(p, s, h, train=True, key=stage.forward_key(0, 0))[0]
        try:
            out = jax.eval_shape(run, params, state, shapes[-1])
        except Exception as err:  # flax/XLA shape errors come in many types
            source = "the input batch" if k == 0 else f"{what} {k - 1}"
            raise ValueError(
                f"{what} {k} ({type(stage.module).__name__}) cannot take the output of {source}: "
                f"got {describe_shape(shapes[-1])}, but {_expected_input(params)}"
                f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        shapes.append(out)
    return shapes


def describe_shape(shape: PyTree) -> str:
    """"shape (8, 32) float32", or each leaf's for a pytree."""
    if isinstance(shape, jax.ShapeDtypeStruct):
        return f"shape {tuple(shape.shape)} {shape.dtype}"
    leaves = jax.tree_util.tree_leaves_with_path(shape)
    return "a pytree of " + ", ".join(f"{jax.tree_util.keystr(path)}: {tuple(leaf.shape)} {leaf.dtype}"
                                      for path, leaf in leaves)


def _expected_input(params: PyTree) -> str:
    """Best-effort description of the input a stage's first layer (in creation order) was built for."""
    kernel = _first_kernel(params)
    if kernel is not None and kernel.ndim == 2:
        return f"its first Dense kernel {tuple(kernel.shape)} expects {kernel.shape[0]} input features"
    if kernel is not None and kernel.ndim >= 3:
        return f"its first conv kernel {tuple(kernel.shape)} expects {kernel.shape[-2]} input channels"
    return "its parameters were built for another input shape"


def _first_kernel(tree: PyTree):
    if not isinstance(tree, Mapping):
        return None
    if "kernel" in tree and hasattr(tree["kernel"], "ndim"):
        return tree["kernel"]
    for value in tree.values():
        found = _first_kernel(value)
        if found is not None:
            return found
    return None
