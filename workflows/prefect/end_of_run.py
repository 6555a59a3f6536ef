"""Prefect flow ``end_of_run_workflow(stop_doc)``: map a grid scan when it ends.

The convention facilities use for end-of-run analysis: a bluesky callback (or
the catalog's writer) sends each run's stop document to a Prefect deployment of
this flow, which

1. takes the run's uid from the stop document (``run_start``), checked to be a
   plain uid before it names anything (it arrives over the network);
2. runs ``crystalmapping process-new --uid UID`` with the site's options file
   (``process-new.yaml``: the catalog, ``out_dir``, the background, the Dask
   ``scheduler`` or ``workers``), so exactly what a cron pass would do happens to
   that one run: a run that is not a grid scan, not finished or whose stop is not
   ``success`` is skipped, with the reason in the flow's log; otherwise its maps
   are written to ``OUT_DIR/<uid>.zarr`` on the Dask cluster the options name and
   recorded in the catalog as a derived run. A rerun maps nothing twice.

The flow run fails (and Prefect shows it failed) when the run could not be
mapped; its log holds the command's lines.

Run it once by hand::

    python workflows/prefect/end_of_run.py STOP_DOC.json --config process-new.yaml

Deploy it with ``prefect deploy`` from the repository root (``prefect.yaml`` in
this directory shows a deployment), and trigger it from the beamline with
``run_deployment("end_of_run_workflow/crystalmapping-end-of-run",
parameters={"stop_doc": stop_doc})``. Prefect is an optional extra:
``pip install 'crystalmapping[prefect]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

from prefect import flow, get_run_logger, task

#: The options file when the deployment gives none.
DEFAULT_CONFIG = os.environ.get("CRYSTALMAPPING_WORKFLOW_CONFIG", "process-new.yaml")


@task(name="uid-of-stop-document")
def uid_of(stop_doc: dict) -> str:
    """The run's uid from its stop document, checked to be one (it names a store)."""
    from crystalmapping.trust import check_uid

    if not isinstance(stop_doc, dict) or "run_start" not in stop_doc:
        raise ValueError("stop_doc must be a bluesky stop document (a dict with 'run_start'); "
                         f"got {str(stop_doc)[:120]!r}. Pass the run's stop document.")
    return check_uid(stop_doc["run_start"])


@task(name="map-run")
def map_run(uid: str, config: str) -> list[str]:
    """``crystalmapping process-new --config CONFIG --uid UID``; its lines, logged."""
    from crystalmapping.cli import main

    logger = get_run_logger()
    if not os.path.isfile(config):
        raise FileNotFoundError(
            f"no options file {config!r}: give the deployment's config parameter (or "
            "$CRYSTALMAPPING_WORKFLOW_CONFIG) the path of a process-new.yaml "
            "(workflows/process-new.yaml is an example).")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["process-new", "--config", config, "--uid", uid])
    lines = out.getvalue().splitlines() + err.getvalue().splitlines()
    for line in lines:
        logger.info(line)
    if status != 0:
        raise RuntimeError(f"run {uid} was not mapped (process-new exit status {status}): "
                           + " | ".join(lines[-3:]))
    return lines


@flow(name="end_of_run_workflow")
def end_of_run_workflow(stop_doc: dict, config: str = DEFAULT_CONFIG) -> list[str]:
    """Map the run a stop document ends (see the module's docstring).

    Parameters
    ----------
    stop_doc : dict
        The run's bluesky stop document.
    config : str
        Path of the site's ``process-new.yaml``.

    Returns
    -------
    lines : list of str
        What ``process-new`` printed: the run's line (``mapped``, ``skip`` with
        the reason, or ``already mapped``) and the summary.
    """
    uid = uid_of(stop_doc)
    return map_run(uid, config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stop_doc", help="a JSON file holding the run's stop document")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the site's process-new.yaml")
    args = parser.parse_args(argv)
    with open(args.stop_doc) as f:
        stop_doc = json.load(f)
    for line in end_of_run_workflow(stop_doc, args.config):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
