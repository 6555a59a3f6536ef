"""Link: give every peak of a scan the id of the Bragg reflection it belongs to.

This is the first half of the final reduce: it runs once on the peak table of
the whole scan (or of the points measured so far).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .config import LinkOptions

__all__ = ["link_peaks"]

logger = logging.getLogger(__name__)


def link_peaks(peaks: pd.DataFrame, *, search_range: float, memory: int = 0,
               linker: str = "trackpy", **link_keywords) -> pd.DataFrame:
    """Link the peaks of a scan into tracks (one per Bragg reflection).

    Parameters
    ----------
    peaks : DataFrame
        Peak table with at least ``y``, ``x`` and ``frame`` (the point's
        acquisition index), as :func:`crystalmapping.locate.locate_peaks` makes.
    search_range : float
        Largest detector distance (pixels) a peak may move between linked points.
    memory : int
        Number of points a peak may vanish and still keep its id (trackpy's
        ``memory``).
    linker : {"trackpy"}
        ``"trackpy"``: ``trackpy.link`` in acquisition order, as the tutorial.
    **link_keywords
        ``adaptive_stop``, ``adaptive_step``, ``neighbor_strategy``, ``link_strategy``
        (see :class:`~crystalmapping.config.LinkOptions`).

    Returns
    -------
    linked : DataFrame
        A copy of ``peaks`` sorted by ``frame``, with an int64 ``particle``
        column numbering the tracks from 0 in order of first appearance.
    """
    options = LinkOptions(search_range=search_range, memory=memory, linker=linker,
                          **link_keywords)
    missing = {"y", "x", "frame"} - set(peaks.columns)
    if missing:
        raise ValueError(
            f"the peak table needs the columns y, x and frame to be linked; missing {sorted(missing)}."
        )
    table = peaks.sort_values("frame", kind="stable").reset_index(drop=True)
    if table.empty:
        table = table.copy()
        table["particle"] = pd.Series(dtype="int64")
        return table
    import trackpy

    trackpy.quiet()
    kw = {"memory": options.memory}
    for name in ("neighbor_strategy", "link_strategy"):
        if getattr(options, name) is not None:
            kw[name] = getattr(options, name)
    if options.adaptive_stop is not None:
        kw.update(adaptive_stop=options.adaptive_stop, adaptive_step=options.adaptive_step)
    linked = trackpy.link(table, options.search_range, t_column="frame", **kw)
    linked = linked.reset_index(drop=True)
    # Renumber tracks 0..G-1 in order of first appearance, independent of trackpy internals.
    _, first = np.unique(linked["particle"].to_numpy(), return_index=True)
    order = linked["particle"].to_numpy()[np.sort(first)]
    renumber = {old: new for new, old in enumerate(order)}
    linked["particle"] = linked["particle"].map(renumber).astype("int64")
    logger.debug("linked %d peaks into %d tracks", len(linked), len(order))
    return linked
