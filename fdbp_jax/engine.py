"""The mesh engine: fully decoupled backpropagation on a ("data", "stage") mesh.

One jitted tick runs a `shard_map` in which every device executes only its own stage
(`lax.switch` on the stage index). Each stage's parameters, optimizer state and model state are
packed into padded flat vectors so that all stage devices hold same-shaped blocks (`flat.py`).
Activations (with their labels) move to stage k+1 and input-gradients to stage k-1 by
`ppermute` along "stage"; parameter gradients are averaged by `pmean` along "data" (on CPU the
branches are re-traced with canonical convolutions, see `canonical_conv.py`). The stash of
in-flight forwards (inputs and the weights they used) stays on device, so the exact delayed
gradient is recomputed from them when the gradient returns. The schedule is `emulator.py`'s.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fdbp_jax import schedule
from fdbp_jax.canonical_conv import canonical_convolutions
from fdbp_jax.flat import FlatLayout, pad_rows, padded_sizes, stack_packed, unpad_rows
from fdbp_jax.stages import (
    LossFn,
    Stage,
    apply_update,
    delayed_grads,
    forward,
    join_variables,
    last_stage_grads,
    select_tree,
    split_variables,
)

STAGE = P("stage")
STAGE_DATA = P("stage", "data")


@flax.struct.dataclass
class EngineState:
    """Pipeline state; leading axis K is sharded over "stage", the next one (if any) over "data"."""

    tick: jax.Array  # () replicated
    params: dict  # dtype -> (K, P)
    model_state: dict  # dtype -> (K, M)
    opt_state: dict  # dtype -> (K, O)
    stash_params: dict  # dtype -> (K, D, P): weights each in-flight forward used
    stash_model_state: dict  # dtype -> (K, D, M)
    stash_inputs: jax.Array  # (K, N, D, b, S): inputs of in-flight forwards, flattened and padded
    act_msg: jax.Array  # (K, N, b, A): activation arriving at stage k this tick
    label_msg: jax.Array  # (K, N, b, ...): its labels
    grad_msg: jax.Array  # (K, N, b, A): input-gradient arriving at stage k this tick


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static layout of one pipeline: shapes and padded widths fixed at init."""

    in_shapes: tuple  # per-replica input of each stage, and the logits (K+1 ShapeDtypeStructs)
    param_layouts: tuple
    state_layouts: tuple
    opt_layouts: tuple
    param_sizes: dict
    state_sizes: dict
    opt_sizes: dict
    message_width: int
    message_dtype: np.dtype
    stash_width: int
    stash_dtype: np.dtype
    label: jax.ShapeDtypeStruct


def features(shape: jax.ShapeDtypeStruct) -> int:
    return int(np.prod(shape.shape[1:], dtype=np.int64))


class MeshEngine:
    """FDBP on a mesh; same contract and state transitions as `Emulator`."""

    def __init__(
        self, stages: Sequence[Stage], loss_fn: LossFn, optimizer: optax.GradientTransformation,
        shrink: float, mesh: Mesh,
    ):
        self.stages = list(stages)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.shrink = shrink
        self.mesh = mesh
        self.plan: Plan | None = None
        self._step = None
        self._predict = None

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def init(self, variables: Sequence[dict], shapes: Sequence[jax.ShapeDtypeStruct], label: jax.ShapeDtypeStruct):
        K, N = self.num_stages, self.mesh.shape["data"]
        params, model_state = zip(*(split_variables(v) for v in variables))
        opt_state = [self.optimizer.init(p) for p in params]
        layouts = {name: tuple(FlatLayout.of(t) for t in trees) for name, trees in
                   (("param", params), ("state", model_state), ("opt", opt_state))}
        boundaries, stashed = shapes[1:K], shapes[: K - 1]
        plan = Plan(
            in_shapes=tuple(shapes),
            param_layouts=layouts["param"],
            state_layouts=layouts["state"],
            opt_layouts=layouts["opt"],
            param_sizes=padded_sizes(layouts["param"]),
            state_sizes=padded_sizes(layouts["state"]),
            opt_sizes=padded_sizes(layouts["opt"]),
            message_width=max([1, *map(features, boundaries)]),
            message_dtype=np.dtype(jnp.result_type(*[s.dtype for s in boundaries]) if boundaries else jnp.float32),
            stash_width=max([1, *map(features, stashed)]),
            stash_dtype=np.dtype(jnp.result_type(*[s.dtype for s in stashed]) if stashed else jnp.float32),
            label=label,
        )
        self.plan = plan
        b, D = shapes[0].shape[0], schedule.stash_depth(0, K)
        stacked = lambda layouts_, trees, sizes: stack_packed(layouts_, trees, sizes)
        packed_params = stacked(plan.param_layouts, params, plan.param_sizes)
        packed_state = stacked(plan.state_layouts, model_state, plan.state_sizes)
        state = EngineState(
            tick=np.zeros((), np.int32),
            params=packed_params,
            model_state=packed_state,
            opt_state=stacked(plan.opt_layouts, opt_state, plan.opt_sizes),
            stash_params={k: np.zeros((K, D, v.shape[1]), v.dtype) for k, v in packed_params.items()},
            stash_model_state={k: np.zeros((K, D, v.shape[1]), v.dtype) for k, v in packed_state.items()},
            stash_inputs=np.zeros((K, N, D, b, plan.stash_width), plan.stash_dtype),
            act_msg=np.zeros((K, N, b, plan.message_width), plan.message_dtype),
            label_msg=np.zeros((K, N, *label.shape), label.dtype),
            grad_msg=np.zeros((K, N, b, plan.message_width), plan.message_dtype),
        )
        specs = self.state_specs(state)
        self._step = jax.jit(
            jax.shard_map(
                self._local_tick, mesh=self.mesh, in_specs=(specs, P("data"), P("data")),
                out_specs=(specs, STAGE, P()), check_vma=False,
            ),
            donate_argnums=0,
        )
        self._predict = jax.jit(
            jax.shard_map(
                self._local_predict, mesh=self.mesh, in_specs=(STAGE, STAGE, P("data")),
                out_specs=STAGE_DATA, check_vma=False,
            )
        )
        return jax.device_put(state, self.shardings(specs))

    def state_specs(self, state: EngineState) -> EngineState:
        """PartitionSpecs of every state leaf: per-stage arrays on "stage", per-replica ones also on "data"."""
        per_stage = lambda tree: jax.tree.map(lambda _: STAGE, tree)
        return EngineState(
            tick=P(),
            params=per_stage(state.params),
            model_state=per_stage(state.model_state),
            opt_state=per_stage(state.opt_state),
            stash_params=per_stage(state.stash_params),
            stash_model_state=per_stage(state.stash_model_state),
            stash_inputs=STAGE_DATA,
            act_msg=STAGE_DATA,
            label_msg=STAGE_DATA,
            grad_msg=STAGE_DATA,
        )

    def shardings(self, specs):
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda s: isinstance(s, P))

    def step(self, state: EngineState, x, y):
        x = jax.device_put(x, NamedSharding(self.mesh, P("data")))
        y = jax.device_put(y, NamedSharding(self.mesh, P("data")))
        state, losses, tick = self._step(state, x, y)
        return state, {"loss": losses[-1], "tick": tick}

    def stage_variables(self, state: EngineState) -> list[dict]:
        plan = self.plan
        params, model_state = jax.device_get((state.params, state.model_state))
        return [
            join_variables(
                plan.param_layouts[k].unpack({d: v[k] for d, v in params.items()}),
                plan.state_layouts[k].unpack({d: v[k] for d, v in model_state.items()}),
            )
            for k in range(self.num_stages)
        ]

    def predict(self, state: EngineState, x) -> jax.Array:
        N = self.mesh.shape["data"]
        x = np.asarray(x)
        pad = (-x.shape[0]) % N
        padded = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        logits = self._predict(state.params, state.model_state, jax.device_put(padded, NamedSharding(self.mesh, P("data"))))
        return logits[-1, : x.shape[0]]

    # ---- inside shard_map: local blocks of one device --------------------------------------

    def _local_tick(self, state: EngineState, x: jax.Array, y: jax.Array):
        K, t = self.num_stages, state.tick
        stage_index = jax.lax.axis_index("stage")
        table = lambda fn: jnp.asarray([fn(k, K) for k in range(K)])[stage_index]
        local = lambda tree: jax.tree.map(lambda a: a[0], tree)
        params, model_state, opt_state = local(state.params), local(state.model_state), local(state.opt_state)
        stash_params, stash_state = local(state.stash_params), local(state.stash_model_state)
        stash_inputs = state.stash_inputs[0, 0]

        slot = t % table(schedule.stash_depth)
        back_slot = (t - table(schedule.stage_delay)) % table(schedule.stash_depth)
        row = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
        work = [partial(self._stage_work, k) for k in range(K)]
        if self.mesh.devices.flat[0].platform == "cpu":
            work = [canonical_convolutions(branch) for branch in work]
        act_out, labels_out, grad_out, stash_entry, grads, fwd_state, loss = jax.lax.switch(
            stage_index,
            work,
            params, model_state, x, y, state.act_msg[0, 0], state.label_msg[0, 0], state.grad_msg[0, 0],
            stash_inputs[back_slot], row(stash_params, back_slot), row(stash_state, back_slot),
        )
        grads = jax.lax.pmean(grads, "data")
        fwd_state = {d: jax.lax.pmean(v, "data") if jnp.issubdtype(v.dtype, jnp.floating) else v
                     for d, v in fwd_state.items()}
        loss = jax.lax.pmean(loss, "data")

        has_forward = t >= stage_index
        has_gradient = t >= table(schedule.first_update_tick)
        updated_params, updated_opt = jax.lax.switch(
            stage_index, [partial(self._stage_update, k) for k in range(K)], params, opt_state, grads
        )
        write = lambda ring, entry: jax.tree.map(lambda r, e: r.at[slot].set(e), ring, entry)
        forward_pairs = [(k, k + 1) for k in range(K - 1)]
        backward_pairs = [(k + 1, k) for k in range(K - 1)]
        new_state = EngineState(
            tick=t + 1,
            params=select_tree(has_gradient, updated_params, params),
            model_state=select_tree(has_forward, fwd_state, model_state),
            opt_state=select_tree(has_gradient, updated_opt, opt_state),
            stash_params=write(stash_params, params),
            stash_model_state=write(stash_state, model_state),
            stash_inputs=stash_inputs.at[slot].set(stash_entry)[None],
            act_msg=jax.lax.ppermute(act_out, "stage", forward_pairs)[None],
            label_msg=jax.lax.ppermute(labels_out, "stage", forward_pairs)[None],
            grad_msg=jax.lax.ppermute(grad_out, "stage", backward_pairs)[None],
        )
        # every per-stage leaf gets back its leading (local size 1) "stage" axis
        new_state = jax.tree.map(lambda a: a[None], new_state.replace(tick=None)).replace(tick=t + 1)
        loss = jnp.where((stage_index == K - 1) & (t >= K - 1), loss, jnp.nan)
        return new_state, loss[None], t

    def _stage_work(self, k, params, model_state, x, y, act_in, labels_in, grad_in, used_input, used_params, used_state):
        """Stage k's forward and its gradient this tick (one replica); outputs padded to common shapes."""
        plan, stage, K = self.plan, self.stages[k], self.num_stages
        params = plan.param_layouts[k].unpack(params)
        model_state = plan.state_layouts[k].unpack(model_state)
        x_in = x if k == 0 else unpad_rows(act_in, plan.in_shapes[k])
        labels = y if k == 0 else labels_in
        batch = x_in.shape[0]
        no_message = jnp.zeros((batch, plan.message_width), plan.message_dtype)
        if k == K - 1:
            loss, fwd_state, grads, input_grad = last_stage_grads(
                stage, self.loss_fn, params, model_state, x_in, labels, input_grad=k > 0
            )
            act_out, labels_out = no_message, jnp.zeros_like(labels)
        else:
            outputs, fwd_state = forward(stage, params, model_state, x_in)
            output_grad = self.shrink * unpad_rows(grad_in, plan.in_shapes[k + 1])
            grads, input_grad = delayed_grads(
                stage,
                plan.param_layouts[k].unpack(used_params),
                plan.state_layouts[k].unpack(used_state),
                unpad_rows(used_input, plan.in_shapes[k]),
                output_grad,
                input_grad=k > 0,
            )
            act_out, labels_out, loss = pad_rows(outputs, plan.message_width, plan.message_dtype), labels, 0.0
        grad_out = no_message if input_grad is None else pad_rows(input_grad, plan.message_width, plan.message_dtype)
        return (
            act_out,
            labels_out,
            grad_out,
            jnp.zeros((batch, plan.stash_width), plan.stash_dtype) if k == K - 1  # nothing to keep: delay 0
            else pad_rows(x_in, plan.stash_width, plan.stash_dtype),
            plan.param_layouts[k].pack(grads, plan.param_sizes),
            plan.state_layouts[k].pack(fwd_state, plan.state_sizes),
            jnp.asarray(loss, jnp.float32),
        )

    def _stage_update(self, k, params, opt_state, grads):
        plan = self.plan
        layout = plan.param_layouts[k]
        new_params, new_opt = apply_update(
            self.optimizer, layout.unpack(params), plan.opt_layouts[k].unpack(opt_state), layout.unpack(grads)
        )
        return layout.pack(new_params, plan.param_sizes), plan.opt_layouts[k].pack(new_opt, plan.opt_sizes)

    def _local_predict(self, params, model_state, x):
        """Inference forward: stage j runs at step j on its own devices, then hands over to j+1."""
        plan, K = self.plan, self.num_stages
        stage_index = jax.lax.axis_index("stage")
        params, model_state = jax.tree.map(lambda a: a[0], (params, model_state))
        batch, message = x.shape[0], None
        for j, stage in enumerate(self.stages):
            out = plan.in_shapes[j + 1]

            def run(j=j, stage=stage, message=message):
                x_in = x if j == 0 else unpad_rows(message, plan.in_shapes[j])
                h, _ = stage.apply(
                    plan.param_layouts[j].unpack(params), plan.state_layouts[j].unpack(model_state), x_in, train=False
                )
                return h if j == K - 1 else pad_rows(h, plan.message_width, plan.message_dtype)

            shape = (batch, *out.shape[1:]) if j == K - 1 else (batch, plan.message_width)
            dtype = out.dtype if j == K - 1 else plan.message_dtype
            h = jax.lax.cond(stage_index == j, run, lambda: jnp.zeros(shape, dtype))
            if j < K - 1:
                message = jax.lax.ppermute(h, "stage", [(j, j + 1)])
        return h[None]
