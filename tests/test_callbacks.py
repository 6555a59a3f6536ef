"""The tutorial's streaming callbacks on real runs of a real catalog.

The chain ImageProcessor -> PeakTracker -> TrackLinker, fed by ``replay(run)``,
must give the very peaks and tracks of the kernels run directly on the
simulator's frames, record its result in a second catalog, and work with
bluesky's BestEffortCallback.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest
from event_model import pack_event_page

from crystalmapping import Catalog
from crystalmapping.callbacks import ImageProcessor, PeakTracker, TrackLinker
from crystalmapping.playback import replay
from crystalmapping.config import LinkOptions, LocateOptions
from crystalmapping.errors import ConfigError, ConfigTypeError, ScanError
from crystalmapping.link import link_peaks
from crystalmapping.locate import PEAK_COLUMNS, locate_peaks
from crystalmapping.preprocess import preprocess_frames
from crystalmapping.source import _ArrayReader

KEY = "dexela_image"
# The tutorial's options, with its algorithm named where the package has a choice.
LOCATE = dict(diameter=15, percentile=80, separation=100)
LINK = dict(search_range=50)
if "locator" in {f.name for f in dataclasses.fields(LocateOptions)}:
    LOCATE["locator"] = "trackpy"
if "linker" in {f.name for f in dataclasses.fields(LinkOptions)}:
    LINK["linker"] = "trackpy"
# On a 128 x 128 detector the tutorial's separation=100 leaves trackpy a 28 px wide
# window (it skips maxima within separation / 2 of the edge): smaller features there.
SMALL = dict(LOCATE, diameter=9, separation=30)


@pytest.fixture(scope="module")
def DB2(tmp_path_factory):
    """The tutorial's second catalog, for the derived runs."""
    return Catalog(tmp_path_factory.mktemp("db2"))


def subtrahend_of(scan) -> np.ndarray:
    """The tutorial's subtrahend: the mean frame of a point off the sample."""
    return scan.frames(int(scan.truth.attrs["background_point"])).mean(axis=0)


def expected_tracks(scan, subtrahend, locate) -> pd.DataFrame:
    """locate_peaks + link_peaks run directly on the simulator's frames."""
    tables = [locate_peaks(preprocess_frames(scan.frames(i), subtrahend, warn_empty=False),
                           frame=i, **locate) for i in range(scan.n_points)]
    return link_peaks(pd.concat(tables, ignore_index=True), **LINK)


def as_from_run_engine(documents):
    """A RunEngine's start document always has plan_type and scan_id (the simulator's has not)."""
    for name, doc in documents:
        if name == "start":
            doc = {"plan_type": "generator", "scan_id": 7, **doc}
        yield name, doc


class Recorder:
    """Collects (name, doc) pairs."""

    def __init__(self):
        self.docs = []

    def __call__(self, name, doc):
        self.docs.append((name, doc))

    def of(self, name):
        return [doc for n, doc in self.docs if n == name]


@pytest.mark.parametrize("which, locate", [("inline", LOCATE), ("aborted", SMALL)],
                         ids=["inline-frames", "external-hdf5-aborted"])
def test_tutorial_chain_gives_the_kernels_tracks_and_records_them(catalog, scans, DB2, which,
                                                                  locate, monkeypatch):
    from bluesky.callbacks.best_effort import BestEffortCallback

    monkeypatch.setenv("BLUESKY_DEBUG_CALLBACKS", "1")  # BEC raises instead of logging
    scan, uid = scans[which]
    run = catalog[uid]
    image = subtrahend_of(scan)
    record_peaks = which == "inline"  # one write per peak: kept to the small run
    before = set(DB2.uids())

    # The tutorial's cell, verbatim but for the options naming the tutorial's algorithm.
    ip = ImageProcessor(KEY, subtrahend=image)
    pt = PeakTracker(KEY, **locate)
    tl = TrackLinker(db=DB2, **LINK)
    bec = BestEffortCallback()
    bec.disable_plots()
    tl.subscribe(DB2.insert)
    pt.subscribe(tl)
    if record_peaks:
        pt.subscribe(DB2.insert)
    ip.subscribe(pt)
    ip.subscribe(bec)
    out_ip, out_pt, out_tl = Recorder(), Recorder(), Recorder()
    ip.subscribe(out_ip)
    pt.subscribe(out_pt)
    tl.subscribe(out_tl)
    raw_bec = BestEffortCallback()
    raw_bec.disable_plots()

    for name, doc in as_from_run_engine(replay(run)):
        raw_bec(name, doc)
        ip(name, doc)

    # Same peaks, same positions, same track ids as the kernels on the true frames.
    expected = expected_tracks(scan, image, locate)
    assert expected["particle"].nunique() > 2
    got = pd.DataFrame([doc["data"] for doc in out_tl.of("event")])
    assert list(got.columns) == PEAK_COLUMNS + ["particle"]
    pd.testing.assert_frame_equal(got, expected[got.columns.tolist()], check_exact=True)
    assert len(out_pt.of("event")) == len(expected)

    # Each derived run says what made it from what, and keeps the grid.
    (ip_start,), (pt_start,), (tl_start,) = (out.of("start") for out in (out_ip, out_pt, out_tl))
    assert [s["analysis_stage"] for s in (ip_start, pt_start, tl_start)] == [
        "ImageProcessor", "PeakTracker", "TrackLinker"]
    assert ip_start["parent_uid"] == uid
    assert pt_start["parent_uid"] == ip_start["uid"]
    assert tl_start["parent_uid"] == pt_start["uid"]
    assert {s["source_uid"] for s in (ip_start, pt_start, tl_start)} == {uid}
    for start in (ip_start, pt_start, tl_start):
        for key in ("shape", "extents", "snaking", "motors"):
            assert start[key] == run.start[key]
    assert pt_start["analysis_parameters"]["locate"]["diameter"] == locate["diameter"]
    assert tl_start["analysis_parameters"]["link"]["search_range"] == 50
    status = run.stop["exit_status"]
    assert [out.of("stop")[0]["exit_status"] for out in (out_ip, out_pt, out_tl)] == [status] * 3

    # The derived runs are recorded in DB2 (once each) and read back by uid.
    recorded = [tl_start["uid"]] + ([pt_start["uid"]] if record_peaks else [])
    assert sorted(set(DB2.uids()) - before) == sorted(recorded)
    stored = DB2[tl_start["uid"]]
    assert stored.start["analysis_stage"] == "TrackLinker"
    assert stored.start["parent_uid"] == pt_start["uid"]
    assert stored.stop["num_events"] == {"primary": len(expected)}
    ds = stored.to_dataset(None)
    assert ds.sizes["point"] == len(expected)
    np.testing.assert_array_equal(ds["particle"].values, expected["particle"].values)
    np.testing.assert_array_equal(ds["x"].values, expected["x"].values)
    if record_peaks:
        peaks = DB2[pt_start["uid"]]
        assert peaks.start["analysis_stage"] == "PeakTracker"
        assert peaks.stop["num_events"] == {"primary": len(expected)}


def test_image_processor_emits_numpy_images_with_the_scalars(catalog, scans):
    scan, uid = scans["inline"]
    run = catalog[uid]
    sub = subtrahend_of(scan)
    out = Recorder()
    ip = ImageProcessor(KEY, subtrahend=sub)
    ip.subscribe(out)
    raw = list(replay(run))
    for name, doc in raw:
        ip(name, doc)

    assert [n for n, _ in out.docs] == ["start", "descriptor"] + ["event"] * 40 + ["stop"]
    start, desc = out.of("start")[0], out.of("descriptor")[0]
    assert start["analysis_stage"] == "ImageProcessor" and start["parent_uid"] == uid
    assert start["hints"] == run.start["hints"]
    assert desc["data_keys"][KEY]["shape"] == [128, 128]
    assert set(desc["data_keys"]) == {KEY, "sample_y", "sample_x", "dexela_stats1_total"}
    raw_events = [doc for n, doc in raw if n == "event"]
    for i, (event, source) in enumerate(zip(out.of("event"), raw_events)):
        image = event["data"][KEY]
        assert isinstance(image, np.ndarray) and image.dtype == np.float32
        np.testing.assert_array_equal(image, preprocess_frames(scan.frames(i), sub,
                                                               warn_empty=False))
        assert event["seq_num"] == i + 1 == source["seq_num"]
        for key in ("sample_y", "sample_x", "dexela_stats1_total"):
            assert event["data"][key] == source["data"][key]
    assert out.of("stop")[0]["num_events"] == {"primary": 40}

    # A RunRouter hands out event pages: same images.
    paged = Recorder()
    ip2 = ImageProcessor(KEY, subtrahend=sub)
    ip2.subscribe(paged)
    events = raw_events
    ip2("start", raw[0][1])
    ip2("descriptor", raw[1][1])
    ip2("event_page", pack_event_page(*events[:25]))
    ip2("event_page", pack_event_page(*events[25:]))
    ip2("stop", raw[-1][1])
    for a, b in zip(paged.of("event"), out.of("event")):
        np.testing.assert_array_equal(a["data"][KEY], b["data"][KEY])
        assert a["seq_num"] == b["seq_num"]
    assert len(paged.of("event")) == 40


def test_replay_reads_a_few_points_at_a_time_and_fills_external_frames(catalog, scans, monkeypatch):
    scan, uid = scans["rod"]
    run = catalog[uid]
    reads = []
    original = _ArrayReader.__getitem__
    monkeypatch.setattr(
        _ArrayReader, "__getitem__",
        lambda self, index: reads.append((self.key, index)) or original(self, index))

    docs = replay(run, points_per_read=4)
    head = list(itertools.islice(docs, 5))  # start, descriptor, 3 events
    assert [n for n, _ in head] == ["start", "descriptor", "event", "event", "event"]
    image_reads = [index for key, index in reads if key == KEY]
    assert len(image_reads) == 1 and image_reads[0][0] == slice(0, 4), image_reads  # 4 of 192
    start, desc = head[0][1], head[1][1]
    assert start == run.start
    assert desc["data_keys"][KEY]["external"] == "STREAM:"
    for i, (_, event) in enumerate(head[2:]):
        frames = event["data"][KEY]
        assert isinstance(frames, np.ndarray) and frames.shape == (2, 512, 512)
        np.testing.assert_array_equal(frames, scan.frames(i))
        assert event["filled"] == {KEY: True}
        assert event["descriptor"] == desc["uid"] and event["seq_num"] == i + 1
        assert set(event["timestamps"]) == set(event["data"])
    docs.close()

    def replayed(uid):
        pairs = list(replay(catalog[uid]))
        return [name for name, _ in pairs], [doc for name, doc in pairs if name == "event"]

    # The whole stream of an external-HDF5 run: filled events, no stream_resource/datum.
    scan, uid = scans["aborted"]
    names, events = replayed(uid)
    assert names == ["start", "descriptor"] + ["event"] * 30 + ["stop"]
    np.testing.assert_array_equal(events[29]["data"][KEY], scan.frames(29))

    # Inline frames come out the same way, with nothing to fill.
    scan, uid = scans["inline"]
    names, events = replayed(uid)
    assert names == ["start", "descriptor"] + ["event"] * 40 + ["stop"]
    np.testing.assert_array_equal(events[11]["data"][KEY], scan.frames(11))
    assert events[0]["filled"] == {}


def test_clear_errors(catalog, scans):
    scan, uid = scans["inline"]
    run = catalog[uid]
    start, desc, event = itertools.islice(replay(run), 3)

    ip = ImageProcessor("dexela_img")
    out = Recorder()
    ip.subscribe(out)
    ip(*start)
    with pytest.raises(ScanError, match=r"'dexela_img'.*\['dexela_image', 'dexela_stats1_total', "
                                        r"'sample_x', 'sample_y'\].*ImageProcessor\('<key>'"):
        ip(*desc)
    ip(*event)  # ignored: its descriptor was refused
    ip("stop", run.stop)  # the derived run is closed as failed, saying why
    assert [n for n, _ in out.docs] == ["start", "stop"]
    assert out.of("stop")[0]["exit_status"] == "fail"
    assert "dexela_img" in out.of("stop")[0]["reason"]

    ip = ImageProcessor(KEY, subtrahend=np.zeros((3, 4)))
    ip(*start)
    with pytest.raises(ConfigError, match=r"\(3, 4\).*\(2, 128, 128\)"):
        ip(*desc)
    with pytest.raises(ConfigError, match=r"one \(M, N\) image, got shape \(2, 3, 4\)"):
        ImageProcessor(KEY, subtrahend=np.zeros((2, 3, 4)))

    with pytest.raises(ScanError, match=r"no data key 'nope'.*dexela_image"):
        next(replay(run, data_key="nope"))

    pt = PeakTracker(KEY, **LOCATE)
    pt(*start)
    with pytest.raises(ScanError, match=r"one \(M, N\) image per event.*ImageProcessor"):
        pt(*desc)
    with pytest.raises(ConfigTypeError, match=r"unknown locate keyword\(s\) \['diamter'\]"):
        PeakTracker(KEY, diamter=15)
    with pytest.raises(ConfigTypeError, match="insert"):
        TrackLinker(db=object())

    tl = TrackLinker(**LINK)
    tl(*start)
    with pytest.raises(ScanError, match=r"lacks \['y', 'x', 'frame'\].*pt.subscribe\(tl\)"):
        tl(*desc)

    # Frames left external and unfilled: the error says how to fill them.
    unfilled = dict(event[1], data={k: v for k, v in event[1]["data"].items() if k != KEY})
    ip = ImageProcessor(KEY)
    ip(*start)
    ip(*desc)
    with pytest.raises(ScanError, match=r"no 'dexela_image' data.*replay\(run\)"):
        ip("event", unfilled)


def test_track_linker_records_each_document_once_in_any_db():
    from event_model import compose_run

    class ListDB:
        """Any object with insert(name, doc) is a db."""

        def __init__(self):
            self.docs = []

        def insert(self, name, doc):
            self.docs.append((name, doc))

    db = ListDB()
    tl = TrackLinker(db=db, **LINK)
    tl.subscribe(db.insert)  # as the tutorial does, on top of db=: still recorded once
    out = Recorder()
    tl.subscribe(out)
    run = compose_run(metadata={"shape": [2, 2], "motors": ["sample_y", "sample_x"]})
    desc = run.compose_descriptor(name="primary", data_keys={
        c: {"source": "test", "dtype": "number", "shape": []} for c in ("y", "x", "frame")})
    tl("start", run.start_doc)
    tl("descriptor", desc.descriptor_doc)
    for frame, (y, x) in enumerate([(10, 10), (10.5, 10), (11, 10.2), (80, 40)]):
        tl("event", desc.compose_event(data={"y": y, "x": x, "frame": frame},
                                       timestamps={"y": 0, "x": 0, "frame": 0}))
    tl("stop", run.compose_stop())

    assert db.docs == out.docs
    assert [n for n, _ in db.docs] == ["start", "descriptor"] + ["event"] * 4 + ["stop"]
    assert [doc["data"]["particle"] for doc in out.of("event")] == [0, 0, 0, 1]
    assert out.of("start")[0]["parent_uid"] == run.start_doc["uid"]
    assert out.of("start")[0]["shape"] == [2, 2]


def test_a_run_without_peaks_goes_through_the_chain(catalog, DB2):
    """A scan of no grain: warnings say so, and every callback still emits a valid run."""
    from crystalmapping.errors import NoPeaksWarning
    from crystalmapping.sim import simulate_scan

    scan = simulate_scan(shape=(3, 3), detector_shape=(64, 64), grains=0)
    assert scan.truth.sizes["peak"] == 0
    run = catalog[catalog.ingest(scan.documents(external=False))]
    ip = ImageProcessor(KEY, subtrahend=np.zeros((64, 64)))
    pt = PeakTracker(KEY)
    tl = TrackLinker(db=DB2, search_range=50)
    emitted = []
    tl.subscribe(DB2.insert)
    tl.subscribe(lambda name, doc: emitted.append((name, doc)))
    pt.subscribe(tl)
    ip.subscribe(pt)
    with pytest.warns(NoPeaksWarning, match="no peak"):
        for name, doc in replay(run):
            ip(name, doc)
    assert [n for n, _ in emitted] == ["start", "descriptor", "stop"]
    linked = DB2[emitted[0][1]["uid"]]
    assert linked.start["analysis_stage"] == "TrackLinker"
    assert linked.stop["exit_status"] == "success"
