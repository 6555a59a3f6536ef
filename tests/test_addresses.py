"""Catalog addresses: a tiled server URL with a path inside it, and tiled profiles.

A real ``tiled serve config`` on 127.0.0.1 serves a catalog under ``/xpd/raw`` (not at
its root, as a facility server does), with an API key. The run in it is opened by
``http://HOST/xpd/raw``, tiled's ``http://HOST/api/v1/metadata/xpd/raw`` and
``profile:NAME/xpd/raw`` (a profile file in a temporary profile directory), and mapped;
an unknown profile and a missing path part are errors that say what is there.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

import crystalmapping as cm
from conftest import TILED, free_port
from crystalmapping.errors import ConfigError

EXE = str(Path(sys.executable).with_name("crystalmapping"))


@pytest.fixture(scope="module")
def nested_server(tmp_path_factory):
    """A catalog served under /xpd/raw; yields ``(root_url, api_key, uid, scan)``."""
    from crystalmapping.sim import simulate_scan

    directory = tmp_path_factory.mktemp("nested")
    catalog = cm.Catalog(directory / "catalog")
    scan = simulate_scan(shape=(5, 4), detector_shape=(96, 96), grains=2, seed=3)
    uid = catalog.ingest(scan.documents(external=True, directory=catalog.detector_dir))
    root = catalog.directory
    api_key = secrets.token_hex(16)
    port = free_port()
    config = directory / "config.yml"
    config.write_text(f"""
authentication:
  single_user_api_key: {api_key}
  allow_anonymous_access: false
trees:
  - path: /xpd/raw
    tree: catalog
    args:
      uri: sqlite:///{root}/catalog.db
      specs: [{{name: CatalogOfBlueskyRuns, version: "3.0"}}]
      writable_storage: ["{root}/data", "sqlite:///{root}/tabular.db"]
      readable_storage: ["{root}/detector"]
      init_if_not_exists: false
""")
    log = open(directory / "server.log", "w")
    proc = subprocess.Popen([str(TILED), "serve", "config", "--host", "127.0.0.1", "--port",
                             str(port), str(config)], stdout=log, stderr=subprocess.STDOUT)
    import socket

    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError((directory / "server.log").read_text())
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}", api_key, uid, scan
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def profiles(tmp_path, monkeypatch, nested_server):
    """A profile directory holding ``beamline`` (the nested server) and ``other``."""
    import tiled.profiles

    url = nested_server[0]
    directory = tmp_path / "profiles"
    directory.mkdir()
    (directory / "beamline.yml").write_text(f"beamline:\n  uri: {url}\n")
    (directory / "other.yml").write_text("other:\n  uri: http://tiled.example.org:8000\n")
    monkeypatch.setattr(tiled.profiles, "paths", [directory])
    return directory


def test_a_path_inside_a_server_in_both_forms(nested_server, thread_client, tmp_path):
    url, api_key, uid, scan = nested_server
    short = cm.Catalog(f"{url}/xpd/raw", api_key=api_key)
    assert short.uids() == [uid]
    assert short.uri == f"{url}/xpd/raw" and api_key not in repr(short)
    long = cm.Catalog(f"{url}/api/v1/metadata/xpd/raw/", api_key=api_key)
    assert long.uri == short.uri and long.uids() == [uid]
    run = long[uid[:8]]
    assert run.uid == uid and run.grid.shape == (5, 4)
    assert long[-1].uid == uid  # the bluesky catalog's own look-ups work at the nested node
    maps = cm.process_run(run, subtrahend=scan.truth.attrs["background_point"],
                          client=thread_client, progress=False, out=tmp_path / "m.zarr")
    assert maps.sizes["grain"] >= 1 and maps.attrs["source_uid"] == uid


def test_a_missing_path_part_is_named(nested_server):
    url, api_key, _, _ = nested_server
    with pytest.raises(ConfigError) as err:
        cm.Catalog(f"{url}/xpd/processed", api_key=api_key).uids()
    message = str(err.value)
    assert "no 'processed' in 'xpd'" in message and "'raw'" in message, message
    with pytest.raises(ConfigError, match="no 'cms' in the root .*'xpd'"):
        cm.Catalog(f"{url}/cms/raw", api_key=api_key).uids()


def test_a_run_given_as_the_catalog_says_so(nested_server):
    url, api_key, uid, _ = nested_server
    with pytest.raises(ConfigError, match="is a run, not a catalog of runs"):
        cm.Catalog(f"{url}/xpd/raw/{uid}", api_key=api_key).uids()


def test_a_profile_with_a_path(nested_server, profiles):
    url, api_key, uid, _ = nested_server
    catalog = cm.Catalog("profile:beamline/xpd/raw", api_key=api_key)
    assert catalog.uri == "profile:beamline/xpd/raw"
    assert catalog.uids() == [uid] and catalog[uid].uid == uid
    with pytest.raises(ConfigError, match="no 'raw2' in 'xpd'"):
        cm.Catalog("profile:beamline/xpd/raw2", api_key=api_key).uids()


def test_an_unknown_profile_lists_the_ones_found(profiles):
    with pytest.raises(ConfigError) as err:
        cm.Catalog("profile:nope/xpd/raw")
    message = str(err.value)
    assert "no tiled profile 'nope'" in message
    assert "['beamline', 'other']" in message and str(profiles) in message, message


def test_the_command_line_reads_profiles_from_TILED_PROFILES(nested_server, profiles, tmp_path):
    """tiled's own profile directory setting, in a fresh process, as a user runs it."""
    _, api_key, uid, scan = nested_server
    env = {**os.environ, "TILED_PROFILES": str(profiles), "TILED_API_KEY": api_key}
    done = subprocess.run(
        [EXE, "process", "--catalog", "profile:beamline/xpd/raw", "--uid", uid[:8],
         "--background", str(scan.truth.attrs["background_point"]), "--out",
         str(tmp_path / "maps.zarr"), "--workers", "1", "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    import xarray as xr

    assert xr.open_zarr(tmp_path / "maps.zarr").attrs["source_uid"] == uid
    missing = subprocess.run([EXE, "process", "--catalog", "profile:missing", "--uid", "x",
                              "--out", str(tmp_path / "x.zarr")],
                             capture_output=True, text=True, timeout=120, env=env)
    assert missing.returncode == 2
    assert "no tiled profile 'missing'; the profiles found are ['beamline', 'other']" in \
        missing.stderr, missing.stderr
