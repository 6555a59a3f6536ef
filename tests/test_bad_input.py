"""Bad input: a clear error that names the rule, the value and the fix, and nothing written.

Each case goes in as a user would give it (the command line run in-process,
the Python API, a config file, or documents as they arrive from the proxy)
and checks the message and that no output was left behind. Cases tested
elsewhere in their own module (hostile uids and data roots: ``test_trust``;
a wrong API key: ``test_cli``; garbage on the wire: ``test_serve``) are not
repeated here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import crystalmapping as cm
from crystalmapping.cli import main
from crystalmapping.config import ProcessConfig
from crystalmapping.dispatch import RemoteDispatcher
from crystalmapping.errors import ConfigError, CrystalMappingError
from crystalmapping.sim import simulate_scan
from crystalmapping.wire import DecodeError, packb, unpackb

SMALL = dict(shape=(4, 3), detector_shape=(64, 64), grains=1)


def _ingest(catalog, seed, *, external=True, edit=None):
    """A small simulated run in ``catalog`` (its start document edited by ``edit``)."""
    scan = simulate_scan(seed=seed, **SMALL)
    docs = list(scan.documents(external=external, directory=catalog.detector_dir))
    if edit is not None:
        edit(docs[0][1])
    return catalog.ingest(docs), scan


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """An embedded catalog of runs that are each wrong in one way."""
    catalog = cm.Catalog(tmp_path_factory.mktemp("bad-input"))
    runs = {}
    runs["good"], scan = _ingest(catalog, 1)
    runs["not_grid"], _ = _ingest(catalog, 2, edit=lambda s: s.pop("shape"))
    runs["one_point"], _ = _ingest(catalog, 3, edit=lambda s: s.update(shape=[1, 1]))
    runs["small_grid"], _ = _ingest(catalog, 4, edit=lambda s: s.update(shape=[2, 3]))
    runs["missing"], _ = _ingest(catalog, 6)
    files = {uid: catalog.detector_dir / f"{uid}.h5" for uid in runs.values()}
    files[runs["missing"]].unlink()
    return catalog, runs, scan


@pytest.fixture
def out(tmp_path):
    """An output directory that must stay empty."""
    d = tmp_path / "out"
    d.mkdir()
    yield d
    assert sorted(p.name for p in d.iterdir()) == [], "partial output was left"


def _cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


#: A scheduler address nothing listens on: a command that reached it would fail naming it.
NO_SCHEDULER = "tcp://127.0.0.1:9"


def _process(bad, out, *extra, uid="good", scheduler=None):
    catalog, runs, _ = bad
    argv = ["process", "--catalog", str(catalog.directory), "--uid", runs.get(uid, uid),
            "--out", str(out / "maps.zarr"), "--no-progress", "--background", "0", *extra]
    if scheduler is not None:
        argv += ["--scheduler", scheduler]
    return argv


# --------------------------------------------------------------------------- command line

CLI_CASES = {
    "even diameter": (["--diameter", "14"], ["diameter must be an odd number", "14", "15"]),
    "negative diameter": (["--diameter", "-3"], ["diameter", "-3"]),
    "zero separation": (["--separation", "0"], ["separation", "0"]),
    "negative search range": (["--search-range", "-5"], ["search_range", "-5"]),
    "negative min_snr": (["--min-snr", "-1"], ["min_snr", "-1"]),
    "unknown data key": (["--data-key", "nope"], ["no data key 'nope'", "--data-key"]),
    "unknown uid": ([], ["no run", "deadbeef"]),
    "background index outside the scan": (["--background", "999"], ["999", "12"]),
    "points per chunk zero": (["--points-per-chunk", "0"], ["points_per_chunk", "0"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_command_line_options(case, bad, out, capsys, thread_client):
    extra, expected = CLI_CASES[case]
    uid = "deadbeef0000" if case == "unknown uid" else "good"
    argv = _process(bad, out, *extra, uid=uid, scheduler=thread_client.scheduler.address)
    code, err = _cli(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)


@pytest.mark.parametrize("shape,dtype,fill,expected", [
    ((32, 32), "f8", 0.0, ["detector's shape (64, 64)", "(32, 32)"]),
    ((64, 64), "c16", 0.0, ["real numbers", "complex128"]),
    ((64, 64), "f8", np.nan, ["4096 NaN or infinite pixels", "row 0, column 0"]),
    ((2, 3, 4, 5), "f8", 0.0, ["(M, N) image", "(2, 3, 4, 5)"]),
])
def test_background_images(shape, dtype, fill, expected, bad, out, tmp_path, capsys):
    path = tmp_path / "bg.npy"
    np.save(path, np.full(shape, fill, dtype=dtype))
    # refused before any cluster is reached: a scheduler that is not there is not named
    argv = _process(bad, out, scheduler=NO_SCHEDULER)
    argv[argv.index("--background") + 1] = str(path)
    code, err = _cli(argv, capsys)
    assert code == 2 and "Traceback" not in err and NO_SCHEDULER not in err
    for text in expected:
        assert text in err, (text, err)


def test_a_background_file_that_is_not_an_array(bad, out, tmp_path, capsys):
    for name, content in (("bg.npy", b"not numpy at all"), ("bg.txt", b"1 2 3")):
        path = tmp_path / name
        path.write_bytes(content)
        argv = _process(bad, out, scheduler=NO_SCHEDULER)
        argv[argv.index("--background") + 1] = str(path)
        code, err = _cli(argv, capsys)
        assert code == 2 and "Traceback" not in err and NO_SCHEDULER not in err
        assert str(path) in err and "numpy" in err


@pytest.mark.parametrize("run,expected", [
    ("not_grid", ["no 'shape' in its start document", "grid_scan"]),
    ("one_point", ["1 point", "at least 2"]),
    ("small_grid", ["12 points", "(2, 3)", "holds 6"]),
])
def test_runs_that_are_not_grid_scans(run, expected, bad, out, capsys, thread_client):
    code, err = _cli(_process(bad, out, uid=run, scheduler=thread_client.scheduler.address),
                     capsys)
    assert code == 2 and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)


@pytest.mark.parametrize("run", ["missing"])
def test_detector_files_that_cannot_be_read(run, bad, out, capsys, thread_client):
    catalog, runs, _ = bad
    code, err = _cli(_process(bad, out, uid=run, scheduler=thread_client.scheduler.address),
                     capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{runs[run]}.h5" in err and "no such file on this machine" in err, err
    assert "--root-map" in err


def test_a_truncated_detector_file(tmp_path, capsys, thread_client):
    """A file cut short reads as zeros in HDF5, with no error: it must not map as empty."""
    catalog = cm.Catalog(tmp_path / "catalog")
    uid, _ = _ingest(catalog, 8)
    path = catalog.detector_dir / f"{uid}.h5"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    out = tmp_path / "out"
    code, err = _cli(_process((catalog, {}, None), out, uid=uid,
                              scheduler=thread_client.scheduler.address), capsys)
    assert code == 2 and "Traceback" not in err
    assert str(path) in err and "not a whole HDF5 file" in err and "truncated" in err, err
    assert "Copy it again" in err
    assert not (out / "maps.zarr").exists()  # only the points before the cut, as partial maps
    assert (out / "maps.partial.zarr").exists()


def test_unreachable_catalog(out, capsys):
    code, err = _cli(["process", "--catalog", "http://127.0.0.1:9", "--uid", "abc",
                      "--out", str(out / "m.zarr")], capsys)
    assert code == 2 and "Traceback" not in err
    assert "127.0.0.1:9" in err


def test_out_inside_the_input_data(bad, out, capsys, thread_client):
    catalog, runs, _ = bad
    inside = catalog.detector_dir / "maps.zarr"
    argv = _process(bad, out, scheduler=thread_client.scheduler.address)
    argv[argv.index("--out") + 1] = str(inside)
    code, err = _cli(argv, capsys)
    assert code == 2 and "inside the run's input data" in err
    assert not inside.exists()


def test_an_unwritable_output_directory(bad, out, tmp_path, capsys, thread_client):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() == 0:
            pytest.skip("running as root: a read-only directory is still writable")
        argv = _process(bad, out, scheduler=thread_client.scheduler.address)
        argv[argv.index("--out") + 1] = str(locked / "maps.zarr")
        code, err = _cli(argv, capsys)
        assert code == 2 and "not writable" in err
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("text,expected", [
    ("diametre: 15\n", ["unknown option(s) ['diametre']"]),
    ("locate:\n  diameter: fifteen\n", ["diameter must be a number", "'fifteen'"]),
    ("- 1\n- 2\n", ["must hold a mapping"]),
    ("locate: [unclosed\n", ["not valid YAML"]),
    ("search-range: true\n", ["search_range must be a number", "True"]),
])
def test_config_files(text, expected, bad, out, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    code, err = _cli(_process(bad, out, "--config", str(config)), capsys)
    assert code == 2 and "Traceback" not in err
    for e in expected:
        assert e in err, (e, err)


def test_a_config_file_that_does_not_exist(bad, out, tmp_path, capsys):
    code, err = _cli(_process(bad, out, "--config", str(tmp_path / "none.yaml")), capsys)
    assert code == 2 and "does not exist" in err


# --------------------------------------------------------------------------- Python API


def test_frames_with_nan_or_negative_values(out, thread_client):
    """A point whose frames are not counts fails with its index; the others are mapped."""
    import xarray as xr

    scan = simulate_scan(seed=7, **SMALL)
    frames = np.stack([scan.frames(p) for p in range(scan.n_points)]).astype(np.float32)
    frames[5, 0, 3, 3] = np.nan
    frames[7, 1, 0, 0] = -4.0
    start = next(doc for name, doc in scan.documents(external=False) if name == "start")
    ds = xr.Dataset({"dexela_image": (("time", "frame", "y", "x"), frames)},
                    attrs=start).chunk({"time": 1})
    with pytest.raises(cm.pipeline.ProcessingError) as info:
        cm.process_run(ds, client=thread_client, subtrahend=0, progress=False)
    message = str(info.value)
    assert "2 of 12 tasks failed" in message and "point 5" in message
    assert "1 NaN or infinite and 0 negative" in message
    assert "finite and >= 0" in message
    assert info.value.maps["measured"].sum() == 10


def test_an_existing_store_is_kept_without_overwrite(bad, tmp_path, thread_client):
    catalog, runs, _ = bad
    store = tmp_path / "maps.zarr"
    store.mkdir()
    (store / "keep").write_text("mine")
    with pytest.raises(CrystalMappingError, match="already exists; pass overwrite=True"):
        cm.process_run(catalog[runs["good"]], client=thread_client, subtrahend=0,
                       out=store, progress=False)
    assert (store / "keep").read_text() == "mine"


def test_bad_keywords_in_python(bad):
    catalog, runs, _ = bad
    run = catalog[runs["good"]]
    with pytest.raises(TypeError, match="unknown locate keyword"):
        cm.process_run(run, locate=dict(diametre=15))
    with pytest.raises(ConfigError, match="min_snr must be >= 0, got -1"):
        cm.LocateOptions(min_snr=-1)
    with pytest.raises(ConfigError, match="linker must be 'grid' or 'trackpy'"):
        cm.LinkOptions(linker="nearest")


# --------------------------------------------------------------------------- documents


def test_malformed_msgpack_and_unknown_document_names():
    with pytest.raises(DecodeError, match="not a msgpack document"):
        unpackb(b"\xc1\xc1\xc1")
    with pytest.raises(DecodeError, match="must be a mapping"):
        unpackb(packb([1, 2]))
    dispatcher = RemoteDispatcher("127.0.0.1:9", prefix=b"raw")
    try:
        assert dispatcher._parse(b"raw nonsense " + packb({})) is None
        assert dispatcher._parse(b"raw start " + b"\xc1") is None
        assert dispatcher._parse(b"raw-only") is None
        assert dispatcher.skipped == 3
    finally:
        dispatcher.loop.close()


def _docs(seed=8, external=False, directory=None):
    scan = simulate_scan(seed=seed, **SMALL)
    return list(scan.documents(external=external, directory=directory))


@pytest.mark.parametrize("case,expected", [
    ("event before its descriptor", "names the descriptor"),
    ("stop without a start", "whose start this server never received"),
    ("datum for an unknown resource", "names the stream_resource 'unknown'"),
    ("document of an unknown name", "'nonsense' is not a bluesky document name"),
])
def test_documents_out_of_order(case, expected, tmp_path, caplog):
    """What the live server logs for documents that break the document model; nothing written."""
    from crystalmapping.serve import DocumentServer

    docs = _docs(external=True, directory=tmp_path / "h5")
    start = docs[0][1]
    desc = next(d for n, d in docs if n == "descriptor")
    event = next(d for n, d in docs if n == "event")
    datum = next(d for n, d in docs if n == "stream_datum")
    sequence = {
        "event before its descriptor": [("start", start), ("event", event)],
        "stop without a start": [("stop", {"uid": "s", "run_start": "never", "time": 0.0,
                                           "exit_status": "success"})],
        "datum for an unknown resource": [("start", start), ("descriptor", desc),
                                          ("stream_datum", dict(datum, stream_resource="unknown"))],
        "document of an unknown name": [("nonsense", {"uid": "x"})],
    }[case]
    maps = tmp_path / "maps"
    with ThreadPoolExecutor(1) as pool:
        server = DocumentServer(pool, ProcessConfig(background=0), maps,
                                data_roots=[tmp_path / "h5"])
        with caplog.at_level("ERROR"):
            for name, doc in sequence:
                server(name, doc)  # never raises
    assert expected in caplog.text, caplog.text
    assert not list(maps.glob("*.zarr"))


@pytest.mark.parametrize("content, words", [
    (None, "no background image at"),
    (b"not a numpy file", "cannot read the background image"),
])
def test_the_tutorial_server_says_which_background_is_missing(tmp_path, content, words):
    """workflows/server.py as shipped: a missing or unreadable background is one clear line,
    not a traceback, and the server never starts listening."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "background.npy"
    if content is not None:
        path.write_bytes(content)
    script = Path(__file__).resolve().parents[1] / "workflows" / "server.py"
    out = subprocess.run([sys.executable, str(script), "--background", str(path),
                          "--catalog", str(tmp_path / "db2")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and words in out.stderr and str(path) in out.stderr
    assert "Traceback" not in out.stderr and "--background PATH" in out.stderr or \
        "numpy.save" in out.stderr
    assert "Start the server" not in out.stdout
