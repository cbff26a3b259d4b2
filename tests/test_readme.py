"""README stays true: its Python example runs as written and CI runs its test command."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    return open(os.path.join(ROOT, "README.md")).read()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^    (bash \.ci/setup && .*pytest.*)$", readme(), flags=re.M)
    assert len(commands) == 1
    assert commands[0] in open(os.path.join(ROOT, ".ci", "run")).read()


def test_python_examples_run(capsys):
    """The NNX example, then the linen one in the same namespace, as a reader runs them."""
    nnx_example, linen_example = re.findall(r"```python\n(.*?)```", readme(), flags=re.S)
    namespace: dict = {}
    exec(compile(nnx_example, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "balance (mean/max stage FLOPs)" in printed
    losses = np.asarray([line.split()[1] for line in printed.splitlines() if re.fullmatch(r"\d+ \S+", line)],
                        dtype=float)
    assert len(losses) == 8 and np.isnan(losses[:3]).all() and np.isfinite(losses[3:]).all()
    assert len(namespace["variables"]) == 4 and namespace["logits"].shape == (16, 10)
    exec(compile(linen_example, "README.md", "exec"), namespace)
    assert len(namespace["linen_variables"]) == 4 and "params" in namespace["linen_variables"][0]
