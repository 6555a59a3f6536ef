"""Benchmark at detector scale: locator, batch, live mode and memory, each beside its baseline.

Simulates a grid scan at full detector size (3888 x 3072 px, uint16, 2 frames
per point, external HDF5 named by StreamResource/StreamDatum documents, in a
temporary embedded catalog): Poisson background, Bragg peaks of the measured
rod's grains (about ``--spots`` on a frame of the sample), a powder ring over
the lowest fifth of the grid. Then, in one run, every figure beside its
baseline, measured on the same data:

* the locator: seconds per frame of each stage it exposes, and of the default
  locator (``locate_peaks(image, diameter=15)``) beside ``trackpy.locate`` with
  the tutorial's keywords and beside a copy of the frame, on the same frames;
* batch: points/s of ``process_run`` on ``--workers`` worker processes, beside
  1 worker and beside the tutorial's serial callbacks (ImageProcessor ->
  PeakTracker -> TrackLinker over the run's replayed documents; on at most
  ``--tutorial-points`` points spread over the scan), with the peak memory of
  the client, scheduler and workers;
* live: the run published through bluesky's 0MQ proxy to ``crystalmapping
  serve`` at each of ``--rates`` points/s: latency, largest lag, points
  dropped, the server's peak memory, and whether its maps equal batch;
* memory: peak memory of the batch on a large and a small scan at 512 x 512.

Progress goes to stderr, the JSON summary to stdout, the tables to ``--report``.

    python benchmarks/detector.py [--quick] [--shape 22 5] [--detector 3888 3072] [--frames 2]
        [--workers 2] [--rates 2 5 10] [--json out.json] [--report docs/performance.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from detector_report import bars, markdown
from harness import (background_point, grid_for_points, ingest, lit_peaks, log, machine, proxy,
                     run_batch, run_live, same_maps, scan_figures, simulate, source_hash,
                     warm_up_frames)

KEY = "dexela_image"
DIAMETER = 15
#: The tutorial's keywords (its PeakTracker and TrackLinker).
TUTORIAL_LOCATE = dict(diameter=DIAMETER, percentile=80, separation=100)
TUTORIAL_LINK = dict(search_range=50)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a small grid (8 x 3) and memory check (200 vs 20 points), for a try")
    p.add_argument("--shape", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                   help="grid points, slow and fast axis (default 22 5; --quick 8 3)")
    p.add_argument("--detector", type=int, nargs=2, default=[3888, 3072], metavar=("M", "N"))
    p.add_argument("--frames", type=int, default=2, help="frames per point")
    p.add_argument("--spots", type=int, default=40,
                   help="Bragg spots on a frame of the sample, about (fewer if they cannot fit)")
    p.add_argument("--workers", type=int, default=2, help="workers of the batch and of serve")
    p.add_argument("--rates", type=float, nargs="+", default=[2.0, 5.0, 10.0],
                   help="points/s the live run is published at, one run each")
    p.add_argument("--locate-frames", type=int, default=3, help="frames the locator is timed on")
    p.add_argument("--repeat", type=int, default=2, help="timings per frame (the best is kept)")
    p.add_argument("--runs", type=int, default=2,
                   help="runs of the tutorial chain and of each batch (the fastest is kept)")
    p.add_argument("--tutorial-points", type=int, default=30,
                   help="points the tutorial's callbacks run on, spread over the scan")
    p.add_argument("--memory-points", type=int, nargs=2, default=None, metavar=("LARGE", "SMALL"),
                   help="points of the two memory-check scans (default 2000 200; --quick 200 20)")
    p.add_argument("--memory-detector", type=int, nargs=2, default=[512, 512], metavar=("M", "N"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the JSON summary to this file")
    p.add_argument("--report", default=None, help="write the markdown report to this file")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="work in DIR and keep it; a scan already simulated there is reused")
    args = p.parse_args(argv)
    args.shape = args.shape or ([8, 3] if args.quick else [22, 5])
    args.memory_points = args.memory_points or ([200, 20] if args.quick else [2000, 200])
    return args


# ----------------------------------------------------------------------------- the locator


def locator_stages() -> list[tuple[str, object]]:
    """The locator's stages, in order: ``(name, function(results) -> new results)``.

    Each function takes the results so far (``image`` and what earlier stages
    returned) and returns its own. The compiled locator (``crystalmapping.bragg``)
    runs four: one band-pass pass (which also fills the tile maxima and the
    noise sample), the noise estimate, the local maxima, and the measurement of
    the candidates with the rules; they are called here as ``locate_bragg``
    calls them, and the peaks they give are checked against ``locate_peaks``.
    Without those functions, the public ``bandpass`` and ``image_noise`` are
    timed and the rest of ``locate_peaks`` is reported as one figure.
    """
    try:
        return _compiled_stages()
    except (ImportError, AttributeError):
        from crystalmapping import locate

        return [("band-pass",
                 lambda r: {"filtered": locate.bandpass(r["image"], diameter=DIAMETER)}),
                ("noise estimate", lambda r: {"noise": locate.image_noise(r["filtered"])})]


def _compiled_stages() -> list[tuple[str, object]]:
    from crystalmapping import _bragg_filters as filters
    from crystalmapping import bragg
    from crystalmapping.config import LocateOptions

    o = LocateOptions(diameter=DIAMETER)
    half, size = max(DIAMETER // 2, 1), bragg._size(o.smoothing_size, o.diameter)
    kernel_image, band, noise, measure, rules = (bragg._kernel_image, bragg._bandpass,
                                                 bragg._noise, bragg._measure, bragg._rules)
    maxima, apart = filters.local_maxima, filters.apart
    workspace = getattr(bragg, "_workspace", None)  # the thread's reused full-frame buffers

    def band_pass(r):
        image = kernel_image(r["image"])
        filtered, tiles, sample, low, high = band(image, o.noise_size, size, True)
        return dict(kernel_image=image, filtered=filtered, tiles=tiles, sample=sample,
                    finite=bool(np.isfinite(low) and np.isfinite(high)),
                    extreme=max(abs(low), abs(high)))

    def noise_estimate(r):
        work = {} if workspace is None else {"work": workspace(r["filtered"].shape)[-1]}
        level, sigma = noise(*r["sample"], finite=r["finite"], **work)
        return dict(level=level, sigma=sigma, floor_noise=max(sigma, 1e-6 * r["extreme"], 1e-300))

    def local_maxima(r):
        f = r["filtered"]
        cand = maxima(f, r["tiles"][0], r["level"] + 0.5 * o.min_snr * r["floor_noise"], half)
        if len(cand):
            cand = cand[np.argsort(-f[cand[:, 0], cand[:, 1]], kind="stable")]
            cand = cand[apart(cand, half, f.shape)]
        return dict(candidates=cand)

    def candidate_measurement(r):
        rows = measure(r["filtered"], r["kernel_image"], r["candidates"], o, r["level"],
                       r["sigma"], r["floor_noise"], True, r["tiles"], r["finite"])
        return dict(peaks=rules(rows, o, r["sigma"])[0])

    return [("band-pass", band_pass), ("noise estimate", noise_estimate),
            ("local maxima", local_maxima), ("candidate measurement", candidate_measurement)]


#: The stages the report has a row for, exposed or not.
STAGE_NAMES = ["band-pass", "noise estimate", "local maxima", "candidate measurement"]


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def time_locator(scan, points, subtrahend, repeat: int) -> dict:
    """Seconds per frame of each stage, the default locator, trackpy.locate and a copy."""
    import trackpy

    from crystalmapping.locate import locate_peaks
    from crystalmapping.preprocess import preprocess_frames

    trackpy.quiet()
    stages = locator_stages()
    times: dict[str, list[float]] = {}
    n_peaks, agree = {"default": [], "trackpy": []}, []
    warm = {"image": preprocess_frames(*warm_up_frames(), warn_empty=False)}
    for _, stage in stages:  # imports and compiles, outside the timings
        warm.update(stage(warm))
    locate_peaks(warm["image"], diameter=DIAMETER)
    trackpy.locate(warm["image"], **TUTORIAL_LOCATE)
    for i in points:
        image = preprocess_frames(scan.frames(int(i)), subtrahend, warn_empty=False)
        results = {"image": image}
        for name, stage in stages:
            t, new = best_of(repeat, lambda: stage(results))
            results.update(new)
            times.setdefault(name, []).append(t)
        for name, fn in [("copy", image.copy),
                         ("default", lambda: locate_peaks(image, diameter=DIAMETER)),
                         ("trackpy", lambda: trackpy.locate(image, **TUTORIAL_LOCATE))]:
            t, table = best_of(repeat, fn)
            times.setdefault(name, []).append(t)
            if name in n_peaks:
                n_peaks[name].append(len(table))
            if name == "default" and "peaks" in results:  # the stages found the same peaks
                agree.append(np.array_equal(results["peaks"][["y", "x"]].to_numpy(),
                                            table[["y", "x"]].to_numpy()))
        log(f"locator: frame of point {i}: default {times['default'][-1]:.3f} s, "
            f"trackpy {times['trackpy'][-1]:.3f} s, copy {times['copy'][-1]:.4f} s")
    mean = {name: float(np.mean(t)) for name, t in times.items()}
    exposed = [name for name, _ in stages]
    out = {"frames": [int(i) for i in points], "repeat": repeat,
           "stages_s": {name: mean.get(name) for name in STAGE_NAMES},
           "rest_of_default_s": (mean["default"] - sum(mean[n] for n in exposed)
                                 if set(exposed) != set(STAGE_NAMES) else None),
           "stages_sum_s": sum(mean[n] for n in exposed),
           "stages_give_the_peaks": all(agree) if agree else None,
           "default_s": mean["default"], "trackpy_s": mean["trackpy"], "copy_s": mean["copy"],
           "default_peaks_per_frame": float(np.mean(n_peaks["default"])),
           "trackpy_peaks_per_frame": float(np.mean(n_peaks["trackpy"]))}
    out["trackpy_over_default"] = out["trackpy_s"] / out["default_s"]
    out["default_over_copy"] = out["default_s"] / out["copy_s"]
    return out


# ----------------------------------------------------------------------------- batch


def time_tutorial(run, subtrahend, timed: set[int], n_points: int, db2_dir: Path) -> dict:
    """The tutorial's callbacks over the replayed run, timed on the points ``timed``.

    Driven as ``tests/test_callbacks.py`` does (the linked tracks recorded in a
    second catalog). The read of each timed point's frames counts, and the
    stop (linking, recording); the points left out are read but neither timed
    nor passed on.
    """
    import crystalmapping as cm
    from crystalmapping.callbacks import ImageProcessor, PeakTracker, TrackLinker
    from crystalmapping.playback import replay

    db2 = cm.Catalog(db2_dir)
    ip = ImageProcessor(KEY, subtrahend=subtrahend)
    pt = PeakTracker(KEY, **TUTORIAL_LOCATE)
    tl = TrackLinker(db=db2, **TUTORIAL_LINK)
    tl.subscribe(db2.insert)
    pt.subscribe(tl)
    ip.subscribe(pt)
    tracks = []

    def count(name, doc):
        if name == "event":
            tracks.append(doc["data"]["particle"])

    tl.subscribe(count)
    documents = replay(run, data_key=KEY, points_per_read=None if len(timed) == n_points else 1)
    seconds, cpu, done = 0.0, 0.0, 0
    while done < len(timed):
        t, c = time.perf_counter(), time.process_time()
        name, doc = next(documents)
        if name == "stop" or (name == "event" and doc["seq_num"] - 1 not in timed):
            continue
        ip(name, doc)
        seconds, cpu = seconds + time.perf_counter() - t, cpu + time.process_time() - c
        if name == "event":
            done += 1
            if done % 5 == 0:
                log(f"tutorial chain: {done} of {len(timed)} points, {seconds:.1f} s")
    documents.close()
    t, c = time.perf_counter(), time.process_time()
    ip("stop", dict(run.stop))  # the linking, and the record in the second catalog
    seconds, cpu = seconds + time.perf_counter() - t, cpu + time.process_time() - c
    return {"points": len(timed), "seconds": seconds, "points_per_s": len(timed) / seconds,
            "cpu_s": cpu, "peaks": len(tracks), "tracks": len(set(tracks))}


def batch_figures(result: dict) -> dict:
    return dict(result, points_per_s=result["points"] / result["seconds"])


# ----------------------------------------------------------------------------- phases
# Each phase adds its figures to ``fig``; one that fails is recorded in
# ``fig["errors"]`` and the others still run.


def phase_locator(fig, ctx, args) -> None:
    scan = ctx["scan"]
    lit = np.flatnonzero(lit_peaks(scan) > 0)
    lit = lit if lit.size else np.arange(scan.n_points)
    spread = np.linspace(0, lit.size - 1, min(args.locate_frames, lit.size)).round().astype(int)
    chosen = lit[spread]
    log(f"locator: timing on the frames of points {chosen.tolist()}")
    fig["locator"] = time_locator(scan, chosen, ctx["subtrahend"], args.repeat)
    fig["locator"]["spots_per_frame"] = float(lit_peaks(scan)[chosen].mean())


def phase_tutorial(fig, ctx, args) -> None:
    log(f"tutorial chain: the tutorial's callbacks on up to {args.tutorial_points} points")
    scan, db2 = ctx["scan"], ctx["work"] / "db2"
    n = min(args.tutorial_points, scan.n_points)
    timed = set(np.linspace(0, scan.n_points - 1, n).round().astype(int).tolist())
    # A warm-up on one point with peaks: connections, compiles, the second catalog's creation.
    warm = int(np.argmax(lit_peaks(scan)))
    time_tutorial(ctx["run"], ctx["subtrahend"], {warm}, scan.n_points, db2)
    runs = [time_tutorial(ctx["run"], ctx["subtrahend"], timed, scan.n_points, db2)
            for _ in range(args.runs)]
    fig["tutorial"] = dict(max(runs, key=lambda r: r["points_per_s"]), runs=len(runs))
    log(f"tutorial chain: {fig['tutorial']['points_per_s']:.3f} points/s (fastest of "
        f"{', '.join('%.3f' % r['points_per_s'] for r in runs)})")


def phase_batch(fig, ctx, args) -> None:
    work = ctx["work"]
    for n in sorted({1, args.workers}):
        runs = []
        for i in range(args.runs):
            log(f"batch: process_run on {n} worker(s), run {i + 1} of {args.runs}")
            runs.append(batch_figures(run_batch(
                work / "catalog", ctx["uid"], ctx["bg"], n, work / f"batch-{n}.zarr",
                work / f"batch-{n}.log")))
        # the fastest run's figures; the memory is the most any run took
        b = fig.setdefault("batch", {})[str(n)] = dict(
            max(runs, key=lambda r: r["points_per_s"]), runs=len(runs),
            peak_rss=max(r["peak_rss"] for r in runs),
            peak_rss_with_start=max(r["peak_rss_with_start"] for r in runs))
        log(f"batch: {n} worker(s): {b['points_per_s']:.3f} points/s (fastest of "
            f"{', '.join('%.3f' % r['points_per_s'] for r in runs)}), "
            f"peak RSS {b['peak_rss'] / 1e9:.2f} GB")


def phase_live(fig, ctx, args) -> None:
    batch = ctx["work"] / f"batch-{args.workers}.zarr"
    with proxy() as ports:
        for rate in args.rates:
            log(f"live: publishing at {rate:g} points/s to serve ({args.workers} workers)")
            line = run_live(ctx["run"], ports, ctx["bg"], args.workers, rate,
                            ctx["work"] / f"live-{rate:g}")
            equal, diff = (same_maps(Path(line["path"]), batch) if batch.exists()
                           else (None, "no batch maps to compare with"))
            fig.setdefault("live", {})[f"{rate:g}"] = dict(
                line, dropped=line["published"] - line["points"], maps_equal_batch=equal,
                difference=diff)
            log(f"live: {rate:g} points/s: largest lag {line['max_lag_s']:.1f} s "
                f"({line['max_queued']} points), maps equal batch: {equal}")


def phase_memory(fig, ctx, args) -> None:
    import crystalmapping as cm

    for n in args.memory_points:
        shape, where = grid_for_points(n), ctx["work"] / f"memory-{n}"
        log(f"memory: {shape[0] * shape[1]} points at {args.memory_detector[0]} x "
            f"{args.memory_detector[1]} px: simulating")
        scan = simulate(shape, args.memory_detector, args.frames, args.spots, args.seed)
        uid = ingest(cm.Catalog(where), scan)
        log(f"memory: {scan.n_points} points: batch on {args.workers} workers")
        fig.setdefault("memory", {})[str(n)] = batch_figures(run_batch(
            where, uid, background_point(scan), args.workers, where.with_suffix(".zarr"),
            where.with_suffix(".log")))
    large, small = (fig["memory"][str(n)] for n in args.memory_points)
    fig["memory_ratio"] = large["peak_rss"] / small["peak_rss"]


def prepare_scan(fig, args, work: Path) -> dict:
    import crystalmapping as cm

    shape, detector = args.shape, args.detector
    log(f"scan: simulating {shape[0]} x {shape[1]} points at {detector[0]} x {detector[1]} px, "
        f"{args.frames} frames/point, into a catalog (external HDF5)")
    t = time.perf_counter()
    scan = simulate(shape, detector, args.frames, args.spots, args.seed)
    catalog = cm.Catalog(work / "catalog")
    uid = ingest(catalog, scan)
    bg = background_point(scan)
    fig["scan"] = dict(scan_figures(scan, time.perf_counter() - t), background_point=bg)
    log(f"scan: {fig['scan']['bragg_peaks']} Bragg peaks, ~{fig['scan']['spots_per_lit_frame']} "
        f"on a lit frame, in {fig['scan']['simulate_and_ingest_s']} s")
    return {"scan": scan, "uid": uid, "run": catalog[uid], "bg": bg, "work": work,
            "subtrahend": scan.frames(bg).mean(axis=0)}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    os.environ.setdefault("MPLBACKEND", "Agg")
    started = time.monotonic()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="detector-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    fig: dict = {"command": command_line(sys.argv[1:] if argv is None else argv),
                 "machine": machine(), "options": {
        k: v for k, v in vars(args).items() if k not in ("json", "report", "keep")}}
    busy, cores = fig["machine"]["load_average_at_start"][0], os.cpu_count() or 1
    if busy > 0.5 * cores:
        log(f"the machine is busy (load average {busy} on {cores} cores): the ratios, the "
            "2-worker one most, will be lower than on an idle machine; run it when nothing "
            "else does")
    try:
        ctx = prepare_scan(fig, args, work)
        for name, run_phase in [("locator", phase_locator), ("tutorial", phase_tutorial),
                                ("batch", phase_batch), ("live", phase_live),
                                ("memory", phase_memory)]:
            try:
                run_phase(fig, ctx, args)
            except Exception as exc:  # noqa: BLE001 - recorded; the other phases still run
                fig.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[-3000:]
                log(f"{name}: FAILED: {type(exc).__name__}: {str(exc)[-500:]}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    fig["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    fig["machine"]["source_at_end"] = source_hash()
    if fig["machine"]["source_at_end"] != fig["machine"]["source_at_start"]:
        log("the package's source changed during the run: its figures mix versions")
    fig["seconds"] = round(time.monotonic() - started, 1)
    fig["bars"] = bars(fig, args.workers, args.memory_points)
    text = json.dumps(fig, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.report:
        Path(args.report).write_text(markdown(fig, args.workers))
        log(f"report written to {args.report}")
    log(f"done in {fig['seconds']:.0f} s; bars: " + ", ".join(
        f"{b['bar']}: {_word(b['pass'])}" for b in fig["bars"]))
    return 1 if fig.get("errors") else 0


def command_line(argv: list[str]) -> str:
    """This run's command, without the options that name where figures and files go."""
    shown, skip = ["python", "benchmarks/detector.py"], False
    for word in argv:
        if skip or word in ("--json", "--keep"):
            skip = not skip and word in ("--json", "--keep")
            continue
        shown.append(word)
    return " ".join(shown)


def _word(ok) -> str:
    return "not measured" if ok is None else ("pass" if ok else "fail")


if __name__ == "__main__":
    sys.exit(main())
