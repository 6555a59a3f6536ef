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


def main(seconds: float, profiler_on: bool) -> int:
    import dask

    from crystalmapping.execution import local_cluster

    fast_profiler = {"distributed.worker.profile.interval": "1ms"}
    with dask.config.set(fast_profiler):
        if profiler_on:
            from distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                                   dashboard_address="127.0.0.1:0")
            client = Client(cluster, set_as_default=False)
        else:
            context = local_cluster(1, threads_per_worker=4, processes=False,
                                    dashboard_address="127.0.0.1:0")
            client = context.__enter__()
        futures = [client.submit(churn, seconds, pure=False) for _ in range(4)]
        total = sum(f.result() for f in futures)
    print("done", total, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]), "--profiler-on" in sys.argv))
