"""Execute a committed notebook in a Jupyter kernel that imports this checkout's llamaviz."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def execute(path: Path, cwd: Path, extra_cells: tuple[str, ...] = (), timeout: int = 900):
    """(the executed notebook, every code cell's outputs); skips without nbclient or a python3 kernel."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")  # "python" there is this interpreter: the .venv runs it
    except NoSuchKernel:
        pytest.skip("no python3 Jupyter kernel")
    book = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code"), "commit it without outputs"
    book.cells.extend(nbformat.v4.new_code_cell(source) for source in extra_cells)
    client = nbclient.NotebookClient(book, kernel_name="python3", timeout=timeout,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute(env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    outputs = [out for cell in book.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, errors
    return book, outputs
