"""FDBP on a ("data", "stage") mesh: the fully decoupled schedule of `fdbp_emulator.py`, stage k on
the devices of mesh column k (`_mesh_layer.py`: packing, stage switch, inference).

One jitted tick runs a `shard_map` in which every device executes only its own stage. Activations
move to stage k+1 and input-gradients to stage k-1 as swaps over the links between neighbours
(`_link_swap.py`: one `ppermute` per phase carries both directions), the labels by their own `ppermute`;
parameter gradients are averaged by `pmean` along "data".

The stash of in-flight forwards stays on device. With ``stash="recompute"`` it holds each
forward's input and weights, and the backward re-runs that forward to get its exact VJP (~1/3 more
compute). With ``stash="residuals"`` it holds the forward's VJP residuals and applies that
forward's own pullback: no recomputation, but far more memory and copying (measured slower on CPU;
see docs/performance.md). ``stash="selective"`` is in between: the forward runs under
`jax.checkpoint` with a policy that saves the outputs of convolutions and matmuls, so the stash holds
those (with the input and weights) and the backward re-runs only the cheap elementwise ops between them.
``stash="auto"`` (`Trainer`'s default) picks, at `init`, the fastest of these whose rings fit in the
device's memory (`_stash_choice.py`); `stash` then names the mode chosen.

Each stage's part of the tick is `fdbp_stage.StageTick`, shared with the emulators; a staleness
correction that moves the forward's weights (`predict`) gets the stage's optimizer state, unpacked
inside its branch, and the stash keeps the weights the forward ran with.
"""

from __future__ import annotations

from functools import cache, partial
from typing import NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fdbp_jax import schedule
from fdbp_jax.corrections import Correction, NoCorrection
from fdbp_jax.distributed import place
from fdbp_jax.engines import _link_swap, _stash_choice
from fdbp_jax.engines._flat import SlotLayout, mean_over
from fdbp_jax.engines._mesh_layer import (
    STAGE,
    STAGE_DATA,
    PackedStages,
    StagedMeshEngine,
    local_block,
    make_predict,
    shardings,
    stage_metrics,
    stage_switch,
    stage_table,
    stage_update,
    with_stage_axis,
)
from fdbp_jax.engines.fdbp_stage import StageTick, Stashed
from fdbp_jax.stages import LossFn, Stage, finish_stage, split_variables

STASH_MODES = ("recompute", "selective", "residuals")
STASH_CHOICES = (_stash_choice.AUTO, *STASH_MODES)  # what `stash=` takes: a mode, or the fastest that fits
# what "selective" keeps of a forward: the outputs of convolutions and matmuls (the rest is re-run)
SELECTIVE_POLICY = jax.checkpoint_policies.dots_saveable


@flax.struct.dataclass
class EngineState:
    """Pipeline state; leading axis K is sharded over "stage", the next one (if any) over "data"."""

    tick: jax.Array  # () replicated
    params: dict  # dtype -> (K, P)
    model_state: dict  # dtype -> (K, M)
    opt_state: dict  # dtype -> (K, O)
    stash: tuple  # per slot (`SlotLayout`), (K, N, D, W_j): per replica, each in-flight forward's residuals or input
    stash_params: dict  # "recompute" only, dtype -> (K, D, P): weights each in-flight forward used
    stash_model_state: dict  # "recompute" only, dtype -> (K, D, M)
    # per link phase (`_link_swap`), (K, N, b, A): what stage k's partner on that phase's link sent it
    # last tick, the activation from k-1 or the input-gradient from k+1
    messages: tuple
    label_msg: jax.Array  # (K, N, b, ...): the labels of the activation arriving at stage k


def write_row(ring: jax.Array, row: jax.Array, slot: jax.Array) -> jax.Array:
    """A ring's local block ((1, [1,] D, W): stage, [replica,] depth, width) with depth row `slot` set to
    `row` (W,), by one dynamic-update-slice of the block as it arrived, which XLA runs in place. Slicing
    the block to (D, W) first, or `.at[slot].set` (a bounds-checked scatter), made XLA copy the whole
    ring several times a tick (measured on CPU: 5 copies, 13x slower for a 480 MB ring)."""
    lead = ring.ndim - 2
    return jax.lax.dynamic_update_slice(ring, row.reshape((1,) * (lead + 1) + row.shape), (0,) * lead + (slot, 0))


def read_row(ring: jax.Array, slot: jax.Array) -> jax.Array:
    """Depth row `slot` of a ring's local block: (1, [1,] D, W) -> (1, [1,] W)."""
    lead = ring.ndim - 2
    row = jax.lax.dynamic_slice(ring, (0,) * lead + (slot, 0), (1,) * (lead + 1) + ring.shape[-1:])
    return row.reshape(ring.shape[:lead] + ring.shape[-1:])


def forward_with_pullback(stage: Stage, stash: str, params, model_state, x, key: jax.Array, input_grad: bool):
    """A stage's training forward and its pullback (w.r.t. params, and the input if `input_grad`):
    (output, pullback, model state). With the "selective" stash the forward runs under `jax.checkpoint`
    (SELECTIVE_POLICY), so the pullback's residuals are what that policy saves."""
    if stash == "selective":  # the key travels as its raw bits: a re-run forward needs it, and
        # residuals are packed into arrays of plain dtypes
        rerun = jax.checkpoint(
            lambda p, h, bits: stage.apply(p, model_state, h, train=True, key=jax.random.wrap_key_data(bits)),
            policy=SELECTIVE_POLICY,
        )
        key_bits = jax.random.key_data(key)
        run = lambda p, h: rerun(p, h, key_bits)
    else:
        run = lambda p, h: stage.apply(p, model_state, h, train=True, key=key)
    if not input_grad:
        return jax.vjp(lambda p: run(p, x), params, has_aux=True)
    return jax.vjp(run, params, x, has_aux=True)


def ring_depth(k: int, K: int) -> int:
    """Rows of stage k's stash ring: its delay (`schedule.stash_depth`), and at least one, so that the
    last stage's (unused) and K=1's rings are not empty arrays."""
    return max(1, schedule.stash_depth(k, K))


def never_run(branch, *operands):
    """Zeros shaped as `branch(*operands)`: a conditional's branch that is never taken."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(branch, *operands))


class Inbox(NamedTuple):
    """The messages arriving at a stage device this tick: (b, A) rows per link phase, and the labels."""

    messages: tuple
    labels: jax.Array


class Weights(NamedTuple):
    """A stage device's own packed params, model state and optimizer state (dtype -> (P,), (M,), (O,))."""

    params: dict
    model_state: dict
    opt_state: dict


class Rings(NamedTuple):
    """A device's stash rings (local blocks) and this tick's row of them: a ring holds stage_delay rows, so
    the row the delayed backward reads is the one this tick's forward takes. The stage's branch reads it
    from the rings, and the tick's own row is written after the branch, from its outputs: with the write
    depending on the read, XLA copies no ring and no due row is kept in state."""

    stash: tuple  # per slot, (1, 1, D, W_j)
    params: dict  # "recompute" only, dtype -> (1, D, P)
    model_state: dict  # "recompute" only, dtype -> (1, D, M)
    slot: jax.Array  # this tick's row: read by the delayed backward, then written by this tick's forward

    def due_row(self) -> "Row":
        """The row this tick's delayed backward uses (one replica)."""
        read = lambda rings, local: jax.tree.map(lambda ring: read_row(ring, self.slot)[local], rings)
        return Row(read(self.stash, (0, 0)), read(self.params, 0), read(self.model_state, 0))

    def written(self, row: "Row") -> "Rings":
        """The rings with this tick's row set to `row`."""
        write = lambda rings, rows: jax.tree.map(partial(write_row, slot=self.slot), rings, rows)
        return self._replace(stash=write(self.stash, row.entry), params=write(self.params, row.params),
                             model_state=write(self.model_state, row.model_state))


class Row(NamedTuple):
    """What a stashing stage keeps of one forward (one replica), packed: its residuals or input, and
    ("recompute") the weights it ran with."""

    entry: tuple  # per slot, (W_j,)
    params: dict  # "recompute" only, dtype -> (P,)
    model_state: dict  # "recompute" only, dtype -> (M,)


class MeshEngine(StagedMeshEngine):
    """FDBP on a mesh; same contract and state transitions as `Emulator`."""

    def __init__(
        self, stages: Sequence[Stage], loss_fn: LossFn, optimizers: Sequence[optax.GradientTransformation],
        shrink: float, mesh: Mesh, stash: str = "recompute", skip_nonfinite: bool = False,
        correction: Correction = NoCorrection(),
    ):
        if stash not in STASH_CHOICES:
            raise ValueError(f"stash={stash!r} is not known: use one of {STASH_CHOICES}")
        self.stages = list(stages)
        self.loss_fn = loss_fn
        self.optimizers = list(optimizers)  # one per stage
        self.shrink = shrink
        self.mesh = mesh
        self.requested_stash = stash
        self.stash = stash  # "auto" chosen by `init`
        self.skip_nonfinite = skip_nonfinite
        self.correction = correction
        self.stage_ticks = [StageTick(s, k, len(self.stages), loss_fn, shrink, correction)
                            for k, s in enumerate(self.stages)]
        self.packed: PackedStages | None = None
        self.stash_slots: SlotLayout | None = None  # one stash entry (residuals, or the input) of each stage k < K-1
        self._step = None
        self._predict = None

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def init(self, variables: Sequence[dict], shapes: Sequence[jax.ShapeDtypeStruct], label: jax.ShapeDtypeStruct):
        K, N = self.num_stages, self.mesh.shape["data"]
        params, model_state = zip(*(split_variables(v) for v in variables))
        opt_state = [o.init(p) for o, p in zip(self.optimizers, params)]
        self.packed = packed = PackedStages.build(params, model_state, opt_state, shapes)
        b, D = shapes[0].shape[0], ring_depth(0, K)  # every device's rings, sized for stage 0's, the deepest
        packed_params, packed_state, packed_opt = packed.stack(params, model_state, opt_state)
        layout = cache(lambda stash: self._stash_layout(stash, params, model_state, shapes))  # traced once a mode
        self.stash = self.requested_stash
        if self.stash == _stash_choice.AUTO:
            def ring_bytes(stash: str) -> int:  # one device's stash rings (entries, and weights to recompute with)
                weights = (packed_params, packed_state) if stash == "recompute" else ()
                return D * (sum(w * np.dtype(d).itemsize for d, w in layout(stash).slots)
                            + sum(v[0].nbytes for tree in weights for v in tree.values()))
            local = self.mesh.local_devices
            self.stash = _stash_choice.fastest_fitting_stash(
                ring_bytes, _stash_choice.device_memory_bytes(local[0], len(local)))
        self.stash_slots = layout(self.stash)
        message = lambda: np.zeros((K, N, b, packed.message_width), packed.message_dtype)
        rings = {
            "stash": tuple(np.zeros((K, N, D, width), d) for d, width in self.stash_slots.slots),
            "stash_params": self._weight_stash(packed_params, D),
            "stash_model_state": self._weight_stash(packed_state, D),
        }
        state = EngineState(
            tick=np.zeros((), np.int32),
            params=packed_params,
            model_state=packed_state,
            opt_state=packed_opt,
            **rings,
            messages=tuple(message() for _ in range(_link_swap.link_phases(K))),
            label_msg=np.zeros((K, N, *label.shape), label.dtype),
        )
        specs = self.state_specs(state)
        self._step = jax.jit(
            jax.shard_map(
                self._local_tick, mesh=self.mesh, in_specs=(specs, P("data"), P("data")),
                out_specs=(specs, P(), P(), P()), check_vma=False,
            ),
            donate_argnums=0,
        )
        self._predict = make_predict(self.mesh, self.stages, packed)
        return place(state, shardings(self.mesh, specs))

    def _weight_stash(self, packed: dict, depth: int) -> dict:
        if self.stash != "recompute":
            return {}
        return {d: np.zeros((v.shape[0], depth, v.shape[1]), v.dtype) for d, v in packed.items()}

    def _stash_layout(self, stash: str, params, model_state, shapes) -> SlotLayout:
        """The slots of one stash entry (per replica) of every stage k < K-1 with this stash mode."""
        return SlotLayout.of([
            jax.eval_shape(partial(self._stash_entry_shapes, stash, k), params[k], model_state[k], shapes[k])
            for k in range(self.num_stages - 1)
        ])

    def _stash_entry_shapes(self, stash, k, params, model_state, x):
        """What stage k keeps of one forward (per replica): the VJP residuals, or the input."""
        if stash == "recompute":
            return [x]
        key = self.stages[k].forward_key(0, 0)
        return jax.tree.leaves(forward_with_pullback(self.stages[k], stash, params, model_state, x, key, k > 0)[1])

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
            messages=tuple(STAGE_DATA for _ in state.messages),
            label_msg=STAGE_DATA,
        )

    # ---- inside shard_map: local blocks of one device --------------------------------------

    def _local_tick(self, state: EngineState, x: jax.Array, y: jax.Array):
        K, t = self.num_stages, state.tick
        stage_index = jax.lax.axis_index("stage")
        params, model_state, opt_state = local_block((state.params, state.model_state, state.opt_state))

        depth = stage_table([ring_depth(k, K) for k in range(K)], stage_index)
        # this tick's forward's row: the ring's oldest, the forward of stage_delay ticks ago, which this
        # tick's backward reads in the stage's branch before the row is written
        slot = t % depth
        work = [partial(self._stage_work, k) for k in range(K)]
        operands = (t, jax.lax.axis_index("data"), Weights(params, model_state, opt_state), x, y,
                    Inbox(tuple(m[0, 0] for m in state.messages), state.label_msg[0, 0]))
        rings = Rings(state.stash, state.stash_params, state.stash_model_state, slot)

        def stashing(rings, operands):  # a stage k < K-1: its work, then its row of every ring
            branches = work[:-1]
            if len(branches) == 1:  # a switch of one branch is inlined, which puts its due-row reads beside
                # the ring's write, and XLA then copies the ring (measured: K=2); a second branch, never
                # taken, keeps the stage's work in a conditional of its own
                branches = [*branches, partial(never_run, branches[0])]
            *outputs, row = stage_switch(self.mesh, branches)(stage_index, *operands, rings)
            return (*outputs, rings.written(row))

        # the last stage stashes nothing: it builds no entry (one padded to the others' slots would be
        # zero-filled each tick: 50 MB on 2 real workers, ResNet-20 K=2 selective) and skips the ring's
        # write and read (measured there: 2-6 ms a tick, the last stage being the slower one).
        def last(rings, operands):
            *outputs, _ = stage_switch(self.mesh, work[-1:])(0, *operands, None)
            return (*outputs, rings)

        stashes = stage_index < K - 1
        outbox, labels_out, grads, fwd_state, loss, rings = (
            jax.lax.cond(stashes, stashing, last, rings, operands) if K > 1 else last(rings, operands))
        (grads, loss), fwd_state = mean_over("data", (grads, loss), fwd_state)

        new_params, new_opt_state, new_model_state, nonfinite = finish_stage(
            stage_update(self.packed, self.optimizers, stage_index), params, opt_state, model_state, grads, fwd_state, schedule.has_forward(t, stage_index),
            schedule.has_gradient(t, stage_index, K), self.skip_nonfinite,
        )
        forward_pairs = [(k, k + 1) for k in range(K - 1)]
        new_state = with_stage_axis(EngineState(  # every per-stage leaf gets back its local "stage" axis
            tick=None,
            params=new_params,
            model_state=new_model_state,
            opt_state=new_opt_state,
            stash=None,
            stash_params=None,
            stash_model_state=None,
            messages=tuple(m[None] for m in _link_swap.swap(outbox, K)),
            # one stage sends no labels (an empty ppermute still makes XLA:CPU's devices meet)
            label_msg=(jax.lax.ppermute(labels_out, "stage", forward_pairs) if forward_pairs
                       else jnp.zeros_like(labels_out))[None],
        )).replace(  # the rings keep the local block shapes they arrived in
            tick=t + 1, stash=rings.stash, stash_params=rings.params, stash_model_state=rings.model_state,
        )
        loss, nonfinite = stage_metrics(loss, nonfinite, K)
        return new_state, jnp.where(schedule.loss_is_valid(t, K), loss, jnp.nan), nonfinite, t

    def _stage_work(self, k, t, replica, weights: "Weights", x, y, inbox: "Inbox", rings: "Rings | None"):
        """Stage k's forward and its gradient at tick t (one replica, `StageTick`), and last the `Row` it
        stashes of that forward (None for the last stage), written into the rings outside the stage
        switch, where XLA writes in place (a ring written inside the switch was copied); outputs padded
        to common shapes. The backward reads its due row of `rings` here, before that write."""
        packed, work = self.packed, self.stage_ticks[k]
        params, model_state = packed.params(k, weights.params), packed.model_state(k, weights.model_state)
        activation_in, gradient_in = _link_swap.inbox(k, self.num_stages, inbox.messages)
        x_in = x if k == 0 else packed.from_message(activation_in, k)
        labels = y if k == 0 else inbox.labels
        no_message = packed.no_message(x_in.shape[0])
        if work.is_last:  # delay 0: loss and gradients at once, nothing to stash
            loss, fwd_state, grads, input_grad = work.last(t, replica, params, model_state, x_in, labels)
            outputs, labels_out, row = None, jnp.zeros_like(labels), None
        else:
            if self.correction.moves_forward_weights:
                params = work.forward_params(params, packed.opt_layouts[k].unpack(weights.opt_state))
            if self.stash != "recompute":  # the stashed forward's own pullback, from its residuals
                outputs, pullback, fwd_state = forward_with_pullback(
                    self.stages[k], self.stash, params, model_state, x_in, work.forward_key(t, replica), k > 0)
                leaves, treedef = jax.tree.flatten(pullback)
                if [(leaf.shape, leaf.dtype) for leaf in leaves] != self.stash_slots.shapes(k):
                    raise RuntimeError(f"stage {k}: VJP residuals differ between init and tick tracing")
                entry = self.stash_slots.pack(k, leaves)
                # the pullback of the forward this stage ran stage_delay ticks ago, from its residuals
                output_grad = work.output_grad(packed.from_message(gradient_in, k + 1))
                cotangents = jax.tree.unflatten(treedef, self.stash_slots.unpack(k, rings.due_row().entry))(output_grad)
                grads, input_grad = cotangents if k > 0 else (cotangents[0], None)
            else:
                outputs, fwd_state = work.forward(t, replica, params, model_state, x_in)
                entry = self.stash_slots.pack(k, [x_in])
                due_row = rings.due_row()
                (used_input,) = self.stash_slots.unpack(k, due_row.entry)
                due = Stashed(packed.params(k, due_row.params), packed.model_state(k, due_row.model_state), used_input)
                grads, input_grad = work.backward(t, replica, due, packed.from_message(gradient_in, k + 1))
            kept_weights = ({}, {})
            if self.stash == "recompute":  # the weights its forward ran with (packed), to run it again
                forward_params = (packed.pack_params(k, params) if self.correction.moves_forward_weights
                                  else weights.params)
                kept_weights = (forward_params, weights.model_state)
            # the barrier keeps the weights an output of this branch (not forwarded around it), so their
            # write waits for the branch's read of the due rows and XLA need not copy their rings
            row = Row(*jax.lax.optimization_barrier((entry, *kept_weights)))
            labels_out, loss = labels, 0.0
        message = lambda h: no_message if h is None else packed.to_message(h)
        return (
            _link_swap.outbox(k, self.num_stages, message(outputs), message(input_grad), no_message),
            labels_out,
            packed.pack_params(k, grads),
            packed.pack_model_state(k, fwd_state),
            jnp.asarray(loss, jnp.float32),
            row,
        )
