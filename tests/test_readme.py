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


def test_python_example_runs(capsys):
    example = re.search(r"```python\n(.*?)```", readme(), flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.split()
    losses = np.asarray(printed[1::2], dtype=float)
    assert np.isnan(losses[:3]).all() and np.isfinite(losses[3:]).all()
    assert len(namespace["variables"]) == 4 and namespace["logits"].shape == (16, 10)
