"""`host_memory`: with `keep_freed_memory` a process serves each execution's buffers from pages it
already holds, and under `mesh_environment` a process of several CPU devices does too (huge pages kept in
per-thread arenas), so repeated steps stop taking a page fault per 4 KiB (real processes: the settings
must precede JAX, the environment the process)."""

import os
import subprocess
import sys

import pytest

from fdbp_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = """
import resource, sys
from fdbp_jax import host_memory
if sys.argv[1] == "keep" and not host_memory.keep_freed_memory():
    sys.exit(5)
import jax, jax.numpy as jnp
devices = int(sys.argv[2])
if devices > 1:
    jax.config.update("jax_num_cpu_devices", devices)
def loss(weights, x):  # two 16-channel convs on 16 MiB activations
    for w in weights:
        x = jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return jnp.mean(x ** 2)
step = jax.jit(lambda ws, x: [w - 0.01 * g for w, g in zip(ws, jax.grad(loss)(ws, x))], donate_argnums=0)
key = jax.random.PRNGKey(0)
weights = [0.1 * jax.random.normal(key, (3, 3, 16, 16)) for _ in range(2)]
x = jax.random.normal(key, (256, 32, 32, 16))  # 16 MiB in all
if devices > 1:
    x = jax.device_put(x, jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("data",)), jax.P("data")))
for _ in range(20):  # warm-up: compilation, then the allocator settling on its high-water mark
    weights = jax.block_until_ready(step(weights, x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    weights = jax.block_until_ready(step(weights, x))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def faults_per_execution(mode: str, devices: int = 1) -> int:
    env = dict(os.environ, PYTHONPATH=ROOT)
    if devices > 1:  # the devices the program asks for, not the suite's simulated ones
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                    if "xla_force_host_platform_device_count" not in f)
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode, str(devices)], capture_output=True, text=True,
                          timeout=120, env=host_memory.mesh_environment(env) if mode == "mesh" else env)
    if done.returncode == 5:
        pytest.skip("this C library has no glibc mallopt")
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_kept_memory_spares_the_page_faults_of_each_execution():
    system, kept = faults_per_execution("system"), faults_per_execution("keep")
    assert system > 10_000  # ~24k faults a step with glibc's defaults (measured)
    assert kept < system / 10


def test_the_mesh_environment_spares_several_devices_the_page_faults_of_each_execution():
    if not host_memory.huge_pages_available():
        pytest.skip("no transparent huge pages for malloc here (glibc < 2.35, or turned off)")
    system, mesh = faults_per_execution("system", devices=2), faults_per_execution("mesh", devices=2)
    assert system > 10_000
    assert mesh < 100  # 6 a step (measured; ~450-580 with huge pages alone): its arenas keep every block


def test_a_program_restarts_itself_once_in_the_mesh_environment_keeping_its_arguments_and_settings():
    if not host_memory.huge_pages_available():
        pytest.skip("no transparent huge pages for malloc here (glibc < 2.35, or turned off)")
    program = ("import os, sys; from fdbp_jax import host_memory; print('start', flush=True); "
               "host_memory.restart_with_mesh_environment(); "
               "print(os.environ['GLIBC_TUNABLES'], os.environ['XLA_FLAGS'], sys.argv[1:])")
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-c", program, "--flag", "a b"], capture_output=True, text=True,
                          timeout=120, env=dict(env, PYTHONPATH=ROOT, GLIBC_TUNABLES="glibc.malloc.trim_threshold=1",
                                                XLA_FLAGS="--xla_cpu_enable_fast_math=false"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines.count("start") == 2  # once as started, once restarted; no third time
    assert lines[-1] == ("glibc.malloc.trim_threshold=1:glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:"
                         "glibc.malloc.top_pad=67108864 --xla_cpu_enable_fast_math=false "
                         "--xla_cpu_enable_concurrency_optimized_scheduler=false ['--flag', 'a b']")


def test_only_a_process_with_one_cpu_device_keeps_freed_memory_by_default(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.cpu_only()
    assert host_memory.keeps_freed_memory_by_default(1)
    assert not host_memory.keeps_freed_memory_by_default(8)  # simulated devices contend for one arena
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.cpu_only()
    assert not host_memory.keeps_freed_memory_by_default(1)
