"""The notebooks run top to bottom on a real Jupyter kernel, and their last cells' checks hold.

Each notebook is executed with nbclient on a ``python3`` kernel of this interpreter
(``notebooks/execute.py`` writes the kernelspec to a temporary directory first on
``JUPYTER_PATH``), in a temporary working directory with its own default catalog.
A failing cell fails the test with its source and traceback.
"""

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
_spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_every_notebook_is_run():
    assert sorted(execute.NOTEBOOKS) == sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", execute.NOTEBOOKS)
def test_notebook_runs_on_a_kernel(name, tmp_path):
    from nbclient.exceptions import CellExecutionError

    try:
        nb = execute.execute(NOTEBOOKS / name, tmp_path, timeout=600)
    except CellExecutionError as exc:
        pytest.fail(f"{name}: a cell failed\n{ANSI.sub('', str(exc))}", pytrace=False)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
    assert "assert" in code[-1].source  # the notebook ends in its checks
