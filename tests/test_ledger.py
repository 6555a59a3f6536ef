"""The point ledger of a live run, on its own: no 0MQ, no Dask."""

import numpy as np

from crystalmapping.ledger import PointLedger


def test_a_point_goes_from_received_to_done_or_failed():
    ledger = PointLedger()
    assert ledger.receive(3, at=1.0) and not ledger.receive(3, at=2.0)  # a duplicate
    assert ledger.received[3] == 1.0
    ledger.submitted(3, "f3")
    ledger.receive(4, at=1.5)
    ledger.submitted(4, "f4")
    assert ledger.queued == 2 and ledger.lag(now=4.0) == 3.0
    ledger.done(3, ("peaks", "points"), now=4.0)
    ledger.task_failed(4, "OSError: gone", now=5.0)
    assert ledger.queued == 0 and ledger.lag(now=9.0) == 0.0
    assert ledger.latency == {3: 3.0, 4: 3.5}
    assert ledger.failed == {4: "OSError: gone"} and list(ledger.results) == [3]


def test_points_wait_for_the_background_and_count_in_the_lag():
    ledger = PointLedger()
    for p in range(3):
        ledger.receive(p, at=float(p))
        ledger.wait(p, f"rows{p}")
    counts = ledger.counts(now=10.0)
    assert counts["waiting_for_background"] == 3 and counts["queued"] == 3
    assert counts["lag_seconds"] == 10.0 and counts["latency_median_s"] is None
    assert ledger.release() == [(0, "rows0"), (1, "rows1"), (2, "rows2")]
    assert ledger.waiting == [] and ledger.queued == 0


def test_snapshot_copies_and_counts_new_points_since_the_last_write():
    ledger = PointLedger()
    for p in range(10):
        ledger.receive(p, at=0.0)
        ledger.done(p, (p,), now=0.1 * (p + 1))
    ledger.fail(10, "outside the grid")
    assert ledger.new == 11
    results, failed = ledger.snapshot()
    assert ledger.new == 0 and len(results) == 10 and failed == {10: "outside the grid"}
    results.clear()
    assert len(ledger.results) == 10  # a copy
    counts = ledger.counts(now=5.0)
    lat = [0.1 * (p + 1) for p in range(10)]
    assert counts["done"] == 10 and counts["failed"] == 1
    assert np.isclose(counts["latency_median_s"], np.median(lat))
    assert np.isclose(counts["latency_p95_s"], np.percentile(lat, 95))


def test_released_results_keep_the_counts():
    ledger = PointLedger()
    for p in range(4):
        ledger.receive(p, at=0.0)
        ledger.done(p, ("peaks", "points"), now=1.0)
    ledger.fail(4, "outside the grid")
    ledger.release_results()  # the final maps hold them
    assert ledger.results == {} and ledger.n_done == 4
    counts = ledger.counts(now=2.0)
    assert counts["done"] == 4 and counts["failed"] == 1 and counts["latency_median_s"] == 1.0
