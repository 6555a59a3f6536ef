"""The command line, run as a user runs it: real processes, a real tiled server, a real cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import xarray as xr

import crystalmapping as cm
from crystalmapping.cli import main

EXE = str(Path(sys.executable).with_name("crystalmapping"))
TUTORIAL_ARGS = ["--diameter", "15", "--percentile", "80", "--separation", "100",
                 "--search-range", "50"]


def _run(args, env=None, **kwargs):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kwargs)


def _contents(path):
    """Everything in a store that the run determines (not its creation time)."""
    ds = cm.open_maps(path).load()
    ds.attrs.pop("created"), ds.attrs.pop("history")
    return ds


def test_server_with_two_worker_processes_equals_the_embedded_catalog(
        catalog, scans, tiled_server, tmp_path, thread_client):
    """The issue's acceptance run: `process` against a tiled server over HTTP with an API
    key, external HDF5 frames, a LocalCluster of 2 worker processes; the same run read
    through the embedded catalog (in this process, on the session's cluster) gives
    identical store contents."""
    url, api_key = tiled_server
    scan, uid = scans["rod"]
    bg = tmp_path / "background.npy"
    np.save(bg, scan.frames(scan.truth.attrs["background_point"]).mean(axis=0))
    common = ["--uid", uid, "--data-key", "dexela_image", "--background", str(bg),
              *TUTORIAL_ARGS, "--no-progress"]
    served = _run(["process", "--catalog", url, "--out", str(tmp_path / "served.zarr"),
                   "--plot", str(tmp_path / "maps.png"), "--workers", "2", *common],
                  env={"TILED_API_KEY": api_key})
    assert served.returncode == 0, served.stderr
    assert api_key not in served.stdout + served.stderr
    assert main(["process", "--catalog", catalog.uri, "--out", str(tmp_path / "embedded.zarr"),
                 "--scheduler", thread_client.scheduler.address, *common]) == 0

    a, b = _contents(tmp_path / "served.zarr"), _contents(tmp_path / "embedded.zarr")
    xr.testing.assert_identical(a, b)
    # the contract, read with plain xarray
    ds = xr.open_zarr(tmp_path / "served.zarr")
    assert ds["intensity"].dims == ("grain", "row", "col")
    assert ds["intensity"].shape[1:] == (24, 8)
    assert ds["y"].dims == ds["x"].dims == ("grain",)
    peaks = xr.open_zarr(tmp_path / "served.zarr", group="peaks")
    for column in ("y", "x", "mass", "size", "ecc", "signal", "raw_mass", "ep", "frame",
                   "particle", "grid_row", "grid_col"):
        assert column in peaks
    config = cm.open_maps(tmp_path / "served.zarr").attrs["config"]
    assert config["locate"]["diameter"] == 15 and config["link"]["search_range"] == 50
    assert config["background"] == str(bg)
    assert ds.attrs["source_uid"] == uid and ds.attrs["schema_version"] == 2
    assert api_key not in str(dict(ds.attrs))
    assert (tmp_path / "maps.png").stat().st_size > 10_000


def test_wrong_api_key_is_refused(scans, tiled_server, tmp_path):
    url, _ = tiled_server
    _, uid = scans["inline"]
    result = _run(["process", "--catalog", url, "--api-key", "wrong", "--uid", uid,
                   "--out", str(tmp_path / "m.zarr"), "--no-progress"])
    assert result.returncode != 0
    assert "refused the API key (401)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.zarr").exists()


def test_config_file_and_command_line(catalog, scans, tmp_path, capsys):
    scan, uid = scans["inline"]
    config = tmp_path / "run.yaml"
    config.write_text(f"""
catalog: {catalog.directory}
uid: {uid}
background: {scan.truth.attrs["background_point"]}
locate:
  diameter: 11
  percentile: 80
search-range: 30
separation: 40
workers: 1
""")
    out = tmp_path / "m.zarr"
    # the command line wins over the file
    code = main(["process", "--config", str(config), "--diameter", "15", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    assert "points/s" in capsys.readouterr().out
    # the LocalCluster it started was never registered as the global client
    from distributed.client import _get_global_client

    assert _get_global_client() is None
    ran = cm.open_maps(out).attrs["config"]
    assert ran["locate"]["diameter"] == 15 and ran["locate"]["separation"] == 40
    assert ran["link"]["search_range"] == 30
    assert ran["background"] == scan.truth.attrs["background_point"]


def test_bad_options_name_the_rule_and_the_fix(catalog, scans, tmp_path, capsys, thread_client):
    _, uid = scans["inline"]
    base = ["process", "--catalog", str(catalog.directory), "--uid", uid, "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a.zarr"), "--diameter", "14"]) == 2
    assert "diameter must be an odd number of pixels" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("diametre: 15\n")
    assert main(base + ["--out", str(tmp_path / "b.zarr"), "--config", str(bad)]) == 2
    assert "unknown option(s) ['diametre']" in capsys.readouterr().err
    assert main(["process", "--catalog", str(tmp_path / "nowhere"), "--uid", uid,
                 "--out", str(tmp_path / "c.zarr")]) == 2
    assert "no catalog at" in capsys.readouterr().err
    # an existing store is refused (on the session's cluster: starting a LocalCluster of
    # worker processes for each call would prove nothing more about the refusal)
    scheduler = ["--scheduler", thread_client.scheduler.address]
    assert main(base + ["--out", str(tmp_path / "d.zarr"), *scheduler]) == 0
    assert main(base + ["--out", str(tmp_path / "d.zarr"), *scheduler]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # ... before any cluster is reached or started: a scheduler that is not there is not
    # what the refusal names
    assert main(base + ["--out", str(tmp_path / "d.zarr"), "--scheduler",
                        "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "127.0.0.1:9" not in err
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_help_lists_every_locate_and_link_keyword():
    result = _run(["process", "--help"])
    assert result.returncode == 0
    for flag in ("--diameter", "--minmass", "--maxsize", "--separation", "--noise-size",
                 "--smoothing-size", "--threshold", "--invert", "--percentile", "--topn",
                 "--preprocess", "--max-iterations", "--characterize", "--engine",
                 "--search-range", "--memory", "--adaptive-stop", "--adaptive-step",
                 "--scheduler", "--api-key", "--config", "--plot"):
        assert flag in result.stdout, flag


def test_simulate_then_plot(tmp_path, catalog, scans, capsys, thread_client):
    assert main(["simulate", "--catalog", str(catalog.directory), "--shape", "6", "4",
                 "--detector", "96", "96", "--grains", "2", "--inline"]) == 0
    uid = capsys.readouterr().out.strip().splitlines()[-1]
    assert catalog[uid].start["shape"] == [6, 4]
    out = tmp_path / "m.zarr"
    assert main(["process", "--catalog", str(catalog.directory), "--uid", uid,
                 "--separation", "20", "--out", str(out),
                 "--scheduler", thread_client.scheduler.address, "--no-progress"]) == 0
    assert main(["plot", str(out), "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 5_000


def test_demo_runs_end_to_end(tmp_path, capsys, thread_client):
    """`crystalmapping demo` (what `make demo` runs), on a small scan: maps, a plot, a score."""
    out = tmp_path / "demo-output"
    code = main(["demo", "--catalog", str(tmp_path / "catalog"), "--out-dir", str(out),
                 "--points", "12", "--detector", "128", "128", "--no-progress",
                 "--scheduler", thread_client.scheduler.address])
    printed = capsys.readouterr().out
    assert code == 0
    assert "against the truth: worst best-map IoU" in printed
    assert (out / "maps.png").stat().st_size > 0
    maps = cm.open_maps(out / "maps.zarr")
    assert int(maps["measured"].sum()) == maps.attrs["n_points_measured"] >= 12
