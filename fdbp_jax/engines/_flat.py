"""Pack a pytree into one flat vector per dtype, padded to a common length.

Stages differ in parameter, optimizer-state and activation shapes, but inside ``shard_map`` every
device must hold same-shaped blocks; packing each stage's tree into padded flat vectors gives every
stage device an identical local layout, while each stage unpacks its own tree exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdbp_jax.stages import averaged_over_replicas

PyTree = Any
Flat = dict  # dtype name -> 1-D array


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where each leaf of one pytree lives in its dtype's flat vector."""

    treedef: Any
    leaves: tuple  # (dtype name, offset, shape) per leaf, in tree order
    sizes: Mapping[str, int]  # used length per dtype

    @classmethod
    def of(cls, tree: PyTree) -> "FlatLayout":
        flat, treedef = jax.tree.flatten(tree)
        sizes: dict[str, int] = {}
        leaves = []
        for leaf in flat:
            key = np.dtype(leaf.dtype).name
            leaves.append((key, sizes.get(key, 0), tuple(leaf.shape)))
            sizes[key] = sizes.get(key, 0) + int(np.prod(leaf.shape, dtype=np.int64))
        return cls(treedef, tuple(leaves), sizes)

    def pack(self, tree: PyTree, padded: Mapping[str, int]) -> Flat:
        """Tree -> {dtype: vector of length padded[dtype]}, zero-padded: each leaf written into zeros at
        its offset (XLA:CPU's loop over a concatenate walks the whole output once per operand)."""
        out = {key: jnp.zeros((length,), key) for key, length in padded.items()}
        for (key, offset, _), leaf in zip(self.leaves, jax.tree.leaves(tree)):
            out[key] = jax.lax.dynamic_update_slice(out[key], jnp.ravel(leaf), (offset,))
        return out

    def unpack(self, flat: Mapping[str, jax.Array]) -> PyTree:
        """{dtype: vector} -> tree (padding ignored)."""
        leaves = [
            flat[key][offset : offset + int(np.prod(shape, dtype=np.int64))].reshape(shape)
            for key, offset, shape in self.leaves
        ]
        return jax.tree.unflatten(self.treedef, leaves)


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Several trees (one per stage) sharing one tuple of flat slots: slot j of a dtype holds the j-th
    largest leaf of that dtype of every tree, and is as long as the longest of them. The largest
    tree's leaves then pack and unpack as reshapes, with no concatenate: XLA:CPU's loop over a
    concatenate of ResNet-20's residuals (22 MB at 64 examples) cost a fifth of a stage's tick."""

    slots: tuple  # (dtype name, length) per slot
    trees: tuple  # per tree: (treedef, ((slot, shape), ...) per leaf in tree order)

    @classmethod
    def of(cls, trees: Sequence[PyTree]) -> "SlotLayout":
        size = lambda leaf: math.prod(leaf.shape)
        ranked = []  # per tree: (treedef, [(dtype name, rank by size within its dtype, shape)] in tree order)
        for tree in trees:
            flat, treedef = jax.tree.flatten(tree)
            ranks, seen = [None] * len(flat), {}
            for i in sorted(range(len(flat)), key=lambda i: -size(flat[i])):
                key = np.dtype(flat[i].dtype).name
                seen[key] = seen.get(key, -1) + 1
                ranks[i] = (key, seen[key], tuple(flat[i].shape))
            ranked.append((treedef, ranks))
        longest: dict[tuple, int] = {}  # (dtype name, rank) -> the slot's length
        for _, ranks in ranked:
            for key, rank, shape in ranks:
                longest[key, rank] = max(longest.get((key, rank), 1), math.prod(shape))
        order = sorted(longest) or [("float32", 0)]
        slot = {name: j for j, name in enumerate(order)}
        return cls(tuple((key, longest.get((key, rank), 1)) for key, rank in order),
                   tuple((treedef, tuple((slot[key, rank], shape) for key, rank, shape in ranks))
                         for treedef, ranks in ranked))

    def empty(self) -> tuple:
        """Zeros in every slot (what a tree with no leaves packs to)."""
        return tuple(jnp.zeros((length,), key) for key, length in self.slots)

    def shapes(self, k: int) -> list:
        """(shape, dtype) of tree k's leaves, in tree order."""
        return [(shape, np.dtype(self.slots[slot][0])) for slot, shape in self.trees[k][1]]

    def pack(self, k: int, tree: PyTree) -> tuple:
        """Tree k -> one vector per slot: its leaf there raveled and zero-padded, zeros where it has none."""
        out = list(self.empty())
        for (slot, _), leaf in zip(self.trees[k][1], jax.tree.leaves(tree)):
            row, length = jnp.ravel(leaf), self.slots[slot][1]
            out[slot] = row if row.shape[0] == length else jnp.pad(row, (0, length - row.shape[0]))
        return tuple(out)

    def unpack(self, k: int, slots: Sequence[jax.Array]) -> PyTree:
        """One vector per slot -> tree k (padding ignored)."""
        leaves = [slots[slot][: math.prod(shape)].reshape(shape) for slot, shape in self.trees[k][1]]
        return jax.tree.unflatten(self.trees[k][0], leaves)


def padded_sizes(layouts: Sequence[FlatLayout]) -> dict[str, int]:
    """Common per-dtype length for a set of layouts (at least 1, so no array is empty)."""
    keys = sorted({key for layout in layouts for key in layout.sizes})
    return {key: max(1, *(layout.sizes.get(key, 0) for layout in layouts)) for key in keys}


def stack_packed(layouts: Sequence[FlatLayout], trees: Sequence[PyTree], padded: Mapping[str, int]) -> Flat:
    """Pack one tree per stage and stack them: {dtype: (K, length)} host arrays."""
    out = {key: np.zeros((len(layouts), length), jnp.dtype(key)) for key, length in padded.items()}
    for k, (layout, tree) in enumerate(zip(layouts, trees)):
        for (key, offset, shape), leaf in zip(layout.leaves, jax.tree.leaves(tree)):
            out[key][k, offset : offset + math.prod(shape)] = np.ravel(np.asarray(leaf))
    return out


def pad_rows(x: jax.Array, width: int, dtype) -> jax.Array:
    """(b, ...) -> (b, width): flatten each example and zero-pad it to a common message width."""
    rows = x.reshape(x.shape[0], -1).astype(dtype)
    return jnp.pad(rows, ((0, 0), (0, width - rows.shape[1])))


def unpad_rows(rows: jax.Array, like: jax.ShapeDtypeStruct) -> jax.Array:
    """Inverse of `pad_rows` for an activation of per-example shape/dtype `like` (batch axis first)."""
    features = int(np.prod(like.shape[1:], dtype=np.int64))
    return rows[:, :features].reshape(rows.shape[0], *like.shape[1:]).astype(like.dtype)


def pad_to_multiple(x, multiple: int) -> np.ndarray:
    """Host batch zero-padded along axis 0 to a multiple of `multiple` (so every replica gets a part)."""
    if isinstance(x, jax.Array) and x.shape[0] % multiple == 0:
        return x  # already whole (possibly a global array spanning processes)
    x = np.asarray(x)
    pad = (-x.shape[0]) % multiple
    return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x


def mean_over(axis_name, tree: PyTree, model_state: PyTree = None) -> tuple[PyTree, PyTree]:
    """`tree` (gradients, losses) averaged over the mesh axis `axis_name`, and `model_state` merged over
    it by the one rule of `stages.averaged_over_replicas` (floating leaves averaged, others kept), all
    in one collective per dtype: between processes a collective costs milliseconds of latency whatever
    its size (gloo on CPU: ~4 ms), so a tree of many leaves must not be one all-reduce per leaf, and an
    axis of one device needs none."""
    if jax.lax.axis_size(axis_name) == 1:
        return tree, model_state
    state_leaves, state_def = jax.tree.flatten(model_state)
    averaged = [i for i, leaf in enumerate(state_leaves) if averaged_over_replicas(leaf)]
    both = (tree, [state_leaves[i] for i in averaged])
    layout = FlatLayout.of(both)
    flat = {key: jax.lax.pmean(vector, axis_name) for key, vector in layout.pack(both, layout.sizes).items()}
    tree, means = layout.unpack(flat)
    for i, mean in zip(averaged, means):
        state_leaves[i] = mean
    return tree, jax.tree.unflatten(state_def, state_leaves)
