"""Predict on a local dask-distributed cluster from Python (the API never starts one itself).

    python examples/local_cluster.py IMAGE.zarr MODEL.pt OUT.zarr [--workers 2]

The same as ``volseg predict IMAGE MODEL -o OUT --workers 2``; use this form when prediction is one
step of a larger Python pipeline that shares the cluster. The dashboard address is printed: open it
to watch the tasks.
"""

from __future__ import annotations

import argparse

from distributed import Client, LocalCluster, progress

import volseg_dask as vs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=256, help="block edge (voxels)")
    args = parser.parse_args(argv)

    settings = vs.load_settings(overrides={"predict.chunks": [args.chunks] * 3})
    # one thread per worker process: torch then uses one core per task (OMP_NUM_THREADS=1 in workers)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1) as cluster, Client(cluster) as client:
        print(f"dashboard: {client.dashboard_link}")
        result = vs.predict(args.image, args.model, args.output, settings)
        print(f"{result.output}: {result.blocks_computed} blocks in {result.seconds:.1f} s")
        # results are lazy dask arrays: per-class voxel counts computed on the cluster
        labels = result.labels
        counts = client.compute([(labels == v).sum() for v in range(3)])
        progress(counts)
        print("voxels per class:", [c.result() for c in counts])


if __name__ == "__main__":
    main()
