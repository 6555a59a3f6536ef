"""The notebooks run top to bottom, and their assert cells hold."""

import json
import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["process_streaming_data.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CRYSTALMAPPING_CATALOG", str(tmp_path / "catalog"))
    monkeypatch.chdir(tmp_path)
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    namespace: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        code = "\n".join(line for line in source.splitlines()
                         if not line.lstrip().startswith(("!", "%")))
        try:
            exec(compile(code, f"{name} cell {i}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message names the cell
            raise AssertionError(f"{name}, code cell {i} failed: {exc!r}\n{source}") from exc
    import matplotlib.pyplot as plt

    plt.close("all")
    assert os.environ["CRYSTALMAPPING_CATALOG"].startswith(str(tmp_path))
