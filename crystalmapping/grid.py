"""The scan grid: where each point of a run sits, snaking undone.

A bluesky ``grid_scan`` records its grid in the start document: ``shape``
(slow axis first), ``extents`` (``[start, stop]`` of each motor), ``snaking``
(one flag per axis; the fast axis reverses on every other row when true) and
``motors``. Points arrive in acquisition order; point ``i`` (trackpy's
``frame``) is the ``i``-th event of the primary stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ScanError

__all__ = ["Grid"]


@dataclass(frozen=True)
class Grid:
    """A 2-D scan grid.

    Parameters
    ----------
    shape : (int, int)
        Number of points along the slow and the fast axis.
    extents : ((float, float), (float, float))
        First and last motor position of the slow and the fast axis.
    snaking : (bool, bool)
        Whether each axis snakes; only the fast axis can (``snaking[0]`` is
        always false in bluesky's ``grid_scan``).
    motors : (str, str)
        Names of the slow and the fast motor.
    units : (str or None, str or None)
        Units of the slow and the fast motor's positions, when the start
        document gives them (``motor_units``: one per motor, or a mapping
        from motor name to units).

    Examples
    --------
    >>> g = Grid(shape=(2, 3), extents=((0, 1), (0, 2)), snaking=(False, True))
    >>> g.indices(np.arange(6))
    (array([0, 0, 0, 1, 1, 1]), array([0, 1, 2, 2, 1, 0]))
    """

    shape: tuple[int, int]
    extents: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 1.0), (0.0, 1.0))
    snaking: tuple[bool, bool] = (False, False)
    motors: tuple[str, str] = ("slow", "fast")
    units: tuple[str | None, str | None] = (None, None)

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ScanError(
                f"crystalmapping maps 2-D grid scans: shape must be two positive "
                f"numbers (slow, fast), got {self.shape!r}. Run a 2-D grid_scan, or "
                f"pass grid=Grid(shape=(rows, cols), ...) to say how the points lie."
            )
        extents = tuple(tuple(float(v) for v in e) for e in self.extents)
        if len(extents) != 2 or any(len(e) != 2 for e in extents):
            raise ScanError(
                f"extents must be ((slow_start, slow_stop), (fast_start, fast_stop)), "
                f"got {self.extents!r}."
            )
        snaking = tuple(bool(s) for s in self.snaking)
        if len(snaking) != 2:
            raise ScanError(f"snaking must hold one flag per axis, got {self.snaking!r}.")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "extents", extents)
        object.__setattr__(self, "snaking", snaking)
        object.__setattr__(self, "motors", tuple(str(m) for m in self.motors))
        units = tuple(None if u is None else str(u) for u in (self.units or (None, None)))
        if len(units) != 2:
            raise ScanError(f"units must hold one entry per axis, got {self.units!r}.")
        object.__setattr__(self, "units", units)

    @classmethod
    def from_start(cls, start: Mapping[str, Any]) -> "Grid":
        """Read the grid from a bluesky start document.

        Raises
        ------
        ScanError
            If the start document has no ``shape`` or describes no 2-D grid.
        """
        if "shape" not in start:
            raise ScanError(
                f"run {start.get('uid', '?')!r} has no 'shape' in its start document, "
                "so its points cannot be placed on a grid. Record it with bluesky's "
                "grid_scan, or pass grid=Grid(shape=(rows, cols), ...)."
            )
        shape = tuple(start["shape"])
        extents = start.get("extents") or [(0, n - 1) for n in shape]
        snaking = start.get("snaking") or [False] * len(shape)
        motors = start.get("motors") or [f"motor_{i}" for i in range(len(shape))]
        if len(shape) != 2:
            raise ScanError(
                f"crystalmapping maps 2-D grid scans: run {start.get('uid', '?')!r} has "
                f"shape {list(shape)}. Pass grid=Grid(shape=(rows, cols), ...) to say how "
                "its points lie on a 2-D grid."
            )
        units = start.get("motor_units") or [None, None]
        if isinstance(units, Mapping):
            units = [units.get(m) for m in motors]
        return cls(tuple(shape), tuple(map(tuple, extents)), tuple(snaking), tuple(motors),
                   tuple(units))

    @property
    def size(self) -> int:
        """Number of points of the complete grid."""
        return self.shape[0] * self.shape[1]

    def indices(self, frame: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid ``(row, col)`` of points given by acquisition index, snaking undone.

        Parameters
        ----------
        frame : (P,) array of int
            Acquisition index of each point (0 for the first event).

        Raises
        ------
        ScanError
            If an index is negative or beyond the grid.
        """
        frame = np.asarray(frame, dtype=np.int64)
        if frame.size and (frame.min() < 0 or frame.max() >= self.size):
            raise ScanError(
                f"point index must lie in [0, {self.size}) for a {self.shape} grid, got "
                f"values from {frame.min()} to {frame.max()}. A negative index is not a point; "
                "an index past the end means the run has more events than its start "
                "document's shape: pass the right grid."
            )
        n_fast = self.shape[1]
        row, col = np.divmod(frame, n_fast)
        if self.snaking[1]:
            col = np.where(row % 2 == 1, n_fast - 1 - col, col)
        return row, col

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Motor positions of the rows (slow axis) and of the columns (fast axis)."""
        (r0, r1), (c0, c1) = self.extents
        return (np.linspace(r0, r1, self.shape[0]), np.linspace(c0, c1, self.shape[1]))

    def to_dict(self) -> dict[str, Any]:
        """The grid as start-document fields (JSON-ready)."""
        return {
            "shape": list(self.shape),
            "extents": [list(e) for e in self.extents],
            "snaking": list(self.snaking),
            "motors": list(self.motors),
            **({"motor_units": list(self.units)} if any(self.units) else {}),
        }
