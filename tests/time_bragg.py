"""Time the ``bragg`` locator stage by stage on one full-size frame, beside its references.

Run ``python tests/time_bragg.py [--repeat 5]``. One simulated Dexela frame
(3888 x 3072, ~40 Bragg spots, a powder ring, Poisson noise, preprocessed as
the pipeline does) goes through, in one process:

* the compiled locator, stage by stage (band-pass, noise, local maxima,
  candidate measurement, rest) and whole;
* the numpy/scipy reference it replaced (``bragg_reference``), stage by stage;
* ``trackpy.locate(image, diameter=15, percentile=80, separation=100)``;
* ``image.copy()``.

Each timing is the best of ``--repeat`` runs (the reference and trackpy run
fewer times), in CPU seconds of the calling thread, so other processes on
the machine weigh less; the table gives ratios. The tables the two locators
return are compared too.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bragg_reference as reference  # noqa: E402

from crystalmapping import bragg  # noqa: E402
from crystalmapping.config import LocateOptions  # noqa: E402
from crystalmapping.preprocess import preprocess_frames  # noqa: E402
from crystalmapping.sim import simulate_scan  # noqa: E402


def full_frame(shape=(3888, 3072), n_peaks=40, powder=300.0, seed=3) -> np.ndarray:
    """A preprocessed full-size frame: every Bragg spot of a simulated scan lit, a powder ring."""
    scan = simulate_scan(shape=(5, 4), detector_shape=shape, grains=n_peaks // 4,
                         peaks_per_grain=4, powder=powder, peak_height=800.0, seed=seed,
                         min_peak_distance=min(150.0, min(shape) / 8))
    amp = scan.truth["amplitude"]
    row = scan.grid.shape[0] - 1  # a row of the grid where the powder ring shows
    point = int(np.flatnonzero(scan.grid.indices(np.arange(scan.n_points))[0] == row)[0])
    r, c = scan.grid.indices([point])
    amp[:, int(r[0]), int(c[0])] = amp.max(dim=("row", "col"))
    rng = np.random.default_rng([seed, 1])
    background = rng.poisson(scan.expected_background(),
                             size=(scan.frames_per_point,) + tuple(shape)).mean(axis=0)
    return preprocess_frames(scan.frames(point), background)


def best(fn, repeat):
    """``(cpu seconds, wall seconds, result)``: the best of ``repeat`` runs of ``fn()``."""
    cpu = wall = np.inf
    for _ in range(repeat):
        t, w = time.thread_time(), time.perf_counter()
        result = fn()
        cpu, wall = min(cpu, time.thread_time() - t), min(wall, time.perf_counter() - w)
    return cpu, wall, result


def compiled_stages(image, options, repeat):
    """Stage timings of :func:`crystalmapping.bragg.locate_bragg`'s steps."""
    t = {}
    t["band-pass"], _, (filtered, tiles, sample, low, high) = best(
        lambda: bragg._bandpass(image, options.noise_size, options.diameter, True), repeat)
    finite = bool(np.isfinite(low) and np.isfinite(high))
    t["noise"], _, (level, sigma) = best(
        lambda: bragg._noise(*sample, finite=finite, work=bragg._workspace(image.shape)[-1]), repeat)
    floor_noise = max(sigma, 1e-6 * max(abs(low), abs(high)), 1e-300)
    half = options.diameter // 2

    def maxima():
        cand = bragg._filters.local_maxima(filtered, tiles[0], level + 0.5 * options.min_snr * floor_noise,
                                           half)
        cand = cand[np.argsort(-filtered[cand[:, 0], cand[:, 1]], kind="stable")]
        return cand[bragg._filters.apart(cand, half, filtered.shape)]

    t["local maxima"], _, cand = best(maxima, repeat)
    t["measurement"], _, out = best(
        lambda: bragg._measure(filtered, image, cand, options, level, sigma, floor_noise, True,
                               tiles, finite),
        repeat)
    t["rest"], _, _ = best(lambda: bragg._rules(pd.DataFrame(out, columns=list(bragg.COLUMNS)),
                                                options, sigma), repeat)
    return t, len(cand)


def reference_stages(image, options):
    """Stage timings of the reference ``_locate_bragg``, its code split at the same steps."""
    from scipy import ndimage

    t = {}
    image = np.asarray(image, dtype=np.float64)
    t["band-pass"], _, filtered = best(lambda: reference.bandpass(image), 1)
    t["noise"], _, (level, sigma) = best(lambda: reference.image_noise(filtered), 1)
    floor_noise = max(sigma, 1e-6 * float(np.abs(filtered).max()), 1e-300)
    half = options.diameter // 2

    def maxima():
        peak_max = ndimage.maximum_filter(filtered, size=2 * half + 1, mode="constant", cval=-np.inf)
        cand = np.argwhere((filtered == peak_max) & (filtered > level + 5 * floor_noise))
        order = np.argsort(-filtered[cand[:, 0], cand[:, 1]], kind="stable")
        return reference._apart(cand[order], half)

    t["local maxima"], _, cand = best(maxima, 1)
    radius, outer = reference._windows(options.diameter)

    def measure():
        rows = []
        for yc, xc in cand:
            yc, xc = int(yc), int(xc)
            m = reference._measure(filtered, image, yc, xc, radius, outer, floor_noise, full=False)
            for _ in range(options.max_iterations):
                ny, nx = int(round(m[0])), int(round(m[1]))
                if (ny, nx) == (yc, xc) or not (0 <= ny < image.shape[0] and 0 <= nx < image.shape[1]):
                    break
                yc, xc = ny, nx
                m = reference._measure(filtered, image, yc, xc, radius, outer, floor_noise, full=False)
            rows.append(m if m[8] < options.min_snr else
                        reference._measure(filtered, image, yc, xc, radius, outer, floor_noise))
        return rows

    t["measurement"], _, rows = best(measure, 1)
    t["rest"], _, _ = best(lambda: bragg._rules(pd.DataFrame(rows, columns=list(bragg.COLUMNS)),
                                                options, sigma), 1)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import trackpy

    trackpy.quiet()
    t = time.perf_counter()
    image = full_frame()
    print(f"frame {image.shape} {image.dtype} simulated in {time.perf_counter() - t:.1f} s")
    options = LocateOptions()
    bragg.locate_bragg(image[:256, :256].copy(), options)  # compile (or load the cache)
    trackpy.locate(image[:256, :256].copy(), diameter=15, percentile=80, separation=100)

    new, n_cand = compiled_stages(image, options, args.repeat)
    new_total, new_wall, (table, counts) = best(lambda: bragg.locate_bragg(image, options),
                                                args.repeat)
    copy_cpu, copy_wall, _ = best(image.copy, args.repeat)
    tp_cpu, tp_wall, tp = best(lambda: trackpy.locate(image, diameter=15, percentile=80,
                                                      separation=100), max(1, args.repeat // 2))
    print(f"{n_cand} candidates; {len(table)} peaks; {counts}")
    ref = None
    if not args.no_reference:
        ref = reference_stages(image, options)
        ref_table, ref_counts = reference._locate_bragg(image, options)
        same = (all(counts[k] == v for k, v in ref_counts.items()) and len(ref_table) == len(table)
                and np.allclose(ref_table[["y", "x", "amplitude", "snr"]],
                                table[["y", "x", "amplitude", "snr"]], rtol=1e-9, atol=1e-9))
        print(f"same table and counts as the reference: {same}")
    print()
    head = f"{'stage':<14}{'compiled ms':>12}{'% of total':>11}"
    if ref:
        head += f"{'reference ms':>14}{'speed-up':>10}"
    print(head)
    for stage, sec in new.items():
        line = f"{stage:<14}{sec * 1e3:12.1f}{100 * sec / sum(new.values()):10.0f}%"
        if ref:
            line += f"{ref[stage] * 1e3:14.0f}{ref[stage] / sec:9.0f}x"
        print(line)
    line = f"{'sum of stages':<14}{sum(new.values()) * 1e3:12.1f}{'':>11}"
    if ref:
        line += f"{sum(ref.values()) * 1e3:14.0f}{sum(ref.values()) / sum(new.values()):9.0f}x"
    print(line)
    print(f"{'whole call':<14}{new_total * 1e3:12.1f}   (wall {new_wall * 1e3:.1f} ms)")
    print()
    print(f"trackpy.locate(diameter=15, percentile=80, separation=100): {tp_cpu * 1e3:.0f} ms "
          f"(wall {tp_wall * 1e3:.0f} ms, {len(tp)} peaks): the compiled locator is "
          f"{tp_cpu / new_total:.1f}x faster")
    print(f"image.copy(): {copy_cpu * 1e3:.1f} ms (wall {copy_wall * 1e3:.1f} ms): the compiled "
          f"locator takes {new_total / copy_cpu:.1f}x as long")


if __name__ == "__main__":
    main()
