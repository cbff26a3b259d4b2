"""Stage boundaries that are pytrees (an activation with a mask, a skip tensor beside the main path):
each boundary's leaves are packed into one (batch, width) array, so every engine moves, stashes and
differentiates one array per boundary as before. Single-array boundaries are left as they are."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BoundaryLayout:
    """Where each leaf of one boundary's pytree lies in its packed rows. Floating leaves keep their
    values exactly; other leaves (bool masks, integer ids) travel as float32, exact up to 2**24, and
    get no gradient."""

    treedef: Any
    leaves: tuple  # (per-example shape, dtype) per leaf, in tree order
    dtype: np.dtype  # of the packed rows

    @classmethod
    def of(cls, tree: PyTree, where: str) -> "BoundaryLayout":
        flat, treedef = jax.tree.flatten(tree)
        batches = {leaf.shape[0] if leaf.shape else None for leaf in flat}
        if len(batches) != 1 or None in batches:
            shapes = ", ".join(str(tuple(leaf.shape)) for leaf in flat)
            raise ValueError(
                f"{where} is a pytree whose leaves do not share one leading batch axis (shapes {shapes}): "
                "every leaf of a stage boundary must have the batch first"
            )
        dtypes = [np.dtype(leaf.dtype) for leaf in flat]
        floating = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
        exact = floating if len(floating) == len(dtypes) else [*floating, np.dtype(np.float32)]
        return cls(treedef, tuple((tuple(leaf.shape[1:]), d) for leaf, d in zip(flat, dtypes)),
                   np.dtype(jnp.result_type(*exact)))

    @property
    def width(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for shape, _ in self.leaves)

    def packed(self, batch: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, self.width), self.dtype)

    def pack(self, tree: PyTree) -> jax.Array:
        """The boundary's pytree -> (batch, width) rows."""
        flat = jax.tree.leaves(tree)
        return jnp.concatenate([leaf.reshape(leaf.shape[0], -1).astype(self.dtype) for leaf in flat], axis=1)

    def unpack(self, rows: jax.Array) -> PyTree:
        """(batch, width) rows -> the boundary's pytree, each leaf in its own shape and dtype."""
        leaves, offset = [], 0
        for shape, dtype in self.leaves:
            size = int(np.prod(shape, dtype=np.int64))
            leaves.append(rows[:, offset : offset + size].reshape(rows.shape[0], *shape).astype(dtype))
            offset += size
        return jax.tree.unflatten(self.treedef, leaves)


def is_array(shape: PyTree) -> bool:
    """True for a boundary that is one array (nothing to pack)."""
    return isinstance(shape, jax.ShapeDtypeStruct)


def pack_boundaries(stages: Sequence, shapes: Sequence[PyTree]) -> tuple[list, list[jax.ShapeDtypeStruct]]:
    """Stages whose pytree boundaries are packed (stage k packs its output, stage k+1 unpacks its
    input), with each boundary's shape as the engines see it; array boundaries are unchanged."""
    stages, shapes = list(stages), list(shapes)
    for k in range(1, len(stages)):
        if is_array(shapes[k]):
            continue
        layout = BoundaryLayout.of(shapes[k], f"the output of stage {k - 1}")
        stages[k - 1] = dataclasses.replace(stages[k - 1], out_layout=layout)
        stages[k] = dataclasses.replace(stages[k], in_layout=layout)
        shapes[k] = layout.packed(jax.tree.leaves(shapes[k])[0].shape[0])
    return stages, shapes
