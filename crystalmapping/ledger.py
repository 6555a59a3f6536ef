"""The point ledger of a live run: where each grid point stands, its lag and latency.

A point is *received* when its frames are known (its event, or the
``stream_datum`` naming its rows), then either *waiting* for the background
point's mean frame or *outstanding* (its task submitted), and finally *done*
(its tables kept) or *failed* (with a reason). The ledger holds those sets
and the times, and answers what the processor and the server report: how
many points are queued, how far behind the oldest one is (the lag), how long
each took from arrival to result (the latency).

It is plain bookkeeping, with no thread, executor or socket, so it is tested
on its own; :class:`~crystalmapping.stream.StreamProcessor` holds its lock
around every call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PointLedger"]


class PointLedger:
    """The state of every point of one run.

    Examples
    --------
    >>> ledger = PointLedger()
    >>> ledger.receive(0, at=10.0), ledger.receive(0, at=11.0)
    (True, False)
    >>> ledger.submitted(0, "future")
    >>> ledger.lag(now=12.5)
    2.5
    >>> ledger.done(0, ("peaks", "points"), now=13.0)
    >>> ledger.counts(now=13.0)["done"], ledger.latency[0]
    (1, 3.0)
    """

    def __init__(self) -> None:
        self.received: dict[int, float] = {}  # point -> monotonic time its frames were known
        self.outstanding: dict[int, Any] = {}  # point -> its future
        self.waiting: list[tuple[int, Any]] = []  # (point, source) waiting for the background
        self.results: dict[int, tuple] = {}  # point -> (peaks, points) tables
        self.failed: dict[int, str] = {}  # point -> reason
        self.latency: dict[int, float] = {}  # point -> seconds from received to result
        self.new = 0  # points done or failed since the last snapshot
        self.released = 0  # points done whose tables were let go (written to the store)

    def receive(self, point: int, at: float) -> bool:
        """Note that ``point``'s frames are known; False if they already were."""
        if point in self.received:
            return False
        self.received[point] = at
        return True

    def wait(self, point: int, source) -> None:
        """Hold ``point`` until the background is ready."""
        self.waiting.append((point, source))

    def release(self) -> list[tuple[int, Any]]:
        """The points that waited for the background (they wait no more)."""
        waiting, self.waiting = self.waiting, []
        return waiting

    @property
    def n_done(self) -> int:
        """Points whose task returned its tables (kept, or let go by :meth:`release_results`)."""
        return len(self.results) + self.released

    def release_results(self) -> None:
        """Let go of the tables once the final maps hold them; the counts stay.

        A finished run's processor outlives its run (the server keeps the last
        ones for their status), and its tables are most of what it holds:
        pandas frames of a few rows, but with a block, an index and reference
        bookkeeping per column, they come to some 20 KB a point, 0.8 MB for a
        40-point scan.
        """
        self.released += len(self.results)
        self.results = {}

    def submitted(self, point: int, future) -> None:
        self.outstanding[point] = future

    def done(self, point: int, result: tuple, now: float) -> None:
        """``point``'s task returned its tables."""
        self.outstanding.pop(point, None)
        self.latency[point] = now - self.received[point]
        self.results[point] = result
        self.new += 1

    def task_failed(self, point: int, reason: str, now: float) -> None:
        """``point``'s task raised."""
        self.outstanding.pop(point, None)
        self.latency[point] = now - self.received[point]
        self.fail(point, reason)

    def fail(self, point: int, reason: str) -> None:
        """``point`` failed (its frames unreadable, outside the grid, no background...)."""
        self.failed[point] = reason
        self.new += 1

    @property
    def queued(self) -> int:
        """Points received and not finished (submitted, or waiting for the background)."""
        return len(self.outstanding) + len(self.waiting)

    def lag(self, now: float) -> float:
        """Age of the oldest queued point (0 when none is)."""
        pending = [self.received[p] for p in self.outstanding]
        pending += [self.received[p] for p, _ in self.waiting]
        return now - min(pending) if pending else 0.0

    def snapshot(self) -> tuple[dict[int, tuple], dict[int, str]]:
        """Copies of the results and failures, for a write; resets :attr:`new`."""
        self.new = 0
        return dict(self.results), dict(self.failed)

    def counts(self, now: float) -> dict[str, Any]:
        """``received``, ``done``, ``failed``, ``queued``, ``waiting_for_background``,
        ``lag_seconds``, ``latency_median_s`` and ``latency_p95_s`` (None before any)."""
        lat = np.fromiter(self.latency.values(), dtype=float)
        return {
            "received": len(self.received),
            "done": self.n_done,
            "failed": len(self.failed),
            "queued": self.queued,
            "waiting_for_background": len(self.waiting),
            "lag_seconds": self.lag(now),
            "latency_median_s": float(np.median(lat)) if lat.size else None,
            "latency_p95_s": float(np.percentile(lat, 95)) if lat.size else None,
        }
