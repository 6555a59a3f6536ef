"""What comes over the network cannot steer the filesystem (the rules of ``crystalmapping.trust``)."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from crystalmapping.cli import main
from crystalmapping.config import ProcessConfig
from crystalmapping.errors import ConfigError
from crystalmapping.sim import simulate_scan
from crystalmapping.stream import StreamProcessor, processor_factory
from crystalmapping.trust import (UntrustedDocumentError, check_data_path, check_uid,
                                  parse_data_roots)

SMALL = dict(shape=(3, 3), detector_shape=(64, 64), grains=1, seed=2)


@pytest.mark.parametrize("uid", ["../x", "/abs/path", "..", ".hidden", "a/b", "a\\b", "",
                                 "x" * 129, None, 42, "uid\n", "ü"])
def test_a_uid_that_is_not_a_plain_name_is_refused(uid):
    with pytest.raises(UntrustedDocumentError, match="not a plain name"):
        check_uid(uid)


@pytest.mark.parametrize("uid", ["5f0e4a4c-2b36-4a0e-9a0e-3c1f6b2f9d11", "scan_12.v2", "A" * 128])
def test_plain_uids_pass(uid):
    assert check_uid(uid) == uid


def test_data_paths_are_resolved_before_the_check(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    roots = parse_data_roots([root])
    assert check_data_path(str(root / "scan.h5"), roots) == str(root / "scan.h5")
    for path in (outside / "scan.h5", root / ".." / "secret" / "scan.h5", root / "link" / "scan.h5",
                 tmp_path / "data-other" / "scan.h5"):
        with pytest.raises(UntrustedDocumentError, match="outside the data roots"):
            check_data_path(str(path), roots)
    with pytest.raises(UntrustedDocumentError, match="none were given"):
        check_data_path(str(root / "scan.h5"), ())
    assert check_data_path("/anywhere.h5", None) == "/anywhere.h5"


def test_a_data_root_must_be_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="not an existing directory"):
        parse_data_roots([tmp_path / "missing"])
    with pytest.raises(ConfigError, match="empty"):
        parse_data_roots([""])


def test_serve_refuses_a_data_root_that_does_not_exist(tmp_path, capsys):
    code = main(["serve", "--data-root", str(tmp_path / "missing"), "--out-dir", str(tmp_path)])
    assert code == 2
    assert "not an existing directory" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_processor_refuses_a_hostile_uid_and_files_outside_the_roots(tmp_path):
    scan = simulate_scan(**SMALL)
    out = tmp_path / "maps"
    config = ProcessConfig(background=0)
    with ThreadPoolExecutor(1) as pool:
        factory = processor_factory(pool, config, out, data_roots=[tmp_path])
        docs = list(scan.documents(external=False))
        start = dict(docs[0][1], uid="../../escaped")
        assert factory("start", start) == ([], [])
        with pytest.raises(UntrustedDocumentError):
            StreamProcessor(pool, config, out)("start", start)
        assert not (tmp_path / "escaped.zarr").exists() and not out.exists()

        elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
        docs = list(scan.documents(external=True, directory=elsewhere))
        proc = StreamProcessor(pool, config, out, data_roots=[tmp_path])
        for name, doc in docs:
            proc(name, doc)
        maps = proc.wait(60)
    assert maps.attrs["failed_points"] == list(range(scan.n_points))
    assert all("outside the data roots" in r for r in maps.attrs["failure_reasons"])
