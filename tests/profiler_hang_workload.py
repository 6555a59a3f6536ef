"""A Dask workload that deadlocks CPython 3.11 when distributed's profiler runs.

Run as a script: ``python profiler_hang_workload.py SECONDS [--profiler-on]``.
Worker threads build fresh Python frames and ``threading.local`` reference
cycles while the worker's profiler calls ``sys._current_frames()`` every
millisecond; a garbage collection started inside that call frees a
``threading.local``, whose deallocation takes the runtime lock the call
already holds (python/cpython#106883, #116969). On an affected interpreter a
cluster with the profiler on stops for good within seconds; a cluster that
:func:`crystalmapping.execution.local_cluster` starts finishes. Prints
``done N`` and exits 0 when the work completes.
"""

import gc
import sys
import threading
import time


def _fib(n):
    if n <= 2:
        cycle = threading.local()
        cycle.me = cycle
        return 1
    return _fib(n - 1) + _fib(n - 2)


def churn(seconds):
    gc.set_threshold(10, 5, 5)
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        _fib(12)
        n += 1
    return n


def main(seconds: float, profiler_on: bool, threads: int = 16) -> int:
    import contextlib

    import dask

    from crystalmapping.execution import local_cluster

    def plain_cluster(n, threads_per_worker, processes, dashboard_address):
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=n, threads_per_worker=threads_per_worker,
                          processes=processes, dashboard_address=dashboard_address) as cluster, \
                Client(cluster, set_as_default=False) as client:
            yield client

    start = contextlib.contextmanager(plain_cluster) if profiler_on else local_cluster
    with dask.config.set({"distributed.worker.profile.interval": "1ms"}), \
            start(1, threads_per_worker=threads, processes=False,
                  dashboard_address="127.0.0.1:0") as client:
        futures = [client.submit(churn, seconds, pure=False) for _ in range(threads)]
        total = sum(f.result() for f in futures)
    print("done", total, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]), "--profiler-on" in sys.argv))
