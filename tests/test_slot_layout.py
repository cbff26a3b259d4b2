"""`engines._flat.SlotLayout`, the stash entries' packing: every stage's tree comes back exactly, and the
largest tree packs and unpacks as reshapes (no concatenate, pad or slice in the traced code)."""

import jax
import jax.numpy as jnp
import numpy as np

from fdbp_jax.engines._flat import SlotLayout


def trees():
    rng = np.random.default_rng(0)
    big = {"a": rng.normal(size=(4, 8, 8, 3)), "b": rng.normal(size=(4, 16)), "key": np.arange(2, dtype=np.uint32),
           "w": rng.normal(size=(3, 3, 3, 4))}
    small = [rng.normal(size=(4, 10)), rng.normal(size=(2, 2))]
    bools = (rng.normal(size=(5,)) > 0, rng.normal(size=(4, 8, 8, 3)))
    as_jax = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32 if a.dtype == np.float64 else a.dtype), tree)
    return [as_jax(big), as_jax(small), as_jax(bools), as_jax([])]


def test_every_tree_comes_back_exactly_from_shared_slots():
    layout = SlotLayout.of(trees())
    for k, tree in enumerate(trees()):
        packed = layout.pack(k, tree)
        assert [(p.shape[0], p.dtype.name) for p in packed] == [(n, d) for d, n in layout.slots]
        back = layout.unpack(k, packed)
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        for got, expected in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
        assert layout.shapes(k) == [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(tree)]
    # per dtype, slot j is as long as the j-th largest leaf of any tree: float32 768 (a), 108 (w), 64 (b)
    assert [n for d, n in layout.slots if d == "float32"] == [768, 108, 64]
    assert all(np.all(np.asarray(p) == 0) for p in layout.pack(3, []))


def test_the_largest_tree_packs_and_unpacks_without_copies():
    layout = SlotLayout.of(trees()[:2])
    copies = lambda fn, *args: {name for name in ("concatenate", "pad[", "slice[", "dynamic_slice")
                                if name in str(jax.make_jaxpr(fn)(*args))}  # nested jaxprs included
    big = trees()[0]
    assert not copies(lambda t: layout.pack(0, t), big)
    assert not copies(lambda p: layout.unpack(0, p), layout.pack(0, big))
    assert copies(lambda t: layout.pack(1, t), trees()[1]) == {"pad["}  # a smaller tree's leaves are padded
