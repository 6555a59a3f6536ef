"""Preprocess: average the frames of a grid point, subtract the background, clip at zero.

The kernel :func:`preprocess_frames` works on one point's frames as a numpy
array; :func:`preprocess` maps it over the chunks of a lazy dask/xarray image
stack without computing anything.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np

from .errors import ConfigError, ConfigTypeError, EmptyImageWarning

__all__ = ["preprocess_frames", "preprocess", "resolve_background", "compact_background",
           "check_point_index"]

IMAGE_DTYPE = np.float32


def preprocess_frames(frames: np.ndarray, subtrahend: np.ndarray | None = None, *,
                      warn_empty: bool = True, out: np.ndarray | None = None,
                      stats: np.ndarray | None = None) -> np.ndarray:
    """Mean of the frames minus the background, with negative pixels set to zero.

    Arithmetic is done in float64 and returned as float32, so unsigned detector
    counts never wrap around (``uint16`` 3 - 5 is 0 here, not 65534).

    Parameters
    ----------
    frames : (K, M, N) or (M, N) ndarray
        Frames of one grid point (any real dtype).
    subtrahend : (M, N) ndarray, optional
        Background image (dark current and air scattering), e.g. the mean frame
        of a point where the beam misses the sample.
    warn_empty : bool
        Warn with :class:`~crystalmapping.errors.EmptyImageWarning` when the
        result is all zeros although the frames are not.
    out : (M, N) ndarray of float32, optional
        Where to write the image (a reused workspace); a new array otherwise.
    stats : (2,) ndarray of float64, optional
        Filled with the image's greatest value (at least 0) and its float64
        sum, found in the same pass (the sum's order is not numpy's: the same
        to ~1e-15 relative; NaN when the image holds NaN).

    Returns
    -------
    image : (M, N) ndarray of float32
        ``out`` if given.
        Non-negative image; pixel ``[r, c]`` is row ``r``, column ``c`` with the
        origin at the centre of pixel (0, 0).

    Raises
    ------
    ValueError
        If the frames are not 2-D or 3-D, or the subtrahend's shape differs
        from a frame's.

    Notes
    -----
    Integer and float frames in native byte order are reduced in one pass by a
    compiled kernel (numba), pixel by pixel: the float64 sum of the frames in
    order, divided by their number, minus the background in float64, clipped
    at zero, rounded once to float32. That is the arithmetic of
    ``np.maximum(frames.mean(axis=0, dtype=np.float64) - subtrahend, 0).astype(np.float32)``,
    operation for operation, so the result is the same to the bit; other
    inputs (or no numba) take that numpy expression itself.

    Examples
    --------
    >>> frames = np.array([[[3, 10]], [[5, 12]]], dtype=np.uint16)
    >>> preprocess_frames(frames, np.array([[5, 5]], dtype=np.uint16))
    array([[0., 6.]], dtype=float32)
    """
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    if frames.ndim != 3:
        raise ConfigError(
            f"frames must be (K, M, N) or (M, N), got an array of shape {frames.shape}."
        )
    if subtrahend is not None:
        subtrahend = np.asarray(subtrahend)
        _check_subtrahend_shape(subtrahend.shape, frames.shape[1:])
    if out is not None and (out.shape != frames.shape[1:] or out.dtype != IMAGE_DTYPE
                            or not out.flags.c_contiguous):
        raise ConfigError(
            f"out must be a C-contiguous {np.dtype(IMAGE_DTYPE).name} array of the frames' "
            f"shape {frames.shape[1:]}, got {out.dtype} {out.shape}; pass out=None for a new "
            "array."
        )
    if stats is not None and (stats.shape != (2,) or stats.dtype != np.float64):
        raise ConfigError(f"stats must be a float64 array of 2 values, got {stats.dtype} "
                          f"{stats.shape}; pass stats=None to leave them out.")
    done = _preprocess_compiled(frames, subtrahend, out, stats)
    if done is None:
        image = _preprocess_numpy(frames, subtrahend)
        if out is not None:
            out[...] = image
            image = out
        out, any_out = image, bool(image.any())
        if stats is not None:
            stats[:] = image.max(initial=0), image.sum(dtype=np.float64)
    else:
        out, any_out = done
    if warn_empty and not any_out and frames.any():
        warnings.warn(
            "the background-subtracted image is all zeros: the background is at least as "
            "bright as the frames everywhere. Check that the background was taken with the "
            "same exposure and detector settings (expected at the background point itself).",
            EmptyImageWarning,
            stacklevel=2,
        )
    return out


def _preprocess_numpy(frames: np.ndarray, subtrahend: np.ndarray | None) -> np.ndarray:
    """The reference arithmetic, in numpy (several passes over float64 temporaries)."""
    image = frames.mean(axis=0, dtype=np.float64)
    if subtrahend is not None:
        image -= subtrahend
    np.maximum(image, 0.0, out=image)
    return image.astype(IMAGE_DTYPE)


#: dtype kinds and sizes the compiled kernel takes (native byte order only).
_KERNEL_DTYPES = frozenset(np.dtype(t) for t in (
    np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64,
    np.float32, np.float64))
_KERNEL = None  # the numba kernel once built; False if numba is not available
_KERNEL_LOCK = threading.Lock()
_COMPILED: set = set()


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        with _KERNEL_LOCK:
            if _KERNEL is None:
                try:
                    _KERNEL = _build_kernel()
                except ImportError:  # pragma: no cover - numba is optional
                    _KERNEL = False
    return _KERNEL


def _build_kernel():
    from numba import njit

    @njit(cache=True, nogil=True)
    def mean_minus_clip(frames, subtrahend, has_subtrahend, out, stats):  # pragma: no cover - compiled
        n_frames, n_rows, n_cols = frames.shape
        acc = np.empty(n_cols, dtype=np.float64)
        # per column, so that the loop has no chain from pixel to pixel: the image's max and sum
        col_max = np.zeros(n_cols, dtype=np.float64)
        col_sum = np.zeros(n_cols, dtype=np.float64)
        any_out = False
        for i in range(n_rows):
            # numpy's mean over axis 0: a float64 sum starting at 0.0, frame after frame
            for j in range(n_cols):
                acc[j] = 0.0
            for k in range(n_frames):
                for j in range(n_cols):
                    acc[j] += np.float64(frames[k, i, j])
            for j in range(n_cols):
                v = acc[j] / n_frames
                if has_subtrahend:
                    v = v - np.float64(subtrahend[i, j])
                if not v > 0.0 and v == v:  # np.maximum(v, 0.0): NaN stays NaN
                    v = 0.0
                r = np.float32(v)
                out[i, j] = r
                if r != 0.0:
                    any_out = True
                w = np.float64(r)
                col_max[j] = w if w > col_max[j] else col_max[j]
                col_sum[j] += w
        high = total = 0.0
        for j in range(n_cols):
            high = max(high, col_max[j])
            total += col_sum[j]
        stats[0], stats[1] = high, total
        return any_out

    return mean_minus_clip


def _preprocess_compiled(frames: np.ndarray, subtrahend: np.ndarray | None,
                         out: np.ndarray | None = None, stats: np.ndarray | None = None):
    """``(image, any nonzero)`` by the compiled kernel, or None for inputs it does not take;
    ``stats``, if given, filled as :func:`preprocess_frames` says."""
    if (frames.dtype not in _KERNEL_DTYPES or frames.shape[0] == 0
            or (subtrahend is not None and subtrahend.dtype not in _KERNEL_DTYPES)):
        return None
    kernel = _kernel()
    if not kernel:
        return None
    has_sub = subtrahend is not None
    sub = subtrahend if has_sub else np.zeros((1, 1), dtype=np.float64)
    if out is None:
        out = np.empty(frames.shape[1:], dtype=IMAGE_DTYPE)
    if stats is None:
        stats = np.empty(2)
    signature = (frames.dtype.str, frames.flags.c_contiguous, sub.dtype.str,
                 sub.flags.c_contiguous)
    if signature in _COMPILED:
        return out, bool(kernel(frames, sub, has_sub, out, stats))
    # numba compiles a new signature on its first call; two threads compiling at once can
    # fail inside numba, so a first call runs alone.
    with _KERNEL_LOCK:
        any_out = kernel(frames, sub, has_sub, out, stats)
        _COMPILED.add(signature)
    return out, bool(any_out)


def _check_subtrahend_shape(sub_shape, frame_shape) -> None:
    if tuple(sub_shape) != tuple(frame_shape):
        raise ConfigError(
            f"background image must have the detector's shape {tuple(frame_shape)}, got "
            f"{tuple(sub_shape)}. Take the background from the same detector (e.g. "
            "background=<index of an empty grid point>) or crop or transpose it to match."
        )


def _preprocess_block(block: np.ndarray, subtrahend: np.ndarray | None = None) -> np.ndarray:
    # block: (P, K, M, N) -> (P, M, N); warnings go to the reduce's counts instead.
    return np.stack([preprocess_frames(b, subtrahend, warn_empty=False) for b in block])


def preprocess(frames, subtrahend=None):
    """Lazily preprocess a stack of points, chunk by chunk.

    Parameters
    ----------
    frames : (P, K, M, N) dask array or xarray.DataArray
        Frames of every point; chunks may hold several points but must hold all
        frames and the whole detector (as :meth:`crystalmapping.source.Run.to_dataset`
        makes them).
    subtrahend : (M, N) ndarray, optional

    Returns
    -------
    images : (P, M, N) dask array or xarray.DataArray of float32
        Same type as ``frames``; the ``frame`` dimension is reduced. Nothing is
        computed.
    """
    import dask.array as da

    try:
        import xarray as xr
    except ImportError:  # pragma: no cover
        xr = None

    if xr is not None and isinstance(frames, xr.DataArray):
        data = preprocess(frames.data, subtrahend)
        dims = (frames.dims[0],) + frames.dims[2:]
        coords = {k: v for k, v in frames.coords.items() if set(v.dims) <= set(dims)}
        return xr.DataArray(data, dims=dims, coords=coords, name=frames.name,
                            attrs=dict(frames.attrs))

    arr = frames if isinstance(frames, da.Array) else da.asarray(frames)
    if arr.ndim != 4:
        raise ConfigError(
            f"frames must be a (point, frame, y, x) stack, got {arr.ndim} dimensions "
            f"{arr.shape}; wrap single images with [:, None]."
        )
    if any(len(c) != 1 for c in arr.chunks[1:]):
        arr = arr.rechunk({1: -1, 2: -1, 3: -1})
    args = [arr]
    if subtrahend is not None:
        sub = np.asarray(subtrahend)
        _check_subtrahend_shape(sub.shape, arr.shape[2:])
        args.append(da.from_array(sub, chunks=sub.shape, name=False))
    return da.map_blocks(
        _preprocess_block, *args, drop_axis=1,
        dtype=IMAGE_DTYPE, meta=np.empty((0, 0, 0), dtype=IMAGE_DTYPE),
        chunks=(arr.chunks[0], arr.chunks[2], arr.chunks[3]),
    )


def compact_background(image: np.ndarray) -> np.ndarray:
    """The background image as float32 when that holds each of its values exactly, else as is.

    A mean of integer detector counts is exact in float32, and
    :func:`preprocess_frames` converts it back to float64 before subtracting:
    the images are the same to the bit, from half the memory, half the bytes
    read per point and half the bytes sent to each worker.
    """
    image = np.asarray(image)
    if image.dtype == np.float64:
        small = image.astype(np.float32)
        if np.array_equal(small, image):
            return small
    return image


def point_background(point) -> np.ndarray:
    """The background image of a grid point: the mean of its frames (float64 arithmetic),
    kept as :func:`compact_background` keeps it.

    The mean of ``K`` unsigned integer frames, ``K`` a power of two, is exact
    in float32 while ``K`` times the dtype's largest value stays below 2**24
    (two ``uint16`` frames: 131070): it is then taken in one compiled pass
    (:func:`preprocess_frames` with no background), the same float32 image
    to the bit in a fraction of the time (a Dexela point: about 25 against
    140 ms).
    """
    point = np.asarray(point)
    frames = point.reshape((-1,) + point.shape[-2:])
    k = frames.shape[0]
    if (frames.dtype.kind == "u" and k and k & (k - 1) == 0
            and k * np.iinfo(frames.dtype).max < 2 ** 24):
        return preprocess_frames(frames, warn_empty=False)
    return compact_background(frames.mean(axis=0))


def check_point_index(index: int, n_points: int) -> None:
    """Raise a ConfigError unless ``index`` names one of ``n_points`` points (negative from the end)."""
    if not -n_points <= index < n_points:
        raise ConfigError(
            f"background point index must lie in [0, {n_points}) (or [-{n_points}, 0) from the "
            f"end) for this scan of {n_points} points, got {index}. Pick a point where the beam "
            "misses the sample."
        )


def resolve_background(background, frames=None) -> np.ndarray | None:
    """Turn a background specification into an ``(M, N)`` image.

    Parameters
    ----------
    background : ndarray, str, Path, int or None
        An image; a ``.npy`` file; the index of a grid point (acquisition
        order) whose mean frame is used; or None.
    frames : (P, K, M, N) dask array or DataArray, optional
        The scan's frames, needed when ``background`` is a point index.
    """
    if background is None:
        return None
    if isinstance(background, (bool, np.bool_)):
        raise ConfigTypeError(f"background must be an image, a .npy path or a point index, got {background!r}.")
    if isinstance(background, (int, np.integer)):
        if frames is None:
            raise ConfigError("a background given as a point index needs the scan's frames.")
        check_point_index(background, frames.shape[0])
        return point_background(frames[int(background)])
    if isinstance(background, (str, Path)):
        path = Path(background)
        if path.suffix != ".npy":
            raise ConfigError(
                f"background file must be a .npy array, got {str(path)!r}; save it with numpy.save."
            )
        if not path.is_file():
            raise ConfigError(f"background file {str(path)!r} does not exist.")
        try:
            image = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ConfigError(f"background file {str(path)!r} cannot be read as a numpy array "
                              f"({exc}); save the image with numpy.save.") from None
    else:
        image = np.asarray(background)
    if image.ndim == 3:
        image = image.mean(axis=0)
    if image.ndim != 2:
        raise ConfigError(f"background must be an (M, N) image, got shape {image.shape}.")
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ConfigTypeError(f"background must hold real numbers, got dtype {image.dtype}; "
                              "save the detector's mean dark frame as a real array.")
    finite = np.isfinite(image)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise ConfigError(
            f"background holds {int(np.count_nonzero(~finite))} NaN or infinite pixels (the "
            f"first at row {r}, column {c}); a background is subtracted from every frame. "
            "Replace them (e.g. with the image's median) and save it again."
        )
    return compact_background(image)
