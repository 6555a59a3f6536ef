"""--root-map OLD=NEW on `process` and `serve`, and root_map: in a config file."""

from __future__ import annotations

import contextlib
import shutil

import h5py
import pytest

import crystalmapping as cm
from crystalmapping.cli import main


def test_bad_root_maps_are_refused_before_any_work(catalog, scans, tmp_path, capsys):
    scan, uid = scans["aborted"]
    common = ["--catalog", catalog.uri, "--uid", uid, "--out", str(tmp_path / "m.zarr"),
              "--no-progress"]
    assert main(["process", *common, "--root-map", "/detector"]) == 2
    err = capsys.readouterr().err
    assert "OLD=NEW" in err and "'/detector'" in err and "--root-map /detector/data=" in err
    assert main(["process", *common, "--root-map", "detector=/mnt"]) == 2
    assert "absolute" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text("root_map: [/detector]\n")
    assert main(["process", *common, "--config", str(config)]) == 2
    assert "OLD=NEW" in capsys.readouterr().err
    assert main(["serve", "--root-map", "relative=/mnt", "--out-dir", str(tmp_path / "s")]) == 2
    assert "absolute" in capsys.readouterr().err
    assert not (tmp_path / "m.zarr").exists() and not (tmp_path / "s").exists()


@pytest.mark.filterwarnings("ignore::crystalmapping.errors.EmptyImageWarning")
def test_process_reads_the_files_through_the_root_map(catalog, scans, thread_client, tmp_path,
                                                      monkeypatch):
    """The documents name the catalog's detector directory; mapped to a copy whose frames
    are all zero, no peak is found: the copy was read."""
    from crystalmapping import commands

    # the session's cluster instead of a new LocalCluster per command
    monkeypatch.setattr(commands, "cluster", lambda args, values: contextlib.nullcontext(thread_client))
    scan, uid = scans["aborted"]
    mount = tmp_path / "mount"
    mount.mkdir()
    path = catalog.detector_dir / f"{uid}.h5"
    shutil.copy(path, mount / path.name)
    with h5py.File(mount / path.name, "r+") as f:
        f["/entry/data"][...] = 0
    bg = str(scan.truth.attrs["background_point"])
    common = ["--catalog", catalog.uri, "--uid", uid, "--background", bg, "--no-progress",
              "--min-points", "1"]
    config = tmp_path / "run.yaml"
    config.write_text(f"root_map:\n  {catalog.detector_dir}: {mount}\n")
    with pytest.warns(cm.errors.NoPeaksWarning):
        assert main(["process", *common, "--out", str(tmp_path / "zero.zarr"),
                     "--config", str(config)]) == 0
    assert cm.open_maps(tmp_path / "zero.zarr").attrs["n_peaks_found"] == 0
    assert main(["process", *common, "--out", str(tmp_path / "real.zarr")]) == 0
    assert cm.open_maps(tmp_path / "real.zarr").attrs["n_peaks_found"] > 0
