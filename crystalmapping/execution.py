"""Execution: the Dask client a composer runs on.

A caller gives a ``distributed.Client``, a scheduler address, or nothing (a
``LocalCluster`` of worker processes sized to the machine is started and shut
down around the work). No client is ever registered as the global default
behind the caller's back.

CPython 3.11 can deadlock a Dask worker: distributed's statistical profiler
calls ``sys._current_frames()``, and a garbage collection set off inside it
frees an object whose deallocation waits for the runtime's thread-list lock
that call already holds, with the GIL held, so every thread of the process
stops for good (python/cpython#106883, #116969; dask/distributed#8616). The
fix reached the 3.11 branch only in 2025, in a security release, not 3.11.9
as first reported, so every 3.11 counts as affected. On such an interpreter
every cluster this package starts runs with the profiler off
(``distributed.worker.profile.enabled: false``), and a client handed to it
whose workers run with the profiler on gets a
:class:`HangRiskWarning` that says how to turn it off. Python 3.12 and later
are not affected.

The profiler also costs time: it samples the running task's stack every 10
ms, and a full Dexela point took 183–204 ms in a worker with it against 165
ms without (and in a plain process). So the clusters this package starts run
without it on every Python unless asked (``local_cluster(profile=True)``, for
the dashboard's Profile page); a client or scheduler the caller gives keeps
its own setting.

Those clusters also poll less (:data:`QUIET_DASK_CONFIG`): every server of a
``LocalCluster`` (the scheduler, each nanny and each worker) measures its
event loop every 20 ms, samples its process with psutil every 500 ms and its
memory every 100 ms by default. On two cores that bookkeeping took about
2 s of CPU from a 110-point Dexela run on two workers, and the run took
6-10% longer with it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

__all__ = ["dask_client", "local_cluster", "check_client", "profiler_can_hang",
           "HangRiskWarning", "SAFE_DASK_CONFIG", "QUIET_DASK_CONFIG"]

logger = logging.getLogger(__name__)

#: Dask configuration that turns off distributed's statistical profiler (of
#: the workers and of every server's event loop): the only caller of
#: ``sys._current_frames()`` in a Dask process.
SAFE_DASK_CONFIG = {"distributed.worker.profile.enabled": False}

#: Dask configuration of the clusters this package starts: their servers poll
#: less often than distributed's defaults (20 ms, 500 ms, 100 ms). The event
#: loop's tick is what distributed's own test clusters use; a blocked loop is
#: still reported (``distributed.admin.tick.limit``, 3 s). Memory limits are
#: still checked whenever a worker stores a result, and every 500 ms besides.
QUIET_DASK_CONFIG = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
}


class HangRiskWarning(RuntimeWarning):
    """A Dask process runs distributed's profiler on a Python that can deadlock with it."""


def profiler_can_hang(version_info=None) -> bool:
    """Whether distributed's profiler can deadlock this CPython (any before 3.12).

    Turning the profiler off costs only the dashboard's profile page, so a
    3.11 bugfix release that may carry the fix is not trusted.

    Examples
    --------
    >>> profiler_can_hang((3, 11, 7)), profiler_can_hang((3, 11, 14)), profiler_can_hang((3, 12, 1))
    (True, True, False)
    """
    v = tuple(sys.version_info[:3] if version_info is None else version_info[:3])
    return v < (3, 12)


def _cluster_config(profile: bool = False):
    """The Dask configuration a cluster is started under: :data:`QUIET_DASK_CONFIG`,
    and the profiler off unless ``profile``, and always where it can hang."""
    import dask

    if profile and profiler_can_hang():
        logger.warning("Python %s: distributed's profiler stays off although asked for (it "
                       "can deadlock this interpreter; see crystalmapping.execution)",
                       sys.version.split()[0])
    if not profile or profiler_can_hang():
        return dask.config.set({**QUIET_DASK_CONFIG, **SAFE_DASK_CONFIG})
    return dask.config.set(QUIET_DASK_CONFIG)


@contextlib.contextmanager
def local_cluster(n_workers: int = 1, *, threads_per_worker: int = 1, processes: bool = True,
                  profile: bool = False, **cluster_kwargs) -> Iterator:
    """Start a ``LocalCluster`` on loopback and yield a client that is not the default.

    The cluster's scheduler and workers run without distributed's statistical
    profiler unless ``profile`` (see the module's notes: it costs 10-20% of a
    point's time), and always without it where it can deadlock
    (:func:`profiler_can_hang`); they poll as :data:`QUIET_DASK_CONFIG` says.
    Everything is shut down on exit.

    Parameters
    ----------
    n_workers, threads_per_worker, processes
        As ``distributed.LocalCluster`` takes them.
    profile : bool
        Run the profiler (the dashboard's Profile page).
    **cluster_kwargs
        Other ``LocalCluster`` keywords (the dashboard binds to a free
        loopback port unless ``dashboard_address`` is given).
    """
    from distributed import Client, LocalCluster

    cluster_kwargs.setdefault("dashboard_address", "127.0.0.1:0")
    # Servers and workers read the setting when they are made (a nanny hands its copy of
    # the configuration to the worker process it starts): it need not outlive this.
    with _cluster_config(profile):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                               processes=processes, **cluster_kwargs)
    with cluster, Client(cluster, set_as_default=False) as client:
        yield client


def _profiling(dask_worker) -> tuple[tuple[int, ...], bool]:
    """This worker's Python version, and whether its profiler (the caller of
    ``sys._current_frames()``) is scheduled. distributed itself never starts the
    event-loop profiler of its servers on 3.11, only the worker's."""
    return tuple(sys.version_info[:3]), "profile" in dask_worker.periodic_callbacks


def check_client(client) -> list[str]:
    """Warn when a client's workers run the profiler on a Python it can hang.

    Returns the worker addresses at risk (empty when none). The warning says
    how to turn the profiler off; nothing is changed on the cluster.
    """
    try:
        states = dict(client.run(_profiling))
    except Exception as exc:  # a cluster we cannot ask is not a reason to stop the work
        logger.debug("could not ask the cluster about its profiler: %r", exc)
        return []
    at_risk = sorted(addr for addr, (version, on) in states.items()
                     if on and profiler_can_hang(version))
    if at_risk:
        versions = sorted({".".join(map(str, states[a][0])) for a in at_risk})
        warnings.warn(
            f"{len(at_risk)} Dask worker(s) of this cluster ({', '.join(at_risk[:4])}"
            f"{', ...' if len(at_risk) > 4 else ''}) run Python {', '.join(versions)} with "
            "distributed's profiler on: that combination can deadlock a worker for good "
            "(python/cpython#116969). Start the workers on Python >= 3.12, or with the "
            "profiler off: DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False in their "
            "environment (or distributed.worker.profile.enabled: false in their Dask config).",
            HangRiskWarning, stacklevel=3)
    return at_risk


@contextlib.contextmanager
def dask_client(client=None, *, scheduler: str | None = None, n_workers: int | None = None,
                processes: bool = True) -> Iterator:
    """Yield a ``distributed.Client``; close it afterwards only if it was made here.

    Parameters
    ----------
    client : distributed.Client, optional
        Used as is, and left open.
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``).
    n_workers : int, optional
        Workers of the ``LocalCluster`` started when neither is given
        (default: one per core, one thread each).
    processes : bool
        Whether the ``LocalCluster``'s workers are processes (true) or threads.
    """
    from distributed import Client

    if client is not None and scheduler is not None:
        from .errors import ConfigError

        raise ConfigError("give either a client or a scheduler address (--scheduler), not both.")
    if client is not None:
        check_client(client)
        yield client
        return
    if scheduler is not None:
        with Client(scheduler, set_as_default=False) as c:
            logger.info("connected to dask scheduler %s", scheduler)
            check_client(c)
            yield c
        return
    from dask.system import CPU_COUNT

    n = n_workers or CPU_COUNT or 1
    with local_cluster(n, threads_per_worker=1, processes=processes,
                       silence_logs=logging.WARNING) as c:
        logger.info("started a LocalCluster of %d workers", n)
        yield c
