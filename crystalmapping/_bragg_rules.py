"""The rules of the ``bragg`` locator: which measured candidates are peaks.

Pure numpy on the measured rows (one row of
:data:`~crystalmapping._bragg_measure.COLUMNS` per candidate, as
:func:`~crystalmapping._bragg_measure.measure` fills them): each candidate's
verdict (:data:`VERDICTS`, in the order the rules apply) and the table of the
kept ones. See :mod:`crystalmapping.locate` for the rules.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._bragg_measure import COLUMNS
from .config import LocateOptions

__all__ = ["VERDICTS", "TABLE_COLUMNS", "verdicts", "rules"]

#: Index of each of :data:`COLUMNS` in a row of measurements.
_COL = {name: i for i, name in enumerate(COLUMNS)}


def _apart(points: np.ndarray, distance: float) -> np.ndarray:
    """Greedily keep the points (in the given order) closer than ``distance`` to no kept one."""
    keep: list[int] = []
    for i, p in enumerate(points):
        if keep:
            d = points[keep] - p
            if (np.hypot(d[:, 0], d[:, 1]) < distance).any():
                continue
        keep.append(i)
    return np.asarray(keep, dtype=np.int64)


#: What decided each candidate of :func:`crystalmapping.bragg.candidates_bragg` (in the
#: order the rules apply).
VERDICTS = ("kept", "masked", "weak", "elongated", "close", "minmass", "maxsize", "topn")


def verdicts(rows: np.ndarray, options: LocateOptions, masked=None) -> np.ndarray:
    """The rule that decided each measured candidate, row by row, as its index in
    :data:`VERDICTS`; ``rows``: one row of :data:`COLUMNS` per candidate; ``masked``:
    which candidates touch the detector mask."""
    KEPT, MASKED, WEAK, ELONGATED, CLOSE, MINMASS, MAXSIZE, TOPN = range(len(VERDICTS))
    col = {name: rows[:, i] for name, i in _COL.items()}
    min_snr = options.min_snr
    verdict = np.zeros(len(rows), dtype=np.int8)
    if masked is not None:
        verdict[np.asarray(masked, dtype=bool)] = MASKED
    verdict[(col["snr"] < min_snr) & (verdict == KEPT)] = WEAK
    # An elongated candidate is a segment of a ridge (a powder ring, a streak)
    # unless it also stands min_snr above the ridge it sits on (a Bragg peak on a ring).
    if options.max_ecc is not None:
        elongated = (col["ecc"] > options.max_ecc) & (col["ridge_snr"] < min_snr)
        verdict[(verdict == KEPT) & elongated] = ELONGATED
    sep = options.separation if options.separation is not None else options.diameter + 1
    passed = np.flatnonzero(verdict == KEPT)
    if len(passed) > 1:
        by_signal = passed[np.argsort(-col["signal"][passed], kind="stable")]
        yx = rows[:, [_COL["y"], _COL["x"]]]
        kept = by_signal[_apart(yx[by_signal], sep)]
        verdict[np.setdiff1d(passed, kept)] = CLOSE
    for rule, bad in ((MINMASS, None if options.minmass is None
                       else col["mass"] < options.minmass),
                      (MAXSIZE, None if options.maxsize is None
                       else col["size"] > options.maxsize)):
        if bad is not None:
            verdict[(verdict == KEPT) & bad] = rule
    if options.topn is not None:
        kept = np.flatnonzero(verdict == KEPT)
        if len(kept) > options.topn:  # among the kept, brightest signal first (ties: first)
            kept = kept[np.argsort(-col["signal"][kept], kind="stable")]
            mass = pd.Series(col["mass"][kept])
            verdict[np.setdiff1d(kept, kept[mass.nlargest(options.topn).index])] = TOPN
    return verdict


#: The columns of :func:`crystalmapping.bragg.locate_bragg`'s table.
TABLE_COLUMNS = tuple(c for c in COLUMNS if c != "ridge_snr") + ("ep",)


def rules(rows: np.ndarray, options: LocateOptions, sigma: float,
           masked=None) -> tuple[pd.DataFrame, dict]:
    """Keep the measured candidates that pass the rules, sorted by ``(y, x)``; count the
    others."""
    verdict = verdicts(rows, options, masked)
    n = np.bincount(verdict, minlength=len(VERDICTS))
    counts = {"noise": sigma, **{f"n_rejected_{rule}": int(n[VERDICTS.index(rule)])
                                 for rule in ("weak", "elongated", "close", "masked")}}
    kept = rows[verdict == VERDICTS.index("kept")]
    kept = kept[np.lexsort((kept[:, _COL["x"]], kept[:, _COL["y"]]))]
    table = {name: kept[:, _COL[name]].copy() for name in TABLE_COLUMNS if name != "ep"}
    table["ep"] = np.full(len(kept), np.nan)
    if not options.characterize:
        for name in ("size", "ecc", "signal", "raw_mass"):
            table[name][:] = np.nan
    return pd.DataFrame(table, columns=list(TABLE_COLUMNS)), counts
