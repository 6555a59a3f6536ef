"""Execute the notebooks on a real Jupyter kernel of this interpreter (nbclient).

    python notebooks/execute.py [--inplace] [--timeout S] [NOTEBOOK ...]

Each notebook runs top to bottom in a fresh kernel whose working directory and
default catalog (``CRYSTALMAPPING_CATALOG``) are in a temporary directory, so
nothing is left behind. The kernel is this interpreter's: a ``python3``
kernelspec naming ``sys.executable`` is written to a temporary directory put
first on ``JUPYTER_PATH``. A failing cell stops the run with its error.
``--inplace`` writes each executed notebook, outputs included, back to its file
(``make notebooks``); ``tests/test_notebooks.py`` runs them without writing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The notebooks, in the order they are run.
NOTEBOOKS = ["old_algorithm.ipynb", "batch_on_a_cluster.ipynb", "process_streaming_data.ipynb"]
KERNEL = "python3"


@contextlib.contextmanager
def kernel_environment(workdir: Path):
    """A ``python3`` kernelspec for ``sys.executable``, and a private default catalog."""
    spec = workdir / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (crystalmapping)", "language": "python",
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }))
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "CRYSTALMAPPING_CATALOG")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(workdir / "jupyter")] + ([saved["JUPYTER_PATH"]] if saved["JUPYTER_PATH"] else []))
    os.environ["CRYSTALMAPPING_CATALOG"] = str(workdir / "catalog")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(path: str | os.PathLike, workdir: str | os.PathLike, *, timeout: int = 300,
            inplace: bool = False):
    """Run one notebook in ``workdir``; return it executed (written back if ``inplace``).

    Raises ``nbclient.exceptions.CellExecutionError`` (the failing cell and its traceback).
    """
    import nbformat
    from nbclient import NotebookClient

    path, workdir = Path(path), Path(workdir)
    run_dir = workdir / path.stem
    run_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    with kernel_environment(workdir / path.stem):
        client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                                resources={"metadata": {"path": str(run_dir)}})
        client.execute()
    if inplace:
        nb.metadata.pop("widgets", None)
        scrub(nb, workdir)
        nbformat.write(nb, path)
    return nb


def scrub(nb, workdir) -> None:
    """Replace this machine's directories in the outputs (warnings name their files)."""
    names = [(str(workdir), "<tmp>"), (sys.prefix, "<env>"), (str(HERE.parent), "<repo>"),
             (sys.base_prefix, "<python>"), (str(Path.home()), "~")]
    names = sorted({(os.path.realpath(a), b) for a, b in names} | set(names),
                   key=lambda ab: -len(ab[0]))

    def clean(text: str) -> str:
        for old, new in names:
            text = text.replace(old, new)
        return text

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = clean(out["text"])
            for key, value in out.get("data", {}).items():
                if key.startswith("text/") and isinstance(value, str):
                    out["data"][key] = clean(value)
            if "traceback" in out:
                out["traceback"] = [clean(line) for line in out["traceback"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="default: every notebook of this folder")
    parser.add_argument("--inplace", action="store_true", help="write the outputs back")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.notebooks] or [HERE / n for n in NOTEBOOKS]
    with tempfile.TemporaryDirectory(prefix="crystalmapping-notebooks-") as tmp:
        for path in paths:
            print(f"executing {path.name}", flush=True)
            execute(path, tmp, timeout=args.timeout, inplace=args.inplace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
