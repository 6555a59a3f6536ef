"""Unit tests of crystalmapping.preprocess: the kernel, the lazy wrapper, the background."""

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from crystalmapping.errors import ConfigError, ConfigTypeError, EmptyImageWarning
from crystalmapping.preprocess import preprocess, preprocess_frames, resolve_background


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
