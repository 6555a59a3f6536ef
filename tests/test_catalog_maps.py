"""The maps of a run, back in the catalog beside it, read over HTTP.

``process --record`` maps a run of the tiled server (the session's, with an API key)
and records the derived run in that catalog; a fresh tiled client finds it by the
run's uid (``start.parent_uid``) and :func:`crystalmapping.catalog_maps` reads the
maps as the store holds them. A ``process-new`` pass over the same server records a
square scan the same way (square maps: tiled would give both axes one dim name).
"""

from __future__ import annotations

import contextlib
import datetime
import time

import numpy as np
import pytest
import xarray as xr

import crystalmapping as cm
from crystalmapping import commands
from crystalmapping.cli import main

PER_POINT = ("total_intensity", "max_intensity", "n_peaks", "measured")


@pytest.fixture
def session_cluster(monkeypatch, thread_client):
    monkeypatch.setattr(commands, "cluster", lambda args, values: contextlib.nullcontext(
        thread_client))


def _fresh_client(url, api_key):
    from tiled.client import from_uri

    return from_uri(url, api_key=api_key)


def assert_same_maps(read: xr.Dataset, store: xr.Dataset) -> None:
    """The catalog's maps equal the store's: values, dtypes, dims, coordinates."""
    assert read["intensity"].dims == ("grain", "row", "col")
    assert read["intensity"].dtype == store["intensity"].dtype
    np.testing.assert_array_equal(read["intensity"].values, store["intensity"].values)
    for name in ("y", "x", "n_points", "grain", "grain_id", "row", "col", "row_position",
                 "col_position", *PER_POINT):
        assert read[name].dims == store[name].dims, name
        np.testing.assert_array_equal(read[name].values, store[name].values, err_msg=name)
        assert read[name].attrs.get("units") == store[name].attrs["units"], name
    assert read["total_intensity"].dtype == np.float64 and read["measured"].dtype == bool


def test_process_record_is_readable_over_http(scans, tiled_server, tmp_path, capsys,
                                              session_cluster):
    url, api_key = tiled_server
    _, uid = scans["inline"]
    out = tmp_path / "maps.zarr"
    t0 = time.perf_counter()
    status = main(["process", "--catalog", url, "--api-key", api_key, "--uid", uid,
                   "--out", str(out), "--data-key", "dexela_image", "--record", "--no-progress"])
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert status == 0, printed
    assert f"parent_uid {uid}" in printed and api_key not in printed
    store = cm.open_maps(out)
    assert store.sizes["grain"] >= 1
    t1 = time.perf_counter()

    # a fresh client over HTTP: a search by the run's uid finds the derived run
    from tiled.queries import Key

    client = _fresh_client(url, api_key)
    found = client.search(Key("start.parent_uid") == uid)
    assert len(found) == 1
    derived_uid = list(found)[0]
    start = client[derived_uid].metadata["start"]
    assert start["analysis_stage"] == "crystalmapping" and start["source_uid"] == uid
    assert start["maps"] == str(out.absolute())
    assert {"primary", "maps", "scan"} <= set(client[derived_uid])

    t2 = time.perf_counter()
    read = cm.catalog_maps(client, uid)
    print(f"catalog_maps over HTTP: {time.perf_counter() - t2:.2f} s")
    assert_same_maps(read, store)
    assert read.attrs["derived_uid"] == derived_uid and read.attrs["source_uid"] == uid
    assert read.attrs["config"] == store.attrs["config"]
    # the same by address (the key from the environment's convention, here given), and by
    # the derived run's own uid
    by_address = cm.catalog_maps(url, uid, api_key=api_key)
    xr.testing.assert_identical(by_address, read)
    xr.testing.assert_identical(cm.catalog_maps(client, derived_uid), read)
    # the per-grain table of the first records is still the primary stream
    table = cm.Catalog(url, api_key=api_key)[derived_uid].to_dataset(None)
    for key in ("y", "x", "n_points", "grain_id"):
        np.testing.assert_array_equal(table[key].values, store[key].values)
    with pytest.raises(cm.CrystalMappingError, match="no crystalmapping derived run"):
        cm.catalog_maps(client, scans["aborted"][1])
    print(f"process --record {t1 - t0:.1f} s, reads over HTTP {time.perf_counter() - t1:.1f} s")


def test_process_new_records_are_readable_over_http(catalog, scans, tiled_server, tmp_path,
                                                    thread_client):
    from crystalmapping.newruns import process_new
    from crystalmapping.sim import simulate_scan

    url, api_key = tiled_server
    since = time.time()
    scan = simulate_scan(shape=(5, 5), detector_shape=(64, 64), grains=2, seed=21)
    uid = catalog.ingest(scan.documents(external=True, directory=catalog.detector_dir))
    lines = []
    served = cm.Catalog(url, api_key=api_key)
    report = process_new(served, tmp_path / "maps", cm.ProcessConfig(), client=thread_client,
                         since=datetime.datetime.fromtimestamp(since).timestamp(),
                         echo=lines.append)
    assert report.mapped == [uid], lines
    assert "recorded as derived run" in lines[0], lines
    store = cm.open_maps(tmp_path / "maps" / f"{uid}.zarr")
    read = cm.catalog_maps(_fresh_client(url, api_key), uid)
    assert read.sizes["row"] == read.sizes["col"] == 5  # square: both axes named
    assert_same_maps(read, store)


def test_a_stream_that_fails_after_its_start_is_closed_as_failed(catalog):
    """A document the writer refuses (an event of an unknown descriptor) stops the stream;
    the run it opened gets a stop saying so, with the events written before it."""
    import event_model

    bundle = event_model.compose_run(metadata={"purpose": "a stream that breaks"})
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "x": {"dtype": "number", "shape": [], "source": "sim"}})
    event = desc.compose_event(data={"x": 1.0}, timestamps={"x": time.time()}, seq_num=1)
    stray = dict(event, uid="a-stray-event", descriptor="no-such-descriptor")
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc), ("event", event),
            ("event", stray), ("stop", bundle.compose_stop())]
    with pytest.raises(KeyError, match="no-such-descriptor"):
        catalog.ingest(docs)
    stop = catalog.client[bundle.start_doc["uid"]].metadata["stop"]
    assert stop["exit_status"] == "fail"
    assert "could not all be written" in stop["reason"] and "no-such-descriptor" in stop["reason"]
    assert stop["num_events"] == {"primary": 1}
