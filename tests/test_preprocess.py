"""Unit tests of crystalmapping.preprocess: the kernel, the lazy wrapper, the background."""

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from crystalmapping.errors import ConfigError, ConfigTypeError, EmptyImageWarning
from crystalmapping.preprocess import (compact_background, point_background, preprocess,
                                       preprocess_frames, resolve_background)


def _raise_if_computes(*args, **kwargs):
    raise RuntimeError("a dask graph was computed while building a lazy preprocess")


def test_known_answer_uint16():
    frames = np.array([[[1, 4, 10], [0, 8, 2]],
                       [[3, 6, 20], [2, 8, 2]]], dtype=np.uint16)
    background = np.array([[1, 1, 10], [5, 2, 2]], dtype=np.uint16)
    image = preprocess_frames(frames, background)
    # mean: [[2, 5, 15], [1, 8, 2]]; minus background, clipped at zero.
    np.testing.assert_array_equal(image, [[1, 4, 5], [0, 6, 0]])
    assert image.dtype == np.float32
    assert image.shape == (2, 3)


def test_unsigned_subtraction_does_not_wrap():
    frames = np.array([[[3, 10]], [[3, 12]]], dtype=np.uint16)
    image = preprocess_frames(frames, np.array([[5, 5]], dtype=np.uint16))
    np.testing.assert_array_equal(image, [[0.0, 6.0]])
    assert image.max() < 100  # 3 - 5 wrapped would be 65534


def test_uint16_wrap_case_all_zero_warns():
    frames = np.full((2, 2, 2), 3, dtype=np.uint16)
    with pytest.warns(EmptyImageWarning, match="all zeros"):
        image = preprocess_frames(frames, np.full((2, 2), 5, dtype=np.uint16))
    np.testing.assert_array_equal(image, np.zeros((2, 2)))


def test_no_subtrahend_is_mean():
    frames = np.array([[[1, 2]], [[2, 2]]], dtype=np.uint16)
    np.testing.assert_array_equal(preprocess_frames(frames), [[1.5, 2.0]])


def test_mean_is_computed_in_float64():
    # 2**24 + 1 is not a float32; the mean of two such frames must not lose the 1.
    frames = np.full((2, 1, 1), 2**24 + 1, dtype=np.int64)
    image = preprocess_frames(frames, np.full((1, 1), 2**24, dtype=np.int64))
    assert image[0, 0] == 1.0


def test_single_image_accepted():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 50, size=(4, 5)).astype(np.uint16)
    background = rng.integers(0, 50, size=(4, 5)).astype(np.uint16)
    expected = np.clip(image.astype(np.float64) - background, 0, None)
    np.testing.assert_array_equal(preprocess_frames(image, background), expected)
    np.testing.assert_array_equal(preprocess_frames(image, background),
                                  preprocess_frames(image[np.newaxis], background))


def test_subtrahend_shape_mismatch_names_both_shapes():
    frames = np.ones((2, 4, 5), dtype=np.uint16)
    with pytest.raises(ValueError) as info:
        preprocess_frames(frames, np.zeros((5, 4)))
    assert "(4, 5)" in str(info.value) and "(5, 4)" in str(info.value)


def test_frames_of_wrong_dimension_raise():
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4\)"):
        preprocess_frames(np.ones((1, 2, 3, 4)))


def test_empty_image_warns_only_when_frames_are_not_zero():
    frames = np.array([[[2, 3]], [[4, 3]]], dtype=np.uint16)
    bright = np.array([[10, 10]], dtype=np.uint16)
    with pytest.warns(EmptyImageWarning):
        preprocess_frames(frames, bright)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess_frames(frames, bright, warn_empty=False)
        preprocess_frames(np.zeros((2, 1, 2), dtype=np.uint16), bright)  # frames are zero
        preprocess_frames(frames, np.zeros((1, 2)))  # non-empty result


def _stack(seed=0, shape=(7, 2, 5, 6)):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 20, size=shape).astype(np.uint16)
    background = rng.integers(0, 10, size=shape[2:]).astype(np.uint16)
    expected = np.stack([preprocess_frames(p, background, warn_empty=False) for p in frames])
    return frames, background, expected


@pytest.mark.parametrize("chunks", [(3, 2, 5, 6), (3, 1, 2, 4)])
def test_dask_uneven_chunks_equals_kernel_and_is_lazy(chunks):
    frames, background, expected = _stack()
    stack = da.from_array(frames, chunks=chunks)
    with dask.config.set(scheduler=_raise_if_computes):
        images = preprocess(stack, background)
    assert isinstance(images, da.Array)
    assert images.chunks == ((3, 3, 1), (5,), (6,))
    assert images.dtype == np.float32
    result = images.compute(scheduler="sync")
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)


def test_dask_without_subtrahend():
    frames, _, _ = _stack(seed=1)
    with dask.config.set(scheduler=_raise_if_computes):
        images = preprocess(da.from_array(frames, chunks=(3, 2, 5, 6)))
    np.testing.assert_allclose(images.compute(scheduler="sync"), frames.mean(axis=1))


def test_dask_wrapper_checks_subtrahend_shape_eagerly():
    frames, _, _ = _stack()
    with dask.config.set(scheduler=_raise_if_computes):
        with pytest.raises(ValueError, match=r"\(5, 6\).*\(6, 5\)"):
            preprocess(da.from_array(frames, chunks=(3, 2, 5, 6)), np.zeros((6, 5)))
        with pytest.raises(ValueError, match=r"\(point, frame, y, x\) stack, got 3 dimensions"):
            preprocess(da.zeros((3, 5, 6), chunks=(1, 5, 6)))


def test_xarray_dataarray_keeps_dims_coords_and_attrs():
    frames, background, expected = _stack(seed=2)
    array = xr.DataArray(
        da.from_array(frames, chunks=(3, 2, 5, 6)),
        dims=("point", "frame", "pixel_y", "pixel_x"),
        coords={"point": np.arange(7) * 10, "frame": np.arange(2), "sample_x": ("point", np.linspace(0, 1, 7))},
        name="dexela_image", attrs={"units": "counts"},
    )
    with dask.config.set(scheduler=_raise_if_computes):
        images = preprocess(array, background)
    assert isinstance(images, xr.DataArray)
    assert images.dims == ("point", "pixel_y", "pixel_x")
    assert isinstance(images.data, da.Array)
    assert images.data.chunks[0] == (3, 3, 1)
    assert images.name == "dexela_image" and images.attrs == {"units": "counts"}
    assert "frame" not in images.coords
    np.testing.assert_array_equal(images["point"], np.arange(7) * 10)
    np.testing.assert_array_equal(images["sample_x"], np.linspace(0, 1, 7))
    with dask.config.set(scheduler="sync"):
        np.testing.assert_array_equal(images.values, expected)


# -- resolve_background -------------------------------------------------------------


def test_resolve_background_none():
    assert resolve_background(None) is None


def test_resolve_background_array_and_stack():
    image = np.arange(6, dtype=np.uint16).reshape(2, 3)
    np.testing.assert_array_equal(resolve_background(image), image)
    stack = np.stack([image, image + 2])
    np.testing.assert_array_equal(resolve_background(stack), image + 1.0)


def test_resolve_background_npy_path(tmp_path):
    image = np.random.default_rng(3).random((4, 5))
    path = tmp_path / "background.npy"
    np.save(path, image)
    np.testing.assert_array_equal(resolve_background(path), image)
    np.testing.assert_array_equal(resolve_background(str(path)), image)


def test_resolve_background_wrong_suffix(tmp_path):
    path = tmp_path / "background.txt"
    path.write_text("1 2 3")
    with pytest.raises(ConfigError) as info:
        resolve_background(path)
    assert "background.txt" in str(info.value) and ".npy" in str(info.value)
    assert "numpy.save" in str(info.value)


def test_resolve_background_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as info:
        resolve_background(tmp_path / "missing.npy")
    assert "missing.npy" in str(info.value)


def test_resolve_background_point_index():
    frames, _, _ = _stack(seed=4)
    stack = da.from_array(frames, chunks=(3, 2, 5, 6))
    np.testing.assert_allclose(resolve_background(2, stack), frames[2].mean(axis=0))
    np.testing.assert_allclose(resolve_background(np.int64(6), frames), frames[6].mean(axis=0))


def test_a_background_of_counts_is_kept_as_float32_and_subtracts_to_the_same_bits():
    rng = np.random.default_rng(11)
    frames = rng.integers(0, 60000, size=(3, 40, 50)).astype(np.uint16)
    background = rng.integers(0, 60000, size=(2, 40, 50)).astype(np.uint16).mean(axis=0)
    small = compact_background(background)
    assert small.dtype == np.float32 and np.array_equal(small, background)
    assert resolve_background(background).dtype == np.float32
    np.testing.assert_array_equal(preprocess_frames(frames, small),
                                  preprocess_frames(frames, background))
    # a value float32 cannot hold keeps the image in float64
    background[3, 4] = 0.1
    assert compact_background(background).dtype == np.float64
    assert resolve_background(background).dtype == np.float64


@pytest.mark.parametrize("dtype, k", [
    ("<u2", 2), (">u2", 2), ("<u2", 4), ("<u2", 64), ("<u2", 256), ("<u2", 3), ("<u2", 1),
    ("u1", 8), ("<u4", 2), ("<i2", 2), ("<f8", 2)])
def test_a_points_background_is_numpys_mean_compacted_to_the_bit(dtype, k):
    """The one-pass path (unsigned counts, a power of two of frames, a sum float32 holds) and
    numpy's mean give the same image, dtype and bits; 256 uint16 frames and 3 frames do not
    take it, and still give numpy's."""
    rng = np.random.default_rng(13)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    frames = (rng.integers(info.min, info.max, size=(k, 20, 30), endpoint=True).astype(dtype)
              if info else rng.random((k, 20, 30)).astype(dtype))
    frames[0, 0, :3] = info.max if info else 1.0  # the largest counts are summed too
    expected = compact_background(frames.mean(axis=0))
    found = point_background(frames)
    assert found.dtype == expected.dtype and found.shape == (20, 30)
    np.testing.assert_array_equal(found, expected)
    assert point_background(frames[:, None]).shape == (20, 30)  # (K, 1, M, N) as a dataset row


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])  # the compiled kernel, numpy's arithmetic
def test_the_image_max_and_sum_come_from_the_same_pass(dtype):
    rng = np.random.default_rng(12)
    frames = rng.integers(0, 60000, size=(2, 30, 70)).astype(dtype)
    stats = np.empty(2)
    image = preprocess_frames(frames, np.full((30, 70), 20000.0), stats=stats)
    assert stats[0] == image.max()
    np.testing.assert_allclose(stats[1], image.sum(dtype=np.float64), rtol=1e-14)
    preprocess_frames(np.zeros((2, 3, 4), dtype), stats=stats, warn_empty=False)
    assert stats.tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match="stats must be a float64 array of 2 values"):
        preprocess_frames(frames, stats=np.empty(3))


@pytest.mark.parametrize("index", [7, 100, -8])
def test_resolve_background_point_index_out_of_range_names_range(index):
    frames, _, _ = _stack(seed=4)
    with pytest.raises(ConfigError) as info:
        resolve_background(index, da.from_array(frames, chunks=(3, 2, 5, 6)))
    assert "[0, 7)" in str(info.value) and str(index) in str(info.value)


def test_resolve_background_point_index_needs_frames():
    with pytest.raises(ConfigError, match="needs the scan's frames"):
        resolve_background(3)


def test_resolve_background_rejects_bad_values():
    with pytest.raises(ConfigTypeError):
        resolve_background(True)
    with pytest.raises(ConfigError, match="shape"):
        resolve_background(np.zeros(5))
    with pytest.raises(ConfigTypeError, match="dtype"):
        resolve_background(np.array([["a", "b"]]))


# -- the one-pass kernel equals the numpy arithmetic, bit for bit ---------------------


def _reference(frames, subtrahend=None):
    """The arithmetic preprocess_frames has always done, written out in numpy."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    image = frames.mean(axis=0, dtype=np.float64)
    if subtrahend is not None:
        image -= subtrahend
    np.maximum(image, 0.0, out=image)
    return image.astype(np.float32)


def _frames_of(dtype, n_frames, rng, shape=(37, 29)):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        frames = (rng.standard_normal((n_frames, *shape)) * 1e3).astype(dtype)
        frames[0, 0, 0] = np.nan
        frames[0, 1, 1] = -0.0
        frames[-1, 2, 2] = np.inf
        return frames
    if dtype == np.uint64:  # beyond float64's 53 bits: the cast rounds
        return rng.integers(2**62, 2**63, size=(n_frames, *shape), dtype=np.uint64) * 2 + 1
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=(n_frames, *shape), endpoint=True, dtype=dtype)


def _same_bits(a, b):
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.uint32, np.uint64, np.int8,
                                   np.int16, np.int32, np.int64, np.float32, np.float64])
@pytest.mark.parametrize("n_frames", [1, 2, 7])
def test_kernel_equals_numpy_arithmetic_to_the_bit(dtype, n_frames):
    rng = np.random.default_rng(n_frames)
    frames = _frames_of(dtype, n_frames, rng)
    backgrounds = [None, rng.standard_normal(frames.shape[1:]) * 300.0,
                   frames[0].astype(np.float32), np.asarray(frames[0], dtype=np.float64)]
    if n_frames == 2:  # integer backgrounds too (each dtype pair compiles once)
        backgrounds += [rng.integers(0, 3000, size=frames.shape[1:]).astype(np.uint16),
                        rng.integers(-2**40, 2**40, size=frames.shape[1:])]
    with np.errstate(invalid="ignore", over="ignore"):
        for background in backgrounds:
            _same_bits(preprocess_frames(frames, background, warn_empty=False),
                       _reference(frames, background))


def test_kernel_equals_numpy_on_a_detector_sized_uint16_point():
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 4096, size=(2, 512, 512), dtype=np.uint16)
    background = frames.mean(axis=0) * 0.97 + rng.standard_normal((512, 512))
    _same_bits(preprocess_frames(frames, background), _reference(frames, background))
    _same_bits(preprocess_frames(frames), _reference(frames))


def test_kernel_takes_2d_input_views_and_odd_dtypes():
    rng = np.random.default_rng(8)
    frames = rng.integers(0, 1000, size=(3, 40, 60), dtype=np.uint16)
    background = rng.random((60, 40)).T * 500  # a transposed (non-contiguous) background
    cases = [
        (frames[0], background),                     # one 2-D image
        (frames[:, ::2, 1::3], background[::2, 1::3]),  # strided views
        (frames.astype(">u2"), background),          # big-endian: numpy's own path
        (frames.astype(np.float16), background),     # float16: numpy's own path
        (frames.astype(bool), None),
        (frames, background.astype(">f8")),
    ]
    for f, b in cases:
        _same_bits(preprocess_frames(f, b, warn_empty=False), _reference(f, b))


def test_kernel_warns_as_before_on_an_all_zero_result():
    frames = np.full((2, 3, 3), 7, dtype=np.uint16)
    with pytest.warns(EmptyImageWarning):
        preprocess_frames(frames, np.full((3, 3), 9.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess_frames(np.zeros((2, 3, 3), dtype=np.uint16), np.full((3, 3), 9.0))


def test_kernel_is_safe_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(9)
    points = [rng.integers(0, 500, size=(2, 64, 64)).astype(dt)
              for dt in (np.int16, np.uint32, np.float32, np.int8) for _ in range(4)]
    background = rng.random((64, 64)) * 100
    with ThreadPoolExecutor(4) as pool:  # first calls of new dtypes compile concurrently
        results = list(pool.map(lambda f: preprocess_frames(f, background, warn_empty=False),
                                points))
    for f, image in zip(points, results):
        _same_bits(image, _reference(f, background))
