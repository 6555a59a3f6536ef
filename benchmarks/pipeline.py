"""Benchmark: the batch pipeline on Dask against the same kernels in a serial loop.

Simulates a grid scan (external HDF5 frames) into a temporary embedded catalog,
then maps it twice in one run:

* ``pipeline``: :func:`crystalmapping.process_run` on a LocalCluster of worker
  processes (cluster start-up timed separately);
* ``serial``: the baseline, one process reading each point through the same
  catalog and calling the same kernels (preprocess_frames, locate_peaks) in a
  loop, then the same reduce.

Both must give identical maps; the ratio of their times is what to compare
across machines.

    python benchmarks/pipeline.py [--points 500] [--detector 512 512] [--frames 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=500)
    parser.add_argument("--detector", type=int, nargs=2, default=[512, 512])
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import dask
    import xarray as xr
    from crystalmapping.execution import local_cluster

    import crystalmapping as cm
    from crystalmapping.demo import shape_for_points
    from crystalmapping.locate import locate_block
    from crystalmapping.maps import gather_tables, reduce_scan
    from crystalmapping.preprocess import preprocess_frames

    locate = dict(diameter=15, percentile=80, separation=100)
    link = dict(search_range=50)
    shape = shape_for_points(args.points)
    figures = {"points": shape[0] * shape[1], "shape": shape, "detector": args.detector,
               "frames": args.frames}
    with tempfile.TemporaryDirectory() as tmp:
        catalog = cm.Catalog(tmp)
        t = time.perf_counter()
        scan = cm.simulate_scan(shape=shape, detector_shape=tuple(args.detector),
                                frames_per_point=args.frames, seed=1)
        uid = catalog.ingest(scan.documents(external=True, directory=catalog.detector_dir))
        figures["ingest_s"] = time.perf_counter() - t
        run = catalog[uid]
        bg = int(scan.truth.attrs["background_point"])

        # -- pipeline on a LocalCluster ------------------------------------------------
        t = time.perf_counter()
        with local_cluster(args.workers, dashboard_address=None) as client:
            figures["workers"] = len(client.scheduler_info()["workers"])
            figures["cluster_start_s"] = time.perf_counter() - t
            t = time.perf_counter()
            maps = cm.process_run(run, subtrahend=bg, locate=locate, link=link, client=client,
                                  progress=False)
            figures["pipeline_s"] = time.perf_counter() - t

        # -- serial baseline: same catalog, same kernels, one process --------------------
        t = time.perf_counter()
        frames = run.to_dataset("dexela_image")["dexela_image"]
        with dask.config.set(scheduler="synchronous"):
            sub = frames[bg].values.mean(axis=0)
            results = []
            for i in range(frames.shape[0]):
                image = preprocess_frames(frames[i].values, sub, warn_empty=False)
                results.append(locate_block(image[np.newaxis], i, locate))
        peaks, points = gather_tables(results)
        serial = reduce_scan(peaks, points, run.grid, cm.ProcessConfig(locate=locate, link=link))
        figures["serial_s"] = time.perf_counter() - t

    xr.testing.assert_allclose(maps["intensity"], serial["intensity"])
    n = figures["points"]
    figures["pipeline_points_per_s"] = n / figures["pipeline_s"]
    figures["serial_points_per_s"] = n / figures["serial_s"]
    figures["speedup_pipeline_over_serial"] = figures["serial_s"] / figures["pipeline_s"]
    figures["maps"] = int(maps.sizes["grain"])
    print(f"{n} points ({shape[0]} x {shape[1]}), {args.detector[0]} x {args.detector[1]} px, "
          f"{args.frames} frames/point")
    print(f"  ingest (simulate + write to catalog) {figures['ingest_s']:7.1f} s")
    print(f"  pipeline, {figures['workers']} workers           {figures['pipeline_s']:7.1f} s  "
          f"{figures['pipeline_points_per_s']:6.1f} points/s  (+{figures['cluster_start_s']:.1f} s cluster start)")
    print(f"  serial baseline                    {figures['serial_s']:7.1f} s  "
          f"{figures['serial_points_per_s']:6.1f} points/s")
    print(f"  ratio serial / pipeline            {figures['speedup_pipeline_over_serial']:7.2f}")
    print(f"  identical maps: yes ({figures['maps']} maps)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
