"""Two processes x 4 CPU devices under jax.distributed (gloo), each feeding only its rows of every
global batch, give the same FDBP run as one process with 8 devices: same initial variables, same
batches, same final stage variables and predictions."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
import toy

import fdbp_jax as fj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS = 8

WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    from fdbp_jax import distributed
    distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np, optax
    sys.path.insert(0, sys.argv[4])
    import toy
    import fdbp_jax as fj
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    xs, ys = toy.batches(%d)
    trainer = fj.Trainer(toy.conv_stages(4, batch_norm=True), toy.cross_entropy, optax.sgd(0.05, momentum=0.9),
                         mesh=fj.make_mesh(2, 4))
    state = trainer.init(jax.random.key(7), xs[0])
    rows = trainer.local_rows(len(xs[0]))  # each process feeds only the rows its devices hold
    assert len(rows) == len(xs[0]) // 2
    losses = []
    for x, y in zip(xs, ys):
        state, metrics = trainer.step(state, x[rows.start : rows.stop], y[rows.start : rows.stop])
        losses.append(float(metrics["loss"]))
    leaves = jax.tree.leaves(trainer.stage_variables(state))
    logits = np.asarray(trainer.predict(state, xs[0][rows.start : rows.stop], len(xs[0])))
    np.savez(sys.argv[3] + f"/process{sys.argv[2]}.npz", losses=np.asarray(losses), logits=logits, *leaves)
    print("OK", flush=True)
""" % TICKS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
        pytest.skip("this jaxlib has no CPU collectives across processes (jax_cpu_collectives_implementation)")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), str(tmp_path), os.path.join(ROOT, "tests")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the two-process run did not finish in 240 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)

    xs, ys = toy.batches(TICKS)
    trainer = fj.Trainer(toy.conv_stages(4, batch_norm=True), toy.cross_entropy, optax.sgd(0.05, momentum=0.9),
                         mesh=fj.make_mesh(2, 4))
    state = trainer.init(jax.random.key(7), xs[0])
    state, losses = toy.run(trainer, state, xs, ys)
    expected = jax.tree.leaves(trainer.stage_variables(state))
    for i in range(2):
        got = np.load(tmp_path / f"process{i}.npz")
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
        np.testing.assert_allclose(got["logits"], np.asarray(trainer.predict(state, xs[0])), rtol=1e-4, atol=1e-5)
        arrays = [got[f"arr_{j}"] for j in range(len(expected))]
        assert toy.max_relative_error(expected, arrays) <= 1e-5
