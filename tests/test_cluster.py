"""A real Dask cluster, started the way a user starts one from the shell.

``dask scheduler`` and two ``dask worker`` processes on loopback; the batch pipeline runs
on it from the command line (``crystalmapping process --scheduler tcp://...``) and from
Python (``process_run(..., client=Client(address))``), and gives the same maps as the
default ``LocalCluster`` run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr

import crystalmapping as cm
from crystalmapping.execution import profiler_can_hang
from conftest import free_port

BIN = Path(sys.executable).parent
DASK = str(BIN / "dask")
EXE = str(BIN / "crystalmapping")


def _contents(path):
    """Everything in a store that the run determines (not its creation time)."""
    ds = cm.open_maps(path).load()
    ds.attrs.pop("created"), ds.attrs.pop("history")
    return ds


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a process this test started (and the worker a nanny started), kill it
    when it does not stop in ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the nanny and its worker
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class ShellCluster:
    """``dask scheduler`` and ``n_workers`` ``dask worker`` processes (one thread each, with
    their nannies) on 127.0.0.1, started as from a shell; each in its own session, so that
    stopping it stops the worker its nanny started."""

    def __init__(self, directory: Path, n_workers: int = 2):
        self.directory, self.n_workers = directory, n_workers
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        self._logs = []

    def _start(self, name, argv, env):
        log = open(self.directory / f"{name}.log", "w")
        self._logs.append(log)
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           cwd=self.directory, start_new_session=True))

    def __enter__(self) -> "ShellCluster":
        self.directory.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if profiler_can_hang():  # see crystalmapping.execution: a worker can deadlock there
            env["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"
        port = self.address.rsplit(":", 1)[1]
        try:
            self._start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", port,
                                      "--no-dashboard"], env)
            for i in range(self.n_workers):
                self._start(f"worker-{i}", [
                    DASK, "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1",
                    "--no-dashboard", "--name", f"worker-{i}",
                    "--local-directory", str(self.directory / f"worker-{i}"),
                    "--death-timeout", "60"], env)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text()[-2000:]}"
                         for p in sorted(self.directory.glob("*.log")))

    def wait(self, timeout: float = 60.0) -> str:
        """The scheduler's address, once every worker is registered with it."""
        from distributed import Client

        deadline = time.monotonic() + timeout
        with Client(self.address, timeout=timeout, set_as_default=False) as client:
            while len(client.scheduler_info(n_workers=-1)["workers"]) < self.n_workers:
                exited = [p.args[1] for p in self.procs if p.poll() is not None]
                if exited or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the cluster did not start (exited: {exited}):\n{self.logs()}")
                time.sleep(0.2)
        return self.address

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):  # the workers first, then the scheduler
            _stop(proc)
        for log in self._logs:
            log.close()


@pytest.fixture(scope="module")
def small_run(catalog):
    """A 6 x 4 scan at 96 x 96 pixels, frames in external HDF5, in the embedded catalog."""
    from crystalmapping.sim import simulate_scan

    scan = simulate_scan(shape=(6, 4), detector_shape=(96, 96), grains="reference", seed=3)
    uid = catalog.ingest(scan.documents(external=True, directory=catalog.detector_dir))
    return catalog, scan, uid


def _points_tasks(stream) -> dict[str, dict[str, int]]:
    """Per run (the token in the task keys), how many point tasks each worker ran."""
    runs: dict[str, dict[str, int]] = {}
    for task in stream:
        key = task["key"]
        if key.startswith("crystalmapping-points-"):
            token = key.split("-")[2]
            by_worker = runs.setdefault(token, {})
            by_worker[task["worker"]] = by_worker.get(task["worker"], 0) + 1
    return runs


def test_a_shell_started_cluster_gives_the_maps_of_the_local_cluster(small_run, tmp_path):
    from distributed import Client, get_task_stream

    catalog, scan, uid = small_run
    background = scan.truth.attrs["background_point"]
    run = catalog[uid]
    with ShellCluster(tmp_path / "cluster") as cluster:
        # the reference while the cluster starts: neither client nor scheduler given, the
        # default LocalCluster
        reference = cm.process_run(run, subtrahend=background, out=tmp_path / "local.zarr",
                                   progress=False)
        assert reference.sizes["grain"] >= 2 and reference.attrs["n_points_measured"] == 24
        address = cluster.wait()

        with Client(address, set_as_default=False) as client:
            workers = set(client.scheduler_info(n_workers=-1)["workers"])
            with get_task_stream(client=client) as stream:
                # the command line, as a user runs it against the cluster
                cli = subprocess.run(
                    [EXE, "process", "--catalog", catalog.uri, "--uid", uid, "--background",
                     str(background), "--out", str(tmp_path / "cli.zarr"), "--scheduler",
                     address, "--no-progress", "-v"],
                    capture_output=True, text=True, timeout=120)
                assert cli.returncode == 0, cli.stderr[-3000:]
                # and Python, with a client of the same cluster
                cm.process_run(run, subtrahend=background, out=tmp_path / "client.zarr",
                               client=client, progress=False)
            # the client was handed in: it is left open and usable
            assert client.submit(sum, [1, 2], pure=False).result(timeout=30) == 3
    assert "maps: " in cli.stdout and f"connected to dask scheduler {address}" in cli.stderr
    # both runs ran all their points there, on both workers
    runs = _points_tasks(stream.data)
    assert len(runs) == 2, runs
    for by_worker in runs.values():
        assert sum(by_worker.values()) == 24 and set(by_worker) <= workers, runs
    assert {w for by_worker in runs.values() for w in by_worker} == workers, runs

    expected = _contents(tmp_path / "local.zarr")
    xr.testing.assert_identical(_contents(tmp_path / "cli.zarr"), expected)
    xr.testing.assert_identical(_contents(tmp_path / "client.zarr"), expected)
