"""The quickstart notebook executes from top to bottom (shrunk through its parameter variables) and
is committed without outputs."""

import os

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count") for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(os.environ.get("TFDS_DATA_DIR", "/nonexistent"), "cifar10")),
    reason="CIFAR-10 is not prepared under TFDS_DATA_DIR (CI sets it to ../shared/tfds)",
)
def test_quickstart_executes(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    for name, value in {"QUICKSTART_TRAIN_EXAMPLES": "512", "QUICKSTART_EVAL_EXAMPLES": "256", "QUICKSTART_EPOCHS": "1",
                        "XLA_FLAGS": "", "MPLBACKEND": "Agg", "PYTHONPATH": ROOT}.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "mesh data=2 x stage=4" in printed and "FDBP K=4 test accuracy" in printed and "BP test accuracy" in printed


def install_cell() -> str:
    return "".join(nbformat.read(NOTEBOOK, as_version=4).cells[1].source)


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
