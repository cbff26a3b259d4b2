"""Attribution on the CPU mesh: FDBP (2,4) selective as is, and with parts removed (wrong arithmetic, same shapes)."""
import sys, jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np, optax, jax.numpy as jnp
import fdbp_jax as fj
from fdbp_jax import models, partition, perf
from fdbp_jax.engines import fdbp_mesh
from fdbp_jax.losses import cross_entropy
variants = sys.argv[1].split(","); rounds = int(sys.argv[2]); model = sys.argv[3] if len(sys.argv) > 3 else "resnet20"
blocks = models.model_blocks(model); B = 128
rng = np.random.default_rng(0)
x = rng.normal(size=(B, 32, 32, 3)).astype(np.float32); y = rng.integers(0, 10, B).astype(np.int32)
flops, _ = partition.block_costs(blocks, jax.ShapeDtypeStruct((B // 2, 32, 32, 3), jnp.float32))
cut = partition.linear_partition(flops, 4)
stages = partition.join_blocks(blocks, cut)
import os
if os.environ.get("SPLIT") == "time":
    hb = models.model_blocks(model, split_unit="half-block") if os.environ.get("HALF") else blocks
    tcost, _ = partition.block_costs(hb, jax.ShapeDtypeStruct((B // 2, 32, 32, 3), jnp.float32), measure="time")
    tcut = partition.linear_partition(tcost, 4)
    print("time cut", tcut, "flops cut", cut, "time balance", partition.balance(tcost, tcut))
    stages = partition.join_blocks(hb, tcut)
opt = optax.sgd(0.05, momentum=0.9)
orig = (fdbp_mesh.write_row, fdbp_mesh.read_row, fdbp_mesh._link_swap.swap, fdbp_mesh.mean_over, fdbp_mesh.SELECTIVE_POLICY)
def restore():
    fdbp_mesh.write_row, fdbp_mesh.read_row, fdbp_mesh._link_swap.swap, fdbp_mesh.mean_over, fdbp_mesh.SELECTIVE_POLICY = orig
def make(v):
    restore()
    if v == "noswap":
        fdbp_mesh._link_swap.swap = lambda messages, K, axis="stage": list(messages)
    if v == "nomean":
        fdbp_mesh.mean_over = lambda axis, tree, state=None: (tree, state)
    if v == "saveall":
        fdbp_mesh.SELECTIVE_POLICY = jax.checkpoint_policies.everything_saveable
    if v == "bp":
        return fj.Trainer(stages, cross_entropy, opt, mesh=fj.make_mesh(8, 1), algorithm="bp")
    if v == "noring":
        fdbp_mesh.write_row = lambda ring, row, slot: ring
        fdbp_mesh.read_row = lambda ring, slot: jnp.zeros(ring.shape[:-2] + ring.shape[-1:], ring.dtype)
    stash = v.split(":")[1] if ":" in v else "selective"
    return fj.Trainer(stages, cross_entropy, opt, mesh=fj.make_mesh(2, 4), stash=stash)
trainers = {}
for v in variants:
    t = make(v); st = t.init(jax.random.key(0), x); st, _ = t.step(st, x, y)  # trace with this variant's patches
    trainers[v] = (t, st)
restore()
res = {v: [] for v in variants}
for r in range(rounds):
    for v in variants:
        t, st = trainers[v]
        _, s, st = perf.time_steps(t, st, x, y, 8, warmup=2)
        trainers[v] = (t, st); res[v].append(1e6 * s / B)
        print(r, v, f"{1e6 * s / B:.0f} us/example", flush=True)
for v in variants:
    print(v, [round(a) for a in res[v]], "ratio to bp", [round(a / b, 3) for a, b in zip(res[v], res["bp"])] if "bp" in res else "")
