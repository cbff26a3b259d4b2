"""The mesh engine: fully decoupled backpropagation on a ("data", "stage") mesh.

One jitted tick runs a `shard_map` in which every device executes only its own stage
(`lax.switch` on the stage index). Each stage's parameters, optimizer state and model state are
packed into padded flat vectors so that all stage devices hold same-shaped blocks (`flat.py`).
Activations (with their labels) move to stage k+1 and input-gradients to stage k-1 by
`ppermute` along "stage"; parameter gradients are averaged by `pmean` along "data" (on CPU the
branches are re-traced with canonical convolutions, see `canonical_conv.py`).

The stash of in-flight forwards stays on device. With ``stash="recompute"`` (default) it holds each
forward's input and weights, and the backward re-runs that forward to get its exact VJP (~1/3 more
compute). With ``stash="residuals"`` it holds the forward's VJP residuals and applies that
forward's own pullback: no recomputation, but far more memory and copying (measured slower on CPU;
see docs/performance.md). The schedule is the emulator's (`emulator.py`).
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
from fdbp_jax.distributed import place, to_host
from fdbp_jax.flat import FlatLayout, pad_rows, pad_to_multiple, padded_sizes, stack_packed, unpad_rows
from fdbp_jax.stages import (
    LossFn,
    Stage,
    apply_update,
    delayed_grads,
    finish_stage,
    forward,
    join_variables,
    last_stage_grads,
    replica_state_mean,
    split_variables,
)

STASH_MODES = ("residuals", "recompute")
STAGE = P("stage")
STAGE_DATA = P("stage", "data")


@flax.struct.dataclass
class EngineState:
    """Pipeline state; leading axis K is sharded over "stage", the next one (if any) over "data"."""

    tick: jax.Array  # () replicated
    params: dict  # dtype -> (K, P)
    model_state: dict  # dtype -> (K, M)
    opt_state: dict  # dtype -> (K, O)
    stash: dict  # dtype -> (K, N, D, W): per replica, each in-flight forward's residuals or input
    stash_params: dict  # "recompute" only, dtype -> (K, D, P): weights each in-flight forward used
    stash_model_state: dict  # "recompute" only, dtype -> (K, D, M)
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
    stash_layouts: tuple  # per stage k < K-1: layout of one stash entry (residuals, or the input)
    stash_sizes: dict
    label: jax.ShapeDtypeStruct


def features(shape: jax.ShapeDtypeStruct) -> int:
    return int(np.prod(shape.shape[1:], dtype=np.int64))


class MeshEngine:
    """FDBP on a mesh; same contract and state transitions as `Emulator`."""

    def __init__(
        self, stages: Sequence[Stage], loss_fn: LossFn, optimizers: Sequence[optax.GradientTransformation],
        shrink: float, mesh: Mesh, stash: str = "recompute", skip_nonfinite: bool = False,
    ):
        if stash not in STASH_MODES:
            raise ValueError(f"stash={stash!r} is not known: use one of {STASH_MODES}")
        self.stages = list(stages)
        self.loss_fn = loss_fn
        self.optimizers = list(optimizers)  # one per stage
        self.shrink = shrink
        self.mesh = mesh
        self.stash = stash
        self.skip_nonfinite = skip_nonfinite
        self.plan: Plan | None = None
        self._step = None
        self._predict = None

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def init(self, variables: Sequence[dict], shapes: Sequence[jax.ShapeDtypeStruct], label: jax.ShapeDtypeStruct):
        K, N = self.num_stages, self.mesh.shape["data"]
        params, model_state = zip(*(split_variables(v) for v in variables))
        opt_state = [o.init(p) for o, p in zip(self.optimizers, params)]
        layouts = {name: tuple(FlatLayout.of(t) for t in trees) for name, trees in
                   (("param", params), ("state", model_state), ("opt", opt_state))}
        boundaries = shapes[1:K]
        stash_layouts = tuple(
            FlatLayout.of(jax.eval_shape(partial(self._stash_entry_shapes, k), params[k], model_state[k], shapes[k]))
            for k in range(K - 1)
        )
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
            stash_layouts=stash_layouts,
            stash_sizes=padded_sizes(stash_layouts) or {"float32": 1},
            label=label,
        )
        self.plan = plan
        b, D = shapes[0].shape[0], schedule.stash_depth(0, K)
        packed_params = stack_packed(plan.param_layouts, params, plan.param_sizes)
        packed_state = stack_packed(plan.state_layouts, model_state, plan.state_sizes)
        state = EngineState(
            tick=np.zeros((), np.int32),
            params=packed_params,
            model_state=packed_state,
            opt_state=stack_packed(plan.opt_layouts, opt_state, plan.opt_sizes),
            stash={d: np.zeros((K, N, D, width), d) for d, width in plan.stash_sizes.items()},
            stash_params=self._weight_stash(packed_params, D),
            stash_model_state=self._weight_stash(packed_state, D),
            act_msg=np.zeros((K, N, b, plan.message_width), plan.message_dtype),
            label_msg=np.zeros((K, N, *label.shape), label.dtype),
            grad_msg=np.zeros((K, N, b, plan.message_width), plan.message_dtype),
        )
        specs = self.state_specs(state)
        self._step = jax.jit(
            jax.shard_map(
                self._local_tick, mesh=self.mesh, in_specs=(specs, P("data"), P("data")),
                out_specs=(specs, P(), P(), P()), check_vma=False,
            ),
            donate_argnums=0,
        )
        self._predict = jax.jit(
            jax.shard_map(
                self._local_predict, mesh=self.mesh, in_specs=(STAGE, STAGE, P("data")),
                out_specs=STAGE_DATA, check_vma=False,
            )
        )
        return place(state, self.shardings(specs))

    def _weight_stash(self, packed: dict, depth: int) -> dict:
        if self.stash != "recompute":
            return {}
        return {d: np.zeros((v.shape[0], depth, v.shape[1]), v.dtype) for d, v in packed.items()}

    def _stash_entry_shapes(self, k, params, model_state, x):
        """What stage k keeps of one forward (per replica): the VJP residuals, or the input."""
        if self.stash == "recompute":
            return [x]
        return jax.tree.leaves(self._forward_with_pullback(k, params, model_state, x)[1])

    def _forward_with_pullback(self, k, params, model_state, x):
        """Stage k's training forward and its pullback (w.r.t. params, and the input unless k = 0)."""
        run = lambda p, h: self.stages[k].apply(p, model_state, h, train=True)
        if k == 0:
            return jax.vjp(lambda p: run(p, x), params, has_aux=True)
        return jax.vjp(run, params, x, has_aux=True)

    def state_specs(self, state: EngineState) -> EngineState:
        """PartitionSpecs of every state leaf: per-stage arrays on "stage", per-replica ones also on "data"."""
        per_stage = lambda tree: jax.tree.map(lambda _: STAGE, tree)
        return EngineState(
            tick=P(),
            params=per_stage(state.params),
            model_state=per_stage(state.model_state),
            opt_state=per_stage(state.opt_state),
            stash=jax.tree.map(lambda _: STAGE_DATA, state.stash),
            stash_params=per_stage(state.stash_params),
            stash_model_state=per_stage(state.stash_model_state),
            act_msg=STAGE_DATA,
            label_msg=STAGE_DATA,
            grad_msg=STAGE_DATA,
        )

    def shardings(self, specs):
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda s: isinstance(s, P))

    @property
    def batch_sharding(self) -> NamedSharding:
        """How a global batch lies on the mesh: split over "data", whole on every stage."""
        return NamedSharding(self.mesh, P("data"))

    def lower(self, state: EngineState, x, y) -> jax.stages.Lowered:
        """The tick `step` would run, lowered (for its compiled cost and memory)."""
        return self._step.lower(state, place(x, self.batch_sharding), place(y, self.batch_sharding))

    def step(self, state: EngineState, x, y):
        batch = self.batch_sharding
        state, loss, nonfinite, tick = self._step(state, place(x, batch), place(y, batch))
        return state, {"loss": loss, "tick": tick, "nonfinite": nonfinite}

    def stage_variables(self, state: EngineState) -> list[dict]:
        plan = self.plan
        params, model_state = to_host((state.params, state.model_state))
        return [
            join_variables(
                plan.param_layouts[k].unpack({d: v[k] for d, v in params.items()}),
                plan.state_layouts[k].unpack({d: v[k] for d, v in model_state.items()}),
            )
            for k in range(self.num_stages)
        ]

    def predict(self, state: EngineState, x) -> jax.Array:
        N = self.mesh.shape["data"]
        padded = pad_to_multiple(x, N)
        logits = self._predict(state.params, state.model_state, place(padded, NamedSharding(self.mesh, P("data"))))
        return to_host(logits)[-1, : len(x)]

    # ---- inside shard_map: local blocks of one device --------------------------------------

    def _local_tick(self, state: EngineState, x: jax.Array, y: jax.Array):
        K, t = self.num_stages, state.tick
        stage_index = jax.lax.axis_index("stage")
        table = lambda fn: jnp.asarray([fn(k, K) for k in range(K)])[stage_index]
        local = lambda tree: jax.tree.map(lambda a: a[0], tree)
        params, model_state, opt_state = local(state.params), local(state.model_state), local(state.opt_state)
        stash_params, stash_state = local(state.stash_params), local(state.stash_model_state)
        stash = jax.tree.map(lambda a: a[0, 0], state.stash)

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
            row(stash, back_slot), row(stash_params, back_slot), row(stash_state, back_slot),
        )
        grads = jax.lax.pmean(grads, "data")
        fwd_state = replica_state_mean(fwd_state, lambda a: jax.lax.pmean(a, "data"), lambda a: a)
        loss = jax.lax.pmean(loss, "data")

        update = lambda p, o, g: jax.lax.switch(stage_index, [partial(self._stage_update, k) for k in range(K)], p, o, g)
        new_params, new_opt_state, new_model_state, nonfinite = finish_stage(
            update, params, opt_state, model_state, grads, fwd_state, schedule.has_forward(t, stage_index),
            schedule.has_gradient(t, stage_index, K), self.skip_nonfinite,
        )
        write = lambda ring, entry: jax.tree.map(lambda r, e: r.at[slot].set(e), ring, entry)
        forward_pairs = [(k, k + 1) for k in range(K - 1)]
        backward_pairs = [(k + 1, k) for k in range(K - 1)]
        new_state = EngineState(
            tick=t + 1,
            params=new_params,
            model_state=new_model_state,
            opt_state=new_opt_state,
            stash=jax.tree.map(lambda a: a[None], write(stash, stash_entry)),
            stash_params=write(stash_params, params) if self.stash == "recompute" else stash_params,
            stash_model_state=write(stash_state, model_state) if self.stash == "recompute" else stash_state,
            act_msg=jax.lax.ppermute(act_out, "stage", forward_pairs)[None],
            label_msg=jax.lax.ppermute(labels_out, "stage", forward_pairs)[None],
            grad_msg=jax.lax.ppermute(grad_out, "stage", backward_pairs)[None],
        )
        # every per-stage leaf gets back its leading (local size 1) "stage" axis
        new_state = jax.tree.map(lambda a: a[None], new_state.replace(tick=None)).replace(tick=t + 1)
        # metrics replicated on every device, so every process can read them
        loss = jax.lax.psum(jnp.where(stage_index == K - 1, loss, 0.0), "stage")
        loss = jnp.where(schedule.loss_is_valid(t, K), loss, jnp.nan)
        return new_state, loss, jax.lax.all_gather(nonfinite, "stage"), t

    def _stage_work(self, k, params, model_state, x, y, act_in, labels_in, grad_in, used_entry, used_params, used_state):
        """Stage k's forward and its gradient this tick (one replica); outputs padded to common shapes."""
        plan, stage, K = self.plan, self.stages[k], self.num_stages
        params = plan.param_layouts[k].unpack(params)
        model_state = plan.state_layouts[k].unpack(model_state)
        x_in = x if k == 0 else unpad_rows(act_in, plan.in_shapes[k])
        labels = y if k == 0 else labels_in
        no_message = jnp.zeros((x_in.shape[0], plan.message_width), plan.message_dtype)
        if k == K - 1:  # delay 0: loss and gradients at once, nothing to stash
            loss, fwd_state, grads, input_grad = last_stage_grads(
                stage, self.loss_fn, params, model_state, x_in, labels, input_grad=k > 0
            )
            act_out, labels_out = no_message, jnp.zeros_like(labels)
            entry = {d: jnp.zeros((width,), d) for d, width in plan.stash_sizes.items()}
        else:
            output_grad = self.shrink * unpad_rows(grad_in, plan.in_shapes[k + 1])
            layout = plan.stash_layouts[k]
            if self.stash == "residuals":
                outputs, pullback, fwd_state = self._forward_with_pullback(k, params, model_state, x_in)
                leaves, treedef = jax.tree.flatten(pullback)
                if [(leaf.shape, leaf.dtype) for leaf in leaves] != [(s, np.dtype(d)) for d, _, s in layout.leaves]:
                    raise RuntimeError(f"stage {k}: VJP residuals differ between init and tick tracing")
                entry = layout.pack(leaves, plan.stash_sizes)
                # the pullback of the forward this stage ran stage_delay ticks ago, from its residuals
                cotangents = jax.tree.unflatten(treedef, layout.unpack(used_entry))(output_grad)
                grads, input_grad = cotangents if k > 0 else (cotangents[0], None)
            else:
                outputs, fwd_state = forward(stage, params, model_state, x_in)
                entry = layout.pack([x_in], plan.stash_sizes)
                (used_input,) = layout.unpack(used_entry)
                grads, input_grad = delayed_grads(
                    stage, plan.param_layouts[k].unpack(used_params), plan.state_layouts[k].unpack(used_state),
                    used_input, output_grad, input_grad=k > 0,
                )
            act_out, labels_out, loss = pad_rows(outputs, plan.message_width, plan.message_dtype), labels, 0.0
        grad_out = no_message if input_grad is None else pad_rows(input_grad, plan.message_width, plan.message_dtype)
        return (
            act_out,
            labels_out,
            grad_out,
            entry,
            plan.param_layouts[k].pack(grads, plan.param_sizes),
            plan.state_layouts[k].pack(fwd_state, plan.state_sizes),
            jnp.asarray(loss, jnp.float32),
        )

    def _stage_update(self, k, params, opt_state, grads):
        plan = self.plan
        layout = plan.param_layouts[k]
        new_params, new_opt = apply_update(
            self.optimizers[k], layout.unpack(params), plan.opt_layouts[k].unpack(opt_state), layout.unpack(grads)
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
