"""``crystalmapping process-new``: every finished grid scan without maps, mapped once.

A catalog of three runs (one aborted); two passes of the command (the session's
cluster instead of a LocalCluster per pass): the first maps the two good runs into
``OUT/<uid>.zarr`` and records them as derived runs, the second maps nothing. Then an
interrupted pass is simulated (a half-written temporary store and a ``.partial.zarr``
left where a store should be): the next pass removes them and maps that run again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

import pytest
import xarray as xr

import crystalmapping as cm
from crystalmapping import commands
from crystalmapping.cli import main
from crystalmapping.newruns import LOCK_NAME, process_new


@pytest.fixture
def three_runs(tmp_path):
    """An embedded catalog with two finished grid scans and an aborted one."""
    from crystalmapping.sim import simulate_scan

    catalog = cm.Catalog(tmp_path / "catalog")
    uids = {}
    for name, spec in {"a": dict(seed=1), "b": dict(seed=2), "aborted": dict(seed=3, stop_after=9)
                       }.items():
        scan = simulate_scan(shape=(4, 4), detector_shape=(64, 64), grains=2, **spec)
        uids[name] = catalog.ingest(scan.documents(external=True,
                                                   directory=catalog.detector_dir))
    return catalog, uids


@pytest.fixture
def use_session_cluster(monkeypatch, thread_client):
    """The session's cluster instead of a LocalCluster per pass; yields the list of starts."""
    started = []

    def cluster(args, values):
        started.append(1)
        return contextlib.nullcontext(thread_client)

    monkeypatch.setattr(commands, "cluster", cluster)
    return started


def _pass(catalog, out, capsys, *extra):
    status = main(["process-new", "--catalog", catalog.uri, "--out-dir", str(out), *extra])
    return status, capsys.readouterr().out.splitlines()


def _derived(catalog):
    return [r.start for uid in catalog.uids()
            if (r := catalog[uid]).start.get("analysis_stage") == "crystalmapping"]


def test_two_passes_map_the_good_runs_once(three_runs, tmp_path, capsys, use_session_cluster):
    catalog, uids = three_runs
    out = tmp_path / "maps"
    status, lines = _pass(catalog, out, capsys)
    assert status == 0, lines
    mapped = [line.split()[1] for line in lines if line.startswith("mapped")]
    assert sorted(mapped) == sorted([uids["a"], uids["b"]]), lines
    # recorded whole: a 4 x 4 map is an array the catalog's SQL table cannot hold
    assert all("recorded as derived run" in line for line in lines if line.startswith("mapped"))
    skipped = [line for line in lines if line.startswith("skip")]
    assert len(skipped) == 1 and uids["aborted"] in skipped[0] and "'abort'" in skipped[0]
    assert lines[-1].startswith("process-new: 2 mapped, 0 failed, 1 skipped, 0 already mapped")
    for name in ("a", "b"):
        store = out / f"{uids[name]}.zarr"
        maps = xr.open_zarr(store)
        assert maps.attrs["source_uid"] == uids[name]
        assert maps["intensity"].sizes["grain"] >= 1 and int(maps.attrs["n_points_measured"]) == 16
    assert not (out / f"{uids['aborted']}.zarr").exists()
    derived = _derived(catalog)
    assert sorted(d["parent_uid"] for d in derived) == sorted([uids["a"], uids["b"]])
    assert all(d["maps"] == str(out / f"{d['parent_uid']}.zarr") for d in derived)
    created = {n: os.stat(out / f"{uids[n]}.zarr").st_mtime_ns for n in ("a", "b")}
    assert len(use_session_cluster) == 1

    status, lines = _pass(catalog, out, capsys)
    assert status == 0
    assert len(use_session_cluster) == 1  # nothing to map: no cluster started
    assert not [line for line in lines if line.startswith("mapped")], lines
    assert lines[-1].startswith("process-new: 0 mapped, 0 failed, 1 skipped, 2 already mapped")
    assert {n: os.stat(out / f"{uids[n]}.zarr").st_mtime_ns for n in ("a", "b")} == created
    assert len(_derived(catalog)) == 2  # nothing recorded twice

    # the derived runs say where the maps are: a pass into another directory maps nothing
    status, lines = _pass(catalog, tmp_path / "elsewhere", capsys)
    assert lines[-1].startswith("process-new: 0 mapped, 0 failed, 3 skipped"), lines
    assert len([line for line in lines if f"already mapped into {out}" in line]) == 2


def test_an_interrupted_pass_is_redone(three_runs, tmp_path, capsys, use_session_cluster):
    catalog, uids = three_runs
    out = tmp_path / "maps"
    assert _pass(catalog, out, capsys, "--no-record")[0] == 0
    store = out / f"{uids['a']}.zarr"
    # a pass killed while writing: the temporary store (half written), no store; and the
    # partial maps of a pass in which some points failed
    tmp = out / f".{store.name}.tmp-deadbeef"
    os.replace(store, tmp)
    for name in (".zmetadata", "intensity"):
        os.system(f"rm -rf '{tmp / name}'")
    partial = out / f"{uids['a']}.partial.zarr"
    partial.mkdir()
    old = time.time() - 3600
    for path in (tmp, partial):
        os.utime(path, (old, old))

    status, lines = _pass(catalog, out, capsys, "--no-record")
    assert status == 0, lines
    redone = [line for line in lines if line.startswith("mapped")]
    assert len(redone) == 1 and uids["a"] in redone[0] and "redone" in redone[0], lines
    assert not tmp.exists() and not partial.exists()
    assert xr.open_zarr(store).attrs["source_uid"] == uids["a"]

    # a temporary store that changed a moment ago is someone's write in progress: left alone
    os.replace(store, tmp)
    status, lines = _pass(catalog, out, capsys, "--no-record")
    assert [line for line in lines if "being written" in line and uids["a"] in line], lines
    assert tmp.exists() and not store.exists()


def test_a_pass_while_another_holds_the_directory_does_nothing(tmp_path, thread_client):
    catalog = cm.Catalog(tmp_path / "catalog")  # never opened: the pass stops at the lock
    out = tmp_path / "maps"
    out.mkdir()
    with open(out / LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        report = process_new(catalog, out, cm.ProcessConfig(), client=thread_client,
                             echo=lambda line: None)
    assert report.busy and not report.mapped
    assert "nothing done" in report.summary(catalog.uri, out)
    assert not list(out.glob("*.zarr"))


def test_uid_maps_that_run_alone(three_runs, tmp_path, capsys, use_session_cluster):
    """``--uid`` (what the end-of-run flow passes): that run only; a uid the catalog does
    not hold, or one that is a path, stops with a message and writes nothing."""
    catalog, uids = three_runs
    out = tmp_path / "maps"
    status, lines = _pass(catalog, out, capsys, "--uid", uids["b"], "--no-record")
    assert status == 0, lines
    assert [line.split()[1] for line in lines if line.startswith("mapped")] == [uids["b"]]
    assert lines[-1].startswith("process-new: 1 mapped, 0 failed, 0 skipped"), lines
    assert sorted(p.name for p in out.glob("*.zarr")) == [f"{uids['b']}.zarr"]
    for uid, words in (("0" * 8 + "-0000-4000-8000-" + "0" * 12, "no run"),
                       ("../elsewhere", "not a plain name")):
        assert main(["process-new", "--catalog", catalog.uri, "--out-dir", str(out),
                     "--uid", uid]) == 2
        assert words in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.zarr")) == [f"{uids['b']}.zarr"]
    assert not (tmp_path / "elsewhere.zarr").exists()
