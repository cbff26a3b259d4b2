"""The notebooks (the quickstart, and your_model: a user's own NNX network) execute from top to bottom
(shrunk through their parameter variables) and are committed without outputs."""

import os

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = {name: os.path.join(ROOT, "notebooks", f"{name}.ipynb") for name in ("quickstart", "your_model")}
needs_cifar10 = pytest.mark.skipif(
    not os.path.isdir(os.path.join(os.environ.get("TFDS_DATA_DIR", "/nonexistent"), "cifar10")),
    reason="CIFAR-10 is not prepared under TFDS_DATA_DIR (CI sets it to ../shared/tfds)",
)


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS[name], as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count") for cell in notebook.cells if cell.cell_type == "code")


def execute(name: str, settings: dict, tmp_path, monkeypatch) -> str:
    """Run a notebook as Jupyter does, in a scratch folder; returns everything it printed."""
    from nbclient import NotebookClient

    for key, value in {**settings, "XLA_FLAGS": "", "MPLBACKEND": "Agg", "PYTHONPATH": ROOT}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS[name], as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


@needs_cifar10
def test_quickstart_executes(tmp_path, monkeypatch):
    printed = execute("quickstart", {"QUICKSTART_TRAIN_EXAMPLES": "512", "QUICKSTART_EVAL_EXAMPLES": "256",
                                     "QUICKSTART_EPOCHS": "1"}, tmp_path, monkeypatch)
    assert "mesh data=2 x stage=4" in printed and "FDBP K=4 test accuracy" in printed and "BP test accuracy" in printed


@needs_cifar10
def test_your_model_executes(tmp_path, monkeypatch):
    """A user's own NNX ResNet, split by cost, trained with FDBP and BP, loaded back with nnx.update."""
    printed = execute("your_model", {"YOUR_MODEL_TRAIN_EXAMPLES": "512", "YOUR_MODEL_EVAL_EXAMPLES": "250",
                                     "YOUR_MODEL_EPOCHS": "1"}, tmp_path, monkeypatch)
    assert "mesh data=2 x stage=4" in printed and "balance (mean/max stage FLOPs)" in printed
    assert "fdbp epoch 1: test accuracy" in printed and "bp epoch 1: test accuracy" in printed
    assert "FDBP K=4 final test accuracy" in printed and "predicted [" in printed


def install_cell(name: str = "quickstart") -> str:
    return "".join(nbformat.read(NOTEBOOKS[name], as_version=4).cells[1].source)


def test_notebooks_install_the_same_way():
    assert install_cell("your_model") == install_cell("quickstart")


@pytest.mark.parametrize("where", ["checkout", "elsewhere", "env"])
def test_install_cell_uses_the_checkout_or_the_given_package(where, tmp_path, monkeypatch):
    import importlib.util
    import subprocess

    calls = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as on a fresh Colab runtime
    monkeypatch.setattr(subprocess, "check_call", lambda args: calls.append(args[-1]))
    monkeypatch.chdir(os.path.join(ROOT, "notebooks") if where == "checkout" else tmp_path)
    monkeypatch.delenv("FDBP_JAX_PACKAGE", raising=False)
    if where == "env":
        monkeypatch.setenv("FDBP_JAX_PACKAGE", "git+https://example.org/me/fdbp_jax.git")
    if where == "elsewhere":
        with pytest.raises(RuntimeError, match="set FDBP_JAX_PACKAGE"):
            exec(install_cell(), {})
        assert calls == []
    else:
        exec(install_cell(), {})
        assert calls == [ROOT if where == "checkout" else "git+https://example.org/me/fdbp_jax.git"]
