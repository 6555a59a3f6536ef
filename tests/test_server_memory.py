"""What the server keeps of a finished run: its summary, not its tables or its processor.

A finished run's per-point tables are pandas frames of a few rows, but with a
block, an index and reference bookkeeping per column: some 20 KB a point, so
0.8 MB for a 40-point scan. The server keeps its last processors (for their
status) and the records of its last 1000 runs; holding the tables there made
its memory grow by about 1 MB per run for its first 1000 runs (docs/soak.md).
Documents go straight into a :class:`DocumentServer` here (no proxy), points on
a thread pool.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from crystalmapping.config import ProcessConfig
from crystalmapping.serve import DocumentServer
from crystalmapping.sim import simulate_scan


def _documents(seed: int, stop: bool = True):
    scan = simulate_scan(shape=(3, 3), detector_shape=(64, 64), grains=1, seed=seed)
    return [(n, d) for n, d in scan.documents(external=False) if stop or n != "stop"]


def _finish(server, processor, timeout=60.0):
    processor.wait(timeout)
    deadline = time.monotonic() + timeout
    while processor.uid in {r.uid for r in server._reports.open()}:
        server._sample()  # what the monitor thread does every 0.2 s
        assert time.monotonic() < deadline, "the run was not moved to the finished ones"
        time.sleep(0.02)


def test_a_finished_run_leaves_its_summary_not_its_tables(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        server = DocumentServer(pool, ProcessConfig(background=0), tmp_path / "maps",
                                data_roots=None, partial_every_points=3, stop_timeout=1.0)
        for seed in (1, 2):
            for name, doc in _documents(seed):
                server(name, doc)
            processor = server._factory.processors[-1]
            _finish(server, processor)
            maps = processor.wait(0)
            assert int(maps["measured"].sum()) == 9 and maps.attrs["exit_status"] == "success"
            maps.close()
            # the store holds the tables: the processor lets go of them, its counts stay
            assert processor._points.results == {}
            status = processor.status()
            assert status["done"] == 9 and status["received"] == 9 and status["failed"] == 0
        # the finished records are the summaries only
        assert [r.summary["points"] for r in server._reports._finished] == [9, 9]
        assert not any(hasattr(r, "processor") for r in server._reports._finished)
        assert [s["points"] for s in server.runs()] == [9, 9]

        # a run ended by the stop timeout keeps its tables: documents may reopen it
        for name, doc in _documents(3, stop=False):
            server(name, doc)
        open_run = server._factory.processors[-1]
        open_run.wait(30)
        assert open_run.exit_status == "timeout" and len(open_run._points.results) == 9
        server.stop(10)
