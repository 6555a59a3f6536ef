"""The catalog at scale: a tiled server whose catalog and tabular storage live in PostgreSQL.

The test starts a private PostgreSQL cluster on loopback (``initdb`` in a temporary
directory, ``pg_ctl`` on a free port, as the ``postgres`` user when the tests run as
root: PostgreSQL refuses to run as root), serves a tiled catalog on it with
``tiled serve config`` (``postgresql://`` URIs for the catalog and the tabular storage,
as a deployment writes them), writes a simulated run into it with bluesky's
``TiledWriter`` (frames in external HDF5), and maps it: the maps equal those of the same
documents in the embedded SQLite catalog.

Skipped only where PostgreSQL is not installed (``.ci/run`` installs it on CI).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import xarray as xr

import crystalmapping as cm
from conftest import TILED, free_port


def _version_key(path: str):
    return [int(n) for n in re.findall(r"\d+", path)]


def postgres_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: from PATH, else Debian's
    ``/usr/lib/postgresql/<version>/bin`` (the newest), which is not on PATH."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    return Path(candidates[-1]).parent if candidates else None


def _as_postgres() -> tuple[list[str], tuple[int, int] | None]:
    """The command prefix that runs a PostgreSQL program as a user it accepts, and the
    (uid, gid) its files must belong to (None: the current user's)."""
    if os.geteuid() != 0:
        return [], None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("the tests run as root and there is no 'postgres' user to run "
                    "PostgreSQL as (it refuses to run as root)")
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"], (user.pw_uid, user.pw_gid)
    return ["su", "postgres", "-s", "/bin/sh", "-c", '"$0" "$@"', "--"], (user.pw_uid, user.pw_gid)


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"no server on port {port} after {timeout} s:\n"
                                   f"{log.read_text()[-3000:]}") from None
            time.sleep(0.3)


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL cluster on 127.0.0.1 with the databases ``catalog`` and
    ``tabular``; yields ``(port, password)``. Stopped (``-m immediate``) and removed after."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH nor in "
                    "/usr/lib/postgresql/*/bin); .ci/run installs it from the OS packages")
    prefix, owner = _as_postgres()
    # not under pytest's tmp_path: its parents are private to the user the tests run as
    directory = Path(tempfile.mkdtemp(prefix="crystalmapping-pg-"))
    data, password = directory / "data", secrets.token_hex(12)
    (directory / "pwfile").write_text(password + "\n")
    if owner is not None:
        for path in (directory, directory / "pwfile"):
            os.chown(path, *owner)
    port = free_port()
    started = False

    def run(program, *args, timeout=120):
        done = subprocess.run([*prefix, str(bindir / program), *args], capture_output=True,
                              text=True, timeout=timeout, cwd=directory)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done

    try:
        # password authentication over TCP (as a server is reached), trust on the socket
        run("initdb", "-D", str(data), "-U", "postgres", f"--pwfile={directory / 'pwfile'}",
            "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync")
        run("pg_ctl", "-D", str(data), "-l", str(directory / "server.log"), "-w", "-t", "120",
            "-o", f"-c listen_addresses=127.0.0.1 -c port={port} "
                  f"-c unix_socket_directories={directory} -c fsync=off", "start")
        started = True
        for name in ("catalog", "tabular"):
            run("createdb", "-h", str(directory), "-p", str(port), "-U", "postgres", name)
        yield port, password
    finally:
        if started:
            with contextlib.suppress(Exception):
                run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_server(postgres, catalog, tmp_path_factory):
    """``tiled serve config`` on 127.0.0.1 over a catalog in PostgreSQL (catalog and
    tabular storage), reading detector files where the embedded catalog keeps them.

    Yields ``(url, api_key)``."""
    port, password = postgres
    db = f"postgresql://postgres:{password}@127.0.0.1:{port}"
    api_key = secrets.token_hex(16)
    directory = tmp_path_factory.mktemp("tiled-postgres")
    (directory / "data").mkdir()
    config = directory / "config.yml"
    config.write_text(f"""
authentication:
  single_user_api_key: {api_key}
  allow_anonymous_access: false
trees:
  - path: /
    tree: catalog
    args:
      uri: {db}/catalog
      specs: [{{name: CatalogOfBlueskyRuns, version: "3.0"}}]
      writable_storage: ["{directory}/data", "{db}/tabular"]
      readable_storage: ["{catalog.detector_dir}"]
      init_if_not_exists: true
""")
    http_port = free_port()
    log_path = directory / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(TILED), "serve", "config", "--host", "127.0.0.1", "--port",
                                 str(http_port), str(config)], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            _wait_for_port(http_port, proc, log_path)
            yield f"http://127.0.0.1:{http_port}", api_key
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _contents(path):
    """Everything in a store that the run determines (not its creation time)."""
    ds = cm.open_maps(path).load()
    ds.attrs.pop("created"), ds.attrs.pop("history")
    return ds


def _tabular_rows(port: int, password: str) -> tuple[list[str], int]:
    """The catalog's asset URIs, and the rows of the tables in the tabular database."""
    import adbc_driver_postgresql.dbapi as adbc

    db = f"postgresql://postgres:{password}@127.0.0.1:{port}"
    with adbc.connect(f"{db}/catalog") as conn, conn.cursor() as cur:
        cur.execute("SELECT data_uri FROM assets")
        uris = [row[0] for row in cur.fetchall()]
    with adbc.connect(f"{db}/tabular") as conn, conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = 'public'")
        tables = [row[0] for row in cur.fetchall()]
        rows = 0
        for table in tables:
            cur.execute(f'SELECT count(*) FROM "{table}"')
            rows += cur.fetchone()[0]
    return uris, rows


def test_a_catalog_in_postgresql_gives_the_maps_of_the_embedded_catalog(
        postgres, postgres_server, catalog, thread_client, tmp_path):
    from crystalmapping.sim import simulate_scan

    url, api_key = postgres_server
    scan = simulate_scan(shape=(6, 4), detector_shape=(96, 96), grains="reference", seed=4)
    # one run, its frames in one HDF5 file; the same documents go into both catalogs
    documents = list(scan.documents(external=True, directory=catalog.detector_dir))
    served = cm.Catalog(url, api_key=api_key)
    uid = served.ingest(copy.deepcopy(documents))
    assert catalog.ingest(copy.deepcopy(documents)) == uid

    # the run's table (the motor positions of its events) is in PostgreSQL
    uris, rows = _tabular_rows(*postgres)
    assert any(u.startswith("postgresql://") and u.endswith("/tabular") for u in uris), uris
    assert rows >= scan.n_points

    background = scan.truth.attrs["background_point"]
    run = cm.open_run(url, uid, api_key=api_key)
    assert run.start["uid"] == uid and run.grid.shape == (6, 4)
    cm.process_run(run, subtrahend=background, client=thread_client, progress=False,
                   out=tmp_path / "postgres.zarr")
    cm.process_run(catalog[uid], subtrahend=background, client=thread_client, progress=False,
                   out=tmp_path / "sqlite.zarr")
    maps = _contents(tmp_path / "postgres.zarr")
    assert maps.sizes["grain"] >= 2 and maps.attrs["n_points_measured"] == scan.n_points
    assert maps.attrs["source_uid"] == uid
    xr.testing.assert_identical(maps, _contents(tmp_path / "sqlite.zarr"))
