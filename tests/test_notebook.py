"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel, with the results it promises."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        elif "data" in output and "text/plain" in output["data"]:
            parts.append(output["data"]["text/plain"])
    return "".join(parts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.timeout(600)
def test_quickstart_notebook_runs_and_secure_equals_plaintext(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Errors in any cell raise CellExecutionError here; the kernel is this venv's Python.
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    texts = [_text(c) for c in code_cells]
    everything = "\n".join(texts)
    assert "identical=True" in everything, everything[-3000:]
    assert "plaintext: " in everything and "secure:    " in everything
    assert "prefill + first token:" in everything and "MiB of ciphertext at the server" in everything
    # One latency row per generated token, with a growing encrypted cache.
    table = [row for row in (line.split() for line in everything.splitlines()) if len(row) == 4 and all(map(_is_number, row))]
    sizes = [float(row[3]) for row in table]
    assert len(sizes) == 4 and sizes[-1] >= sizes[0] > 0, table
    images = [o for c in code_cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the latency plot is missing"
