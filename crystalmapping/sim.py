"""Simulated diffraction grid scans with ground truth.

A scan is a 2-D grid over a sample. Each grain is a connected region of the
grid with an intensity profile; shapes come from the measured maps of a
crystal rod (3 grains on a 133 x 33 grid, shipped in ``data/``) or are drawn
at random. Each grain throws ``peaks_per_grain`` Bragg peaks at fixed detector
positions whose height follows the grain's profile. Every frame holds dark
current, a smooth air-scatter halo around the beam centre, an optional powder
ring from a powder region, and Poisson noise.

The scan comes out as bluesky documents (``start`` with bluesky's grid
metadata, ``descriptor``, ``event`` per point, ``stop``), with frames either
inline or in an HDF5 file named by ``StreamResource``/``StreamDatum``
documents, as on the beamline.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import xarray as xr

from .errors import ConfigError
from .grid import Grid

__all__ = ["SimulatedScan", "simulate_scan", "reference_maps"]

#: Background level of the measured reference maps (mean intensity off the grains).
_REFERENCE_BACKGROUND = 7.0


@lru_cache(maxsize=1)
def reference_maps() -> xr.Dataset:
    """The measured crystal maps of a rod: ``intensity(grain, dim_0, dim_1)``, ``y``, ``x``.

    3 grains on a 133 x 33 grid, Dexela detector (BSD-3-Clause, from the
    original crystalmapping package; see ``data/LICENSE.reference_rod_maps``).
    """
    path = resources.files("crystalmapping") / "data" / "reference_rod_maps.nc"
    with resources.as_file(path) as p:
        return xr.open_dataset(p, engine="h5netcdf").load()


def _resample(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from scipy.ndimage import zoom

    factors = (shape[0] / image.shape[0], shape[1] / image.shape[1])
    out = zoom(image, factors, order=1, grid_mode=True, mode="nearest")
    return out[: shape[0], : shape[1]]


def _reference_profiles(shape, rng) -> np.ndarray:
    from scipy.ndimage import label

    ref = reference_maps()["intensity"].to_numpy()
    profiles = []
    for m in ref:
        p = np.clip(m - _REFERENCE_BACKGROUND, 0, None)
        p = _resample(p / p.max(), shape)
        p[p < 0.08] = 0.0  # the support: clearly above the measured noise
        # A grain is one connected region: resampling can leave islands; keep the main one.
        lab, n_lab = label(p > 0, structure=np.ones((3, 3)))
        if n_lab > 1:
            main = 1 + int(np.argmax(np.bincount(lab.ravel(), weights=p.ravel())[1:]))
            p[lab != main] = 0.0
        profiles.append(p)
    return np.array(profiles)


def _random_profiles(n, shape, rng) -> np.ndarray:
    from scipy.ndimage import gaussian_filter, label

    profiles = []
    for _ in range(n):
        for _attempt in range(50):
            field_ = gaussian_filter(rng.normal(size=shape), sigma=max(1.0, min(shape) / 6))
            mask = field_ > np.quantile(field_, 1 - rng.uniform(0.08, 0.25))
            lab, n_lab = label(mask)
            if n_lab == 0:
                continue
            sizes = np.bincount(lab.ravel())[1:]
            blob = lab == (np.argmax(sizes) + 1)
            if blob.sum() >= 4:
                break
        yy, xx = np.nonzero(blob)
        cy, cx = yy.mean(), xx.mean()
        r2 = ((np.arange(shape[0])[:, None] - cy) ** 2 / max(yy.var(), 1)
              + (np.arange(shape[1])[None, :] - cx) ** 2 / max(xx.var(), 1))
        p = np.where(blob, 0.4 + 0.6 * np.exp(-r2 / 4), 0.0)
        profiles.append(p / p.max())
    return np.array(profiles)


def _peak_positions(n, detector_shape, min_distance, rng, margin) -> np.ndarray:
    positions: list[np.ndarray] = []
    for _ in range(20000):
        if len(positions) == n:
            break
        p = np.array([rng.uniform(margin, detector_shape[0] - 1 - margin),
                      rng.uniform(margin, detector_shape[1] - 1 - margin)])
        if all(np.hypot(*(p - q)) >= min_distance for q in positions):
            positions.append(p)
    if len(positions) < n:
        raise ConfigError(
            f"cannot place {n} Bragg peaks at least {min_distance} px apart on a "
            f"{detector_shape} detector; use a larger detector or fewer grains/peaks."
        )
    return np.array(positions, dtype=float).reshape(-1, 2)


# The images every point of a scan shares, computed once per process (a full-size
# detector's is 95 MB and a third of a second); not kept on the scan, which tasks pickle.
def _radius(shape: tuple[int, int]) -> np.ndarray:
    """Each pixel's distance (pixels) from the detector's centre."""
    M, N = shape
    yy, xx = np.mgrid[:M, :N].astype(np.float64)
    return np.hypot(yy - M / 2.0, xx - N / 2.0)


@lru_cache(maxsize=2)
def _background(shape: tuple[int, int], dark: float, air: float) -> np.ndarray:
    """Dark current plus air scatter: the noise-free image of a point off the sample."""
    image = dark + air * np.exp(-(_radius(shape) / max(shape) / 0.35) ** 2)
    image.flags.writeable = False
    return image


@lru_cache(maxsize=2)
def _ring(shape: tuple[int, int]) -> np.ndarray:
    """The powder ring's profile (peak 1) at 0.3 of the detector's smaller side."""
    ring = np.exp(-((_radius(shape) - 0.3 * min(shape)) / 1.5) ** 2 / 2)
    ring.flags.writeable = False
    return ring


@dataclass
class SimulatedScan:
    """A simulated grid scan: its parameters, its ground truth, and its documents.

    Attributes
    ----------
    grid : Grid
    truth : xarray.Dataset
        ``amplitude(peak, row, col)`` (expected peak height above background
        in counts), ``y(peak)``, ``x(peak)`` (detector position), ``grain(peak)``
        (the grain it comes from), ``powder(row, col)`` and the attribute
        ``background_point`` (acquisition index of a point off the sample).
    """

    grid: Grid
    truth: xr.Dataset
    detector_shape: tuple[int, int]
    frames_per_point: int
    data_key: str
    dark: float
    air: float
    powder_height: float
    spot_sigma: float
    seed: int
    n_points: int
    exit_status: str
    metadata: dict = field(default_factory=dict)

    # -- images -----------------------------------------------------------------

    def expected_background(self) -> np.ndarray:
        """The noise-free image of a point off the sample (dark current + air scatter)."""
        return _background(tuple(self.detector_shape), float(self.dark), float(self.air)).copy()

    def expected_image(self, frame: int) -> np.ndarray:
        """The noise-free mean image of the point acquired ``frame``-th."""
        image = self.expected_background()
        row, col = self.grid.indices([frame])
        r, c = int(row[0]), int(col[0])
        amp = self.truth["amplitude"].to_numpy()[:, r, c]
        ys, xs = self.truth["y"].to_numpy(), self.truth["x"].to_numpy()
        s = self.spot_sigma
        half = int(np.ceil(5 * s))
        M, N = self.detector_shape
        for a, y, x in zip(amp, ys, xs):
            if a <= 0:
                continue
            y0, y1 = max(int(y) - half, 0), min(int(y) + half + 1, M)
            x0, x1 = max(int(x) - half, 0), min(int(x) + half + 1, N)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            image[y0:y1, x0:x1] += a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))
        powder = float(self.truth["powder"].to_numpy()[r, c])
        if powder > 0 and self.powder_height > 0:
            image += powder * self.powder_height * _ring((M, N))
        return image

    def frames(self, frame: int) -> np.ndarray:
        """The ``(K, M, N)`` uint16 frames of a point, with Poisson noise (seeded per point)."""
        rng = np.random.default_rng([self.seed, frame])
        lam = self.expected_image(frame)
        out = rng.poisson(lam, size=(self.frames_per_point,) + lam.shape)
        return np.clip(out, 0, np.iinfo(np.uint16).max).astype(np.uint16)

    def to_dataset(self) -> xr.Dataset:
        """The scan as a lazy dataset, laid out as :meth:`crystalmapping.source.Run.to_dataset`.

        The frames of each point are simulated when a task asks for them, so
        :func:`crystalmapping.process_run` maps a simulation with no catalog.
        """
        import dask
        import dask.array as da

        K, (M, N) = self.frames_per_point, self.detector_shape
        points = [da.from_delayed(dask.delayed(self.frames, pure=True)(i), shape=(K, M, N),
                                  dtype=np.uint16) for i in range(self.n_points)]
        frames = (da.stack(points) if points
                  else da.zeros((0, K, M, N), dtype=np.uint16, chunks=(1, K, M, N)))
        row, col = self.grid.indices(np.arange(self.n_points))
        attrs = dict(self.metadata, uid=f"sim-{self.metadata.get('sim_id', '')}", **self.grid.to_dict())
        return xr.Dataset(
            {self.data_key: (("point", "frame", "pixel_y", "pixel_x"), frames)},
            coords={"row": ("point", row), "col": ("point", col)}, attrs=attrs)

    # -- documents ----------------------------------------------------------------

    def documents(self, *, external: bool = True, directory: str | Path | None = None,
                  delay: float = 0.0) -> Iterator[tuple[str, dict]]:
        """Yield the bluesky documents of the scan.

        Parameters
        ----------
        external : bool
            True: frames are written to ``directory/<uid>.h5`` (dataset
            ``/entry/data``, one row per point) and named by ``stream_resource``
            and ``stream_datum`` documents, as area detectors do. False: frames
            travel inline in the events.
        directory : path, optional
            Where the HDF5 file goes (needed when ``external``); it must be
            readable by the catalog (its ``readable_storage``).
        delay : float
            Seconds to wait between points (to mimic a running scan).
        """
        from event_model import compose_run

        K, (M, N) = self.frames_per_point, self.detector_shape
        if external and directory is None:
            raise ConfigError("documents(external=True) needs a directory for the HDF5 file.")
        motors = self.grid.motors
        start_md = dict(self.metadata)
        start_md.update(self.grid.to_dict())
        start_md.update(
            plan_name="grid_scan", plan_type="generator", scan_id=1, num_points=self.grid.size, detectors=["dexela"],
            hints={"dimensions": [([m], "primary") for m in motors]},
            simulation={"seed": self.seed, "background_point": int(self.truth.attrs["background_point"])},
        )
        run = compose_run(metadata=start_md)
        yield "start", run.start_doc
        data_keys = {
            self.data_key: dict(source="sim", dtype="array", dtype_numpy="<u2", shape=[K, M, N]),
            "dexela_stats1_total": dict(source="sim", dtype="number", shape=[]),
        }
        for m in motors:
            data_keys[m] = dict(source="sim", dtype="number", shape=[])
        if external:
            data_keys[self.data_key]["external"] = "STREAM:"
        desc = run.compose_descriptor(name="primary", data_keys=data_keys,
                                      object_keys={"dexela": [self.data_key, "dexela_stats1_total"]})
        yield "descriptor", desc.descriptor_doc

        h5 = None
        if external:
            import h5py

            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            path = (directory / f"{run.start_doc['uid']}.h5").absolute()
            h5 = h5py.File(path, "w", libver="latest")
            dset = h5.create_dataset("/entry/data", shape=(0, K, M, N), maxshape=(None, K, M, N),
                                     dtype="<u2", chunks=(1, K, M, N))
            h5.swmr_mode = True
            sres = run.compose_stream_resource(
                mimetype="application/x-hdf5", uri=f"file://localhost{path}",
                data_key=self.data_key,
                parameters={"dataset": "/entry/data", "chunk_shape": [1, K, M, N]})
            yield "stream_resource", sres.stream_resource_doc
        rows_pos, cols_pos = self.grid.positions()
        try:
            for i in range(self.n_points):
                if delay:
                    time.sleep(delay)
                frames = self.frames(i)
                r, c = self.grid.indices([i])
                data = {motors[0]: float(rows_pos[r[0]]), motors[1]: float(cols_pos[c[0]]),
                        "dexela_stats1_total": float(frames.mean(axis=0).sum())}
                if external:
                    dset.resize(i + 1, axis=0)
                    dset[i] = frames
                    dset.flush()
                    yield "stream_datum", sres.compose_stream_datum(
                        indices={"start": i, "stop": i + 1},
                        seq_nums={"start": i + 1, "stop": i + 2}, descriptor=desc.descriptor_doc)
                else:
                    data[self.data_key] = frames
                now = time.time()
                yield "event", desc.compose_event(
                    data=data, timestamps={k: now for k in data}, filled={},
                    seq_num=i + 1)
        finally:
            if h5 is not None:
                h5.close()
        yield "stop", run.compose_stop(exit_status=self.exit_status,
                                        reason="" if self.exit_status == "success" else "aborted")


def simulate_scan(
    *,
    shape: tuple[int, int] = (40, 12),
    detector_shape: tuple[int, int] = (512, 512),
    frames_per_point: int = 2,
    grains: Literal["reference", "random"] | int = "reference",
    peaks_per_grain: int = 2,
    snaking: bool = True,
    extents: tuple[tuple[float, float], tuple[float, float]] | None = None,
    peak_height: float = 400.0,
    dark: float = 100.0,
    air: float = 60.0,
    powder: float = 0.0,
    spot_sigma: float = 2.0,
    min_peak_distance: float | None = None,
    edge_margin: float | None = None,
    data_key: str = "dexela_image",
    motors: tuple[str, str] = ("sample_y", "sample_x"),
    stop_after: int | None = None,
    seed: int = 0,
) -> SimulatedScan:
    """Make a simulated grid scan with known grains and Bragg peaks.

    Parameters
    ----------
    shape : (int, int)
        Grid points along the slow and the fast axis.
    detector_shape : (int, int)
        Detector rows and columns (the Dexela is 3888 x 3072).
    frames_per_point : int
        Frames recorded at each point.
    grains : "reference", "random" or int
        ``"reference"``: the 3 grains of the measured rod, resampled to
        ``shape``; an int ``n``: ``n`` random connected grains; ``"random"``: 3.
    peaks_per_grain : int
        Bragg peaks each grain throws on the detector.
    snaking : bool
        Whether the fast axis snakes (reverses on odd rows).
    peak_height : float
        Peak height in counts at the brightest point of a grain; each peak gets
        a factor between 0.6 and 1.
    dark, air : float
        Dark current (counts) and the air-scatter halo's height at the centre.
    powder : float
        Height (counts) of a powder ring over the lower fifth of the grid
        (0 for none).
    spot_sigma : float
        Gaussian width of a Bragg spot in pixels.
    min_peak_distance : float, optional
        Least distance between two Bragg peaks on the detector (default: a
        quarter of the smaller detector side, at most 150 px; the tutorial's
        ``separation=100`` merges peaks closer than that).
    edge_margin : float, optional
        Least distance of a Bragg peak from the detector edge (default: 60 px,
        at most a sixth of the smaller side). ``trackpy.locate`` ignores
        maxima closer to the edge than ``separation / 2``.
    stop_after : int, optional
        Stop the scan after this many points with ``exit_status="abort"``.
    seed : int
        Seed of everything random.

    Returns
    -------
    SimulatedScan

    Examples
    --------
    >>> scan = simulate_scan(shape=(6, 4), detector_shape=(64, 64), grains=2, seed=1)
    >>> scan.truth["amplitude"].shape
    (4, 6, 4)
    """
    rng = np.random.default_rng(seed)
    shape = (int(shape[0]), int(shape[1]))
    if min(shape) < 2:
        raise ConfigError(f"shape must be at least (2, 2), got {shape}.")
    if extents is None:
        extents = ((0.0, 0.25 * (shape[0] - 1)), (0.0, 0.25 * (shape[1] - 1)))
    grid = Grid(shape=shape, extents=extents, snaking=(False, bool(snaking)), motors=motors)
    if grains == "reference":
        profiles = _reference_profiles(shape, rng)
    else:
        n = 3 if grains == "random" else int(grains)
        if n < 0:
            raise ConfigError(f"grains must be 'reference', 'random' or a count >= 0, got {grains!r}.")
        profiles = _random_profiles(n, shape, rng) if n else np.zeros((0,) + shape)
    n_grains = len(profiles)
    n_peaks = n_grains * peaks_per_grain
    if min_peak_distance is None:
        min_peak_distance = min(150.0, min(detector_shape) / 4)
    if edge_margin is None:
        edge_margin = min(60.0, min(detector_shape) / 6)
    positions = _peak_positions(n_peaks, detector_shape, min_peak_distance, rng,
                                margin=max(edge_margin, 3 * spot_sigma))
    factors = rng.uniform(0.6, 1.0, size=n_peaks)
    grain_of_peak = np.repeat(np.arange(n_grains), peaks_per_grain)
    amplitude = peak_height * factors[:, None, None] * profiles[grain_of_peak]

    powder_map = np.zeros(shape)
    if powder > 0:
        powder_map[int(0.8 * shape[0]):, :] = 1.0
    occupied = profiles.sum(axis=0) + powder_map if n_grains else powder_map
    n_points = grid.size if stop_after is None else max(0, min(int(stop_after), grid.size))
    # A measured point off the sample, as the tutorial picks one for the background
    # (the last such point in acquisition order; the last point if the sample fills the grid).
    rows, cols = grid.indices(np.arange(max(n_points, 1)))
    empty = np.flatnonzero(occupied[rows, cols] == 0)
    background_point = int(empty[-1]) if empty.size else max(n_points, 1) - 1

    truth = xr.Dataset(
        {
            "amplitude": (("peak", "row", "col"), amplitude),
            "y": ("peak", positions[:, 0]),
            "x": ("peak", positions[:, 1]),
            "grain": ("peak", grain_of_peak),
            "powder": (("row", "col"), powder_map),
        },
        coords={"peak": np.arange(n_peaks), "row": np.arange(shape[0]), "col": np.arange(shape[1])},
        attrs={"background_point": background_point, "seed": seed},
    )
    return SimulatedScan(
        grid=grid, truth=truth, detector_shape=(int(detector_shape[0]), int(detector_shape[1])),
        frames_per_point=int(frames_per_point), data_key=data_key, dark=dark, air=air,
        powder_height=powder, spot_sigma=spot_sigma, seed=seed, n_points=n_points,
        exit_status="success" if n_points == grid.size else "abort",
        metadata={"sample": "simulated crystal rod", "sim_id": uuid.uuid4().hex[:8]},
    )
