"""Execution: the Dask client a composer runs on.

A caller gives a ``distributed.Client``, a scheduler address, or nothing (a
``LocalCluster`` of worker processes sized to the machine is started and shut
down around the work). No client is ever registered as the global default
behind the caller's back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

__all__ = ["dask_client"]

logger = logging.getLogger(__name__)


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
    from distributed import Client, LocalCluster

    if client is not None and scheduler is not None:
        from .errors import ConfigError

        raise ConfigError("give either a client or a scheduler address (--scheduler), not both.")
    if client is not None:
        yield client
        return
    if scheduler is not None:
        with Client(scheduler, set_as_default=False) as c:
            logger.info("connected to dask scheduler %s", scheduler)
            yield c
        return
    from dask.system import CPU_COUNT

    n = n_workers or CPU_COUNT or 1
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=processes,
                      dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING) as cluster, \
            Client(cluster, set_as_default=False) as c:
        logger.info("started a LocalCluster of %d workers", n)
        yield c
