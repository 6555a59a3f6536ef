"""The report of ``benchmarks/detector.py``: the issue's bars, its figures as markdown tables."""

from __future__ import annotations


def bars(fig: dict, workers: int, memory_points) -> list[dict]:
    """The issue's "done when" bars: what was measured, and pass/fail (None: not measured)."""
    large, small = memory_points

    def locator_speed():
        r = fig["locator"]["trackpy_over_default"]
        return r >= 30, f"{r:.2f}x"

    def locator_copy():
        r = fig["locator"]["default_over_copy"]
        return r <= 10, f"{r:.1f}x"

    def over(baseline, limit):
        def check():
            r = fig["batch"][str(workers)]["points_per_s"] / baseline()["points_per_s"]
            return r >= limit, f"{r:.2f}x"
        return check

    def live(which):
        def check():
            five = fig["live"]["5"]
            return {"lag": (five["max_lag_s"] < 2,
                            f"{five['max_lag_s']:.1f} s ({five['max_queued']} points)"),
                    "dropped": (five["dropped"] == 0 == five["failed"],
                                f"{five['dropped']} dropped, {five['failed']} failed"),
                    "equal": (five["maps_equal_batch"],
                              {True: "identical", False: "different", None: "no batch"}[
                                  five["maps_equal_batch"]])}[which]
        return check

    def batch_rss():
        rss = fig["batch"][str(workers)]["peak_rss"]
        return rss < 3e9, _gb(rss)

    def memory():
        return fig["memory_ratio"] <= 1.2, f"{fig['memory_ratio']:.2f}x"

    checks = [
        ("locator: default >= 30x faster than trackpy.locate", locator_speed),
        ("locator: default <= 10x the frame copy", locator_copy),
        (f"batch: {workers} workers >= 20x the tutorial chain's points/s",
         over(lambda: fig["tutorial"], 20)),
        (f"batch: {workers} workers >= 1.6x 1 worker", over(lambda: fig["batch"]["1"], 1.6)),
        ("live at 5 points/s: largest lag < 2 s", live("lag")),
        ("live at 5 points/s: nothing dropped", live("dropped")),
        ("live at 5 points/s: maps equal batch", live("equal")),
        (f"batch peak RSS on {workers} workers < 3 GB", batch_rss),
        (f"memory: {large} points within 1.2x of {small} points", memory),
    ]
    out = []
    for name, check in checks:
        try:
            ok, measured = check()
        except (KeyError, TypeError, ZeroDivisionError):  # the phase did not run or failed
            ok, measured = None, "not measured"
        out.append({"bar": name, "measured": measured, "pass": None if ok is None else bool(ok)})
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _t(seconds: float | None) -> str:
    if seconds is None:
        return "not exposed yet"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.2f} s"


def _verdict(ok) -> str:
    return "not measured" if ok is None else ("pass" if ok else "**fail**")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def markdown(fig: dict, workers: int) -> str:
    """The report: bars, machine, scan, then locator, batch, live and memory tables."""
    out = ["# Performance at detector scale", "",
           f"Written by `{fig['command']}` (`make benchmark-detector` runs it with the defaults), "
           f"which took {fig['seconds'] / 60:.0f} min. Every figure comes from that one run, "
           "measured beside its baseline on the same data; run it again rather than edit this "
           "file.", ""]
    m = fig["machine"]
    if m.get("source_at_end") not in (None, m["source_at_start"]):
        out += ["**The package's source changed while this ran: its figures mix versions of "
                "the code. Run it again on a quiet tree.**", ""]
    out += ["## Bars", ""]
    out += _table(["bar", "measured", "result"],
                  [[b["bar"], b["measured"], _verdict(b["pass"])] for b in fig["bars"]])
    busy, cores = fig["machine"]["load_average_at_start"][0], fig["machine"]["cores"] or 1
    if busy > 0.5 * cores:
        out += ["", f"The machine was busy when the run started (load average {busy} on "
                f"{cores} cores): the ratios, the 2-worker one most, read lower than on an idle "
                "machine."]
    out += ["", "## Machine", ""] + _machine(fig["machine"])
    out += ["", "## Scan", "", _scan(fig["scan"])]
    errors = fig.get("errors", {})
    for title, key, section in [("Locator", "locator", _locator), ("Batch", "batch", _batch),
                                ("Live", "live", _live), ("Memory", "memory", _memory)]:
        out += ["", f"## {title}", ""]
        failed = [f"{name}: {error}" for name, error in errors.items()
                  if name == key or (key == "batch" and name == "tutorial")]
        if failed:
            out += ["Not measured, the phase failed:", "", "```", *failed, "```", ""]
        if key in fig:
            out += section(fig, workers)
    return "\n".join(out) + "\n"


def _machine(m: dict) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    return _table(["", ""], [
        ["CPU", m["cpu"]], ["cores", f"{m['cores']} logical ({m['physical_cores']} physical)"],
        ["memory", f"{m['memory_gb']} GiB"], ["OS", m["os"]], ["Python", m["python"]],
        ["packages", packages],
        ["tree", f"{m['commit']}, package source {m['source_at_start']}"
                 + ("" if m.get("source_at_end") in (None, m["source_at_start"])
                    else f" at start, {m['source_at_end']} at end")],
        ["load average (1, 5, 15 min) at start; at end",
         f"{', '.join(map(str, m['load_average_at_start']))}; "
         f"{', '.join(map(str, m.get('load_average_at_end', [])))}"],
        ["date", m["date"]]])


def _scan(sc: dict) -> str:
    mb = sc["detector"][0] * sc["detector"][1] * sc["frames"] * 2 / 1e6
    return (f"{sc['points']} points ({sc['shape'][0]} x {sc['shape'][1]}, snaking), "
            f"{sc['detector'][0]} x {sc['detector'][1]} px {sc['dtype']}, {sc['frames']} frames "
            f"per point ({mb:.0f} MB), in external HDF5 named by StreamResource/StreamDatum "
            f"documents, read through an embedded catalog. {sc['grains']} grains throw "
            f"{sc['bragg_peaks']} Bragg peaks; {sc['points_with_spots']} points see "
            f"{sc['spots_per_lit_frame']} spots on average; a powder ring of "
            f"{sc['powder_height']:g} counts crosses the frames of {sc['powder_points']} points; "
            f"Poisson noise throughout. Background: the mean frame of point "
            f"{sc['background_point']}. Simulating and ingesting took "
            f"{sc['simulate_and_ingest_s']:.0f} s.")


def _locator(fig: dict, workers: int) -> list[str]:
    loc = fig["locator"]
    copy = loc["copy_s"]
    out = [f"Seconds per frame: the mean over the preprocessed frames of points {loc['frames']} "
           f"({loc['spots_per_frame']:.0f} Bragg spots each on average), best of "
           f"{loc['repeat']} each.", ""]
    rows = [["copy of the frame, `image.copy()`", _t(copy), "1", ""]]
    for name, s in loc["stages_s"].items():
        rows.append([f"stage: {name}", _t(s), "" if s is None else f"{s / copy:.1f}", ""])
    if loc["rest_of_default_s"] is not None:
        rest = loc["rest_of_default_s"]
        rows.append(["the rest of `locate_peaks` (its stages not exposed)", _t(rest),
                     f"{rest / copy:.1f}", ""])
    else:
        rows.append(["the four stages together", _t(loc["stages_sum_s"]),
                     f"{loc['stages_sum_s'] / copy:.1f}", ""])
    rows += [["default locator, `locate_peaks(image, diameter=15)`", _t(loc["default_s"]),
              f"{loc['default_over_copy']:.1f}", f"{loc['default_peaks_per_frame']:.0f}"],
             ["`trackpy.locate(image, diameter=15, percentile=80, separation=100)`",
              _t(loc["trackpy_s"]), f"{loc['trackpy_s'] / copy:.1f}",
              f"{loc['trackpy_peaks_per_frame']:.0f}"]]
    out += _table(["", "per frame", "x the copy", "peaks per frame"], rows)
    out += ["", f"trackpy.locate / default locator: **{loc['trackpy_over_default']:.2f}x**."]
    if loc.get("stages_give_the_peaks") is not None:
        out += ["", "The stages, called one by one as the compiled locator calls them, give "
                + ("the same peaks as `locate_peaks`." if loc["stages_give_the_peaks"] else
                   "**other peaks than `locate_peaks`: their times are not the locator's.**")]
    return out


def _batch(fig: dict, workers: int) -> list[str]:
    tut = fig.get("tutorial")
    out = ["Grid points per second on the same scan. The tutorial's callbacks run serially on "
           f"{tut['points'] if tut else 'some'} of its points spread over the scan, reading them "
           "through the same catalog; `process_run` maps all of them. Both are warmed up "
           "first (imports, compiles: one point through the chain; the kernels once on each "
           "worker), and the cluster's start is not timed. Each is run "
           f"{(tut or {}).get('runs', 1)} times and the fastest run is shown (the tutorial "
           "chain and each batch alike). Peak RSS: the process of the client "
           "and scheduler plus the workers, sampled every 0.1 s during `process_run` (in "
           "brackets: from the cluster's start, warm-up included), the most of any run. Cores "
           "busy: the CPU time of those processes over the time (the tutorial's: its one "
           "process's).", ""]
    rows = []
    if tut:
        rows.append([f"tutorial callbacks, serial ({tut['points']} points)",
                     f"{tut['seconds']:.1f}", f"{tut['points_per_s']:.3f}", "1",
                     f"{tut['cpu_s'] / tut['seconds']:.2f}", ""])
    for n, b in fig["batch"].items():
        rows.append([f"`process_run`, {n} worker{'' if n == '1' else 's'}", f"{b['seconds']:.1f}",
                     f"{b['points_per_s']:.3f}",
                     f"{b['points_per_s'] / tut['points_per_s']:.2f}" if tut else "",
                     f"{b['cpu_s'] / b['seconds']:.2f}",
                     f"{_gb(b['peak_rss'])} ({_gb(b['peak_rss_with_start'])})"])
    out += _table(["", "seconds", "points/s", "x tutorial", "cores busy", "peak RSS"], rows)
    if "1" in fig["batch"] and str(workers) in fig["batch"]:
        r = fig["batch"][str(workers)]["points_per_s"] / fig["batch"]["1"]["points_per_s"]
        out += ["", f"{workers} workers / 1 worker: **{r:.2f}x**."]
    return out


def _live(fig: dict, workers: int) -> list[str]:
    out = ["The run published through bluesky's 0MQ proxy to `crystalmapping serve` "
           f"({workers} workers) at each rate, frames as StreamResource/StreamDatum references. "
           "Latency: frames known to peaks ready, per point. Lag: the most points queued and the "
           "most seconds behind. Dropped: points published but not in the final maps. Maps are "
           f"compared with those of `process_run` on {workers} workers. The server is started "
           "for each rate; as it always does, it runs one small synthetic point on each worker "
           "(imports, compiled kernels) before it listens, and the publisher waits for it.", ""]
    rows = [[rate, lv["published"], lv["dropped"], lv["failed"], _t(lv["latency_median_s"]),
             _t(lv["latency_p95_s"]), lv["max_queued"], f"{lv['max_lag_s']:.1f} s",
             f"{lv['publish_to_maps_s']:.1f} s", _gb(lv["peak_rss"]),
             {True: "yes", False: "**no**", None: "no batch"}[lv["maps_equal_batch"]]]
            for rate, lv in fig["live"].items()]
    return out + _table(["points/s", "published", "dropped", "failed", "latency median",
                         "latency p95", "largest lag (points)", "largest lag (s)",
                         "publish to final maps", "serve peak RSS", "maps equal batch"], rows)


def _memory(fig: dict, workers: int) -> list[str]:
    size = " x ".join(map(str, fig["options"]["memory_detector"]))
    out = [f"`process_run` on {workers} workers, scans at {size} px: peak RSS of the client "
           "and scheduler's process plus the workers during `process_run` (in brackets: from "
           "the cluster's start).", ""]
    rows = [[f"{b['points']} points", f"{b['seconds']:.1f}", f"{b['points_per_s']:.1f}",
             f"{_gb(b['peak_rss'])} ({_gb(b['peak_rss_with_start'])})"]
            for b in fig["memory"].values()]
    out += _table(["scan", "seconds", "points/s", "peak RSS"], rows)
    if "memory_ratio" in fig:
        out += ["", f"Ratio of the peak RSS: **{fig['memory_ratio']:.2f}x**."]
    return out
