"""The Prefect flow ``end_of_run_workflow(stop_doc)`` (``workflows/prefect/end_of_run.py``).

Run in Prefect's ephemeral mode (a temporary API server of its own, in a fresh
Python with its own ``PREFECT_HOME``), on an embedded catalog of a finished grid
scan and an aborted one, with the site's options file naming a Dask cluster (a
LocalCluster of one worker): the finished scan is mapped into ``OUT/<uid>.zarr`` and recorded in the
catalog as a derived run; the aborted one is skipped with its reason in the flow's
log; a stop document whose ``run_start`` is a path fails the flow and writes nothing
(a second pass over a mapped run is ``tests/test_process_new.py``'s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import crystalmapping as cm

pytest.importorskip("prefect")

FLOW = Path(__file__).resolve().parents[1] / "workflows" / "prefect" / "end_of_run.py"

DRIVER = """
import json, sys
sys.path.insert(0, {flow_dir!r})
from end_of_run import end_of_run_workflow
out = {{}}
for name, doc in json.load(open({docs!r})).items():
    state = end_of_run_workflow(doc, {config!r}, return_state=True)
    out[name] = {{"state": state.type.value,
                  "result": state.result(raise_on_failure=False) if state.is_completed()
                  else str(state.result(raise_on_failure=False))}}
print("RESULT " + json.dumps(out, default=str))
"""


def test_end_of_run_flow_maps_records_and_skips(tmp_path):
    from crystalmapping.sim import simulate_scan

    catalog = cm.Catalog(tmp_path / "catalog")
    uids = {}
    for name, spec in {"good": dict(seed=1), "aborted": dict(seed=3, stop_after=9)}.items():
        scan = simulate_scan(shape=(4, 4), detector_shape=(64, 64), grains=2, **spec)
        uids[name] = catalog.ingest(scan.documents(external=True, directory=catalog.detector_dir))
    docs = {name: dict(catalog[uid].stop) for name, uid in uids.items()}
    docs["path"] = dict(docs["good"], run_start="../../outside")
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    out = tmp_path / "maps"
    config = tmp_path / "process-new.yaml"
    config.write_text(f"catalog: {catalog.directory}\nout_dir: {out}\n"
                      "workers: 1\n")  # the cluster its config names: a LocalCluster here
    # Prefect waits 20 s for its temporary server by default: too short beside the other
    # test worker on 2 cores (it failed once in a fresh-clone run)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_LOGGING_LEVEL="INFO",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    env.pop("PREFECT_API_URL", None)
    driver = DRIVER.format(flow_dir=str(FLOW.parent), docs=str(tmp_path / "docs.json"),
                           config=str(config))
    proc = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines()
                             if line.startswith("RESULT "))[7:])

    good = uids["good"]
    assert result["good"]["state"] == "COMPLETED", result
    assert any(line.startswith(f"mapped  {good}") and "recorded as derived run" in line
               for line in result["good"]["result"]), result["good"]
    maps = xr.open_zarr(out / f"{good}.zarr")
    assert maps.attrs["source_uid"] == good and maps["intensity"].sizes["grain"] >= 1
    derived = [catalog[u].start for u in catalog.uids()
               if catalog[u].start.get("analysis_stage") == "crystalmapping"]
    assert [d["parent_uid"] for d in derived] == [good]
    read = cm.catalog_maps(catalog, good)  # the maps, read back through the catalog
    assert read.attrs["source_uid"] == good
    np.testing.assert_array_equal(read["intensity"].values, maps["intensity"].values)

    # skipped with the reason, in the flow's log and result; nothing written
    assert result["aborted"]["state"] == "COMPLETED"
    skip = [line for line in result["aborted"]["result"] if line.startswith("skip")]
    assert skip and "'abort'" in skip[0], result["aborted"]
    assert "'abort'" in log  # logged by the flow's task
    assert not (out / f"{uids['aborted']}.zarr").exists()

    # a uid that is a path: the flow fails naming the rule, nothing is written
    assert result["path"]["state"] == "FAILED"
    assert "not a plain name" in result["path"]["result"]
    assert not (tmp_path / "outside.zarr").exists() and not (tmp_path.parent / "outside.zarr").exists()
