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
