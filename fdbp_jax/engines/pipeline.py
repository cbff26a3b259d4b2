"""Synchronous pipelines (GPipe, 1F1B): one step trains one global batch split into M micro-batches,
run through the stages by a `Timetable`; gradients are summed over the micro-batches, averaged over
"data", and every stage takes one optax update per step. This is exactly backprop on the global
batch: the schedule decides only time and memory, never the numbers.

Each stage keeps the input of every micro-batch it holds and runs its forward again in the
backward (GPipe's re-materialisation), so a stage's memory is `Timetable.buffer_depth` micro-batch
inputs; the last stage's forward is folded into its backward (loss and gradients at once).
With BatchNorm, every micro-batch is normalised by its own statistics, and the new model state is
the mean over micro-batches and replicas of what each micro-batch's forward returns from the
step's starting state: the same as `bp` with N·M replicas.

`PipelineEmulator` (mesh=None) runs the timetable operation by operation on one device, replicas
simulated by vmap, unrolled in one jit (compile time grows with M·K; for large M, the mesh engine on
a (1, K) mesh compiles one tick); `MeshPipeline` runs it on the ("data", "stage") mesh, stage k on
column k, as a loop over ticks.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fdbp_jax.distributed import place
from fdbp_jax.engines import _link_swap
from fdbp_jax.engines._flat import mean_over
from fdbp_jax.engines._mesh_layer import (
    STAGE,
    PackedStages,
    StagedMeshEngine,
    local_block,
    make_predict,
    shardings,
    stage_metrics,
    stage_switch,
    stage_update,
    with_stage_axis,
)
from fdbp_jax.engines._single_device import SingleDeviceEngine
from fdbp_jax.engines.timetable import BACKWARD, BACKWARD_CODE, FORWARD, FORWARD_CODE, Timetable
from fdbp_jax.stages import (
    LossFn,
    Stage,
    delayed_grads,
    finish_stage,
    forward,
    last_stage_grads,
    replica_state,
    replica_state_mean,
    split_variables,
    synchronous_update,
)


@flax.struct.dataclass
class PipelineState:
    """Weights between steps; nothing is in flight (each step flushes the pipeline). On a mesh,
    params/model_state/opt_state are {dtype: (K, width)} packed vectors sharded over "stage"."""

    tick: jax.Array
    params: list | dict
    model_state: list | dict
    opt_state: list | dict


def split_microbatches(x: jax.Array, replicas: int, microbatches: int) -> jax.Array:
    """(B, ...) -> (replicas, M, B / (replicas M), ...): replica r's rows are the r-th contiguous block,
    cut into M contiguous micro-batches (as on the mesh, where "data" shards the batch)."""
    return x.reshape(replicas, microbatches, x.shape[0] // (replicas * microbatches), *x.shape[1:])


class PipelineEmulator(SingleDeviceEngine):
    """A synchronous pipeline on one device: the timetable's operations in tick order."""

    def __init__(self, stages: Sequence[Stage], loss_fn: LossFn, optimizers: Sequence[optax.GradientTransformation],
                 timetable: Timetable, replicas: int, skip_nonfinite: bool = False):
        self.stages = list(stages)
        self.loss_fn = loss_fn
        self.optimizers = list(optimizers)
        self.timetable = timetable
        self.replicas = replicas
        self.skip_nonfinite = skip_nonfinite
        self.bubble_fraction = timetable.bubble_fraction
        self._compile(self._train_step)

    def init(self, variables: Sequence[dict], shapes, label) -> PipelineState:
        params, model_state = zip(*(split_variables(v) for v in variables))
        params, model_state = jax.tree.map(jnp.array, (list(params), list(model_state)))
        return PipelineState(tick=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                             opt_state=[o.init(p) for o, p in zip(self.optimizers, params)])

    def _train_step(self, state: PipelineState, x, y):
        K, M = len(self.stages), self.timetable.microbatches
        xs, ys = split_microbatches(x, self.replicas, M), split_microbatches(y, self.replicas, M)
        on_replicas = partial(jax.vmap, in_axes=(None, None, 0, 0, 0))
        replicas = jnp.arange(self.replicas)
        arrived: dict = {}  # (stage, kind, micro-batch) -> activation (F) or input-gradient (B), per replica
        grads, new_states, losses = [[] for _ in range(K)], [[] for _ in range(K)], []
        for row in self.timetable.ops:
            sent = {}
            for k, op in enumerate(row):
                if op is None:
                    continue
                kind, m = op
                stage, params, model_state = self.stages[k], state.params[k], state.model_state[k]
                x_in = xs[:, m] if k == 0 else arrived[(k, FORWARD, m)]
                key = lambda r: stage.forward_key(state.tick, r, m)  # the same in the forward and its re-run
                if kind == FORWARD and k < K - 1:
                    sent[(k + 1, FORWARD, m)] = jax.vmap(
                        lambda h, r: forward(stage, params, model_state, h, key(r))[0])(x_in, replicas)
                elif kind == BACKWARD and k == K - 1:
                    fn = lambda p, s, h, labels, r: last_stage_grads(stage, self.loss_fn, p, s, h, labels,
                                                                     input_grad=k > 0, key=key(r))
                    loss, new_state, d_params, d_input = on_replicas(fn)(params, model_state, x_in, ys[:, m], replicas)
                    losses.append(loss)
                elif kind == BACKWARD:
                    fn = lambda p, s, h, g, r: delayed_grads(stage, p, s, h, g, input_grad=k > 0, key=key(r))
                    d_params, d_input, new_state = on_replicas(fn)(
                        params, model_state, x_in, arrived[(k, BACKWARD, m)], replicas)
                if kind == BACKWARD:
                    grads[k].append(d_params)
                    new_states[k].append(new_state)
                    if k > 0:
                        sent[(k - 1, BACKWARD, m)] = d_input
            arrived.update(sent)  # messages arrive the tick after they are sent
        mean = lambda trees: jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), axis=(0, 1)), *trees)
        every_replica = lambda trees: replica_state(jax.tree.map(lambda *a: jnp.concatenate(a), *trees))
        params, opt_state, model_state, nonfinite = synchronous_update(
            self.optimizers, state.params, state.opt_state, state.model_state, [mean(g) for g in grads],
            [every_replica(s) for s in new_states], self.skip_nonfinite,
        )
        new_state = PipelineState(tick=state.tick + 1, params=params, model_state=model_state, opt_state=opt_state)
        return new_state, {"loss": jnp.mean(jnp.stack(losses)), "tick": state.tick, "nonfinite": nonfinite}


class MeshPipeline(StagedMeshEngine):
    """A synchronous pipeline on a ("data", "stage") mesh: one jitted step, a loop over the
    timetable's ticks inside a `shard_map`; each tick every device runs its stage's operation,
    then activations move to stage k+1 and input-gradients to stage k-1, both directions of a link in
    one `ppermute` (`_link_swap.swap_at`)."""

    def __init__(self, stages: Sequence[Stage], loss_fn: LossFn, optimizers: Sequence[optax.GradientTransformation],
                 timetable: Timetable, mesh: Mesh, skip_nonfinite: bool = False):
        self.stages = list(stages)
        self.loss_fn = loss_fn
        self.optimizers = list(optimizers)
        self.timetable = timetable
        self.mesh = mesh
        self.skip_nonfinite = skip_nonfinite
        self.bubble_fraction = timetable.bubble_fraction
        self.packed: PackedStages | None = None
        self._step = None
        self._predict = None

    def init(self, variables: Sequence[dict], shapes, label) -> PipelineState:
        params, model_state = zip(*(split_variables(v) for v in variables))
        opt_state = [o.init(p) for o, p in zip(self.optimizers, params)]
        self.packed = PackedStages.build(params, model_state, opt_state, shapes)
        packed_params, packed_state, packed_opt = self.packed.stack(params, model_state, opt_state)
        state = PipelineState(tick=np.zeros((), np.int32), params=packed_params, model_state=packed_state,
                              opt_state=packed_opt)
        specs = PipelineState(tick=P(), **{name: jax.tree.map(lambda _: STAGE, getattr(state, name))
                                           for name in ("params", "model_state", "opt_state")})
        self._step = jax.jit(jax.shard_map(self._local_step, mesh=self.mesh, in_specs=(specs, P("data"), P("data")),
                                           out_specs=(specs, P(), P(), P()), check_vma=False), donate_argnums=0)
        self._predict = make_predict(self.mesh, self.stages, self.packed)
        return place(state, shardings(self.mesh, specs))

    # ---- inside shard_map: local blocks of one device --------------------------------------

    def _local_step(self, state: PipelineState, x: jax.Array, y: jax.Array):
        K, M, packed, table = len(self.stages), self.timetable.microbatches, self.packed, self.timetable
        stage_index = jax.lax.axis_index("stage")
        params, model_state, opt_state = local_block((state.params, state.model_state, state.opt_state))
        b, depth = x.shape[0] // M, table.buffer_depth
        kinds, micros = (jnp.asarray(a) for a in table.codes())
        # branch 0: idle; 1 + k: stage k's forward; 1 + K + k: stage k's backward
        run = stage_switch(self.mesh, [self._idle] + [partial(self._forward, k) for k in range(K)]
                           + [partial(self._backward, k) for k in range(K)])
        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
        messages = jnp.zeros((depth, b, packed.message_width), packed.message_dtype)  # (depth, b, A)
        replica = jax.lax.axis_index("data")
        carry = dict(
            activations=messages,  # received activation of micro-batch m in slot m % depth
            output_grads=messages,  # received input-gradient of stage k+1, same slots
            grads=zeros(params),  # sum over micro-batches so far
            states=jax.tree.map(lambda a: jnp.zeros((M, *a.shape), a.dtype), model_state),  # (M, width) per dtype
            loss=jnp.zeros((), jnp.float32),
        )

        def tick(t, carry):
            kind, m = kinds[t, stage_index], micros[t, stage_index]
            slot = m % depth
            branch = jnp.where(kind == FORWARD_CODE, 1 + stage_index,
                               jnp.where(kind == BACKWARD_CODE, 1 + K + stage_index, 0))
            act_out, grad_out, grads, new_state, loss = run(
                branch, (state.tick, replica, m), params, model_state, jax.lax.dynamic_slice_in_dim(x, m * b, b),
                jax.lax.dynamic_slice_in_dim(y, m * b, b), carry["activations"][slot], carry["output_grads"][slot],
                carry["grads"],
            )
            backward = kind == BACKWARD_CODE
            act_in, grad_in = _link_swap.swap_at(stage_index, K, act_out, grad_out)
            carry = dict(
                activations=self._receive(carry["activations"], act_in, t, kinds, micros, stage_index - 1,
                                          FORWARD_CODE),
                output_grads=self._receive(carry["output_grads"], grad_in, t, kinds, micros, stage_index + 1,
                                           BACKWARD_CODE),
                grads=grads,
                states=jax.tree.map(lambda buf, s: buf.at[m].set(jnp.where(backward, s, buf[m])),
                                    carry["states"], new_state),
                loss=carry["loss"] + loss,
            )
            return carry

        carry = jax.lax.fori_loop(0, table.ticks, tick, carry)
        micro_mean = replica_state_mean(carry["states"], lambda a: jnp.mean(a, axis=0), lambda a: a[0])
        (grads, loss), new_state = mean_over("data", (jax.tree.map(lambda g: g / M, carry["grads"]), carry["loss"] / M),
                                             micro_mean)
        every = jnp.asarray(True)
        new_params, new_opt_state, new_model_state, nonfinite = finish_stage(
            stage_update(packed, self.optimizers, stage_index), params, opt_state, model_state, grads,
            new_state, every, every, self.skip_nonfinite,
        )
        loss, nonfinite = stage_metrics(loss, nonfinite, K)
        new = PipelineState(tick=state.tick + 1, **with_stage_axis(
            dict(params=new_params, model_state=new_model_state, opt_state=new_opt_state)))
        return new, loss, nonfinite, state.tick

    def _receive(self, buffer, arriving, t, kinds, micros, sender, kind):
        """Store what `sender` (a neighbouring stage) sent this tick, if it ran an operation of `kind`."""
        K = len(self.stages)
        valid = (sender >= 0) & (sender < K)
        sender = jnp.clip(sender, 0, K - 1)
        slot = micros[t, sender] % buffer.shape[0]
        keep = valid & (kinds[t, sender] == kind)
        return buffer.at[slot].set(jnp.where(keep, arriving, buffer[slot]))

    def _outputs(self, grads_sum, model_state, batch, act_out=None, grad_out=None, d_params=None, new_state=None,
                 loss=0.0):
        """One operation's results in the common shapes of every branch (zeros where it has none);
        the gradient sum passes through untouched unless the operation adds its gradient."""
        packed = self.packed
        return (
            packed.no_message(batch) if act_out is None else act_out,
            packed.no_message(batch) if grad_out is None else grad_out,
            grads_sum if d_params is None else jax.tree.map(jnp.add, grads_sum, d_params),
            model_state if new_state is None else new_state,
            jnp.asarray(loss, jnp.float32),
        )

    def _idle(self, key_ids, params, model_state, x, y, activation, output_grad, grads_sum):
        return self._outputs(grads_sum, model_state, x.shape[0])

    def _input(self, k, x, activation):
        return x if k == 0 else self.packed.from_message(activation, k)

    def _forward(self, k, key_ids, params, model_state, x, y, activation, output_grad, grads_sum):
        """Stage k's forward of a micro-batch (`key_ids`: step, replica, micro-batch of its key): its
        activation goes to stage k+1. The last stage has nothing to send; its forward runs inside its backward."""
        if k == len(self.stages) - 1:
            return self._idle(key_ids, params, model_state, x, y, activation, output_grad, grads_sum)
        packed = self.packed
        h, _ = forward(self.stages[k], packed.params(k, params), packed.model_state(k, model_state),
                       self._input(k, x, activation), self.stages[k].forward_key(*key_ids))
        return self._outputs(grads_sum, model_state, x.shape[0], act_out=packed.to_message(h))

    def _backward(self, k, key_ids, params, model_state, x, y, activation, output_grad, grads_sum):
        """Stage k's backward of a micro-batch: forward again from its input (with its forward's key),
        then the VJP of the input-gradient stage k+1 sent (the last stage: of its loss)."""
        packed, stage, K = self.packed, self.stages[k], len(self.stages)
        p, s, h = packed.params(k, params), packed.model_state(k, model_state), self._input(k, x, activation)
        key, loss = stage.forward_key(*key_ids), 0.0
        if k == K - 1:
            loss, new_state, d_params, d_input = last_stage_grads(stage, self.loss_fn, p, s, h, y, input_grad=k > 0,
                                                                  key=key)
        else:
            d_params, d_input, new_state = delayed_grads(stage, p, s, h, packed.from_message(output_grad, k + 1),
                                                         input_grad=k > 0, key=key)
        return self._outputs(grads_sum, model_state, x.shape[0],
                             grad_out=None if d_input is None else packed.to_message(d_input),
                             d_params=packed.pack_params(k, d_params), new_state=packed.pack_model_state(k, new_state),
                             loss=loss)

