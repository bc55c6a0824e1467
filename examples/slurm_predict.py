"""Predict a large volume on a SLURM cluster of GPU nodes with dask-jobqueue.

    pip install "volseg_dask[hpc]"          # adds dask-jobqueue
    python examples/slurm_predict.py /data/big.zarr model.pt /scratch/seg.zarr --jobs 8

Each SLURM job is one dask worker process with one thread and one GPU (``--gres=gpu:1``); the
worker declares ``--resources GPU=1`` and volseg_dask then asks for ``GPU=1`` per inference task,
so no GPU ever runs two tasks at once. ``--lifetime`` with ``--lifetime-stagger`` retires workers
before the walltime kills them; ``adapt`` starts replacements. A job killed anyway loses only the
block it was on: every finished block is on disk, and rerunning this script (or
``volseg predict ... --scheduler ADDRESS``) with the same arguments computes only the rest.

Adapt the queue, account, memory and walltime to your site. All workers need the input and the
output on a shared filesystem (GPFS, Lustre, NFS).
"""

from __future__ import annotations

import argparse

import volseg_dask as vs


def make_cluster(jobs: int, queue: str, account: str | None, walltime: str, memory: str) -> object:
    """A SLURMCluster of single-GPU workers (imports dask-jobqueue only when called)."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue=queue,
        account=account,
        cores=8,  # CPU cores per job: data loading and decoding; inference runs on the GPU
        processes=1,  # one dask worker per job ...
        memory=memory,
        walltime=walltime,
        job_extra_directives=["--gres=gpu:1"],  # ... with one GPU
        worker_extra_args=[
            "--nthreads", "1",  # one task at a time per GPU
            "--resources", "GPU=1",
            "--lifetime", "55m", "--lifetime-stagger", "4m",  # leave before a 1 h walltime ends
        ],
        job_script_prologue=["export OMP_NUM_THREADS=4"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--jobs", type=int, default=4, help="maximum number of GPU jobs")
    parser.add_argument("--queue", default="gpu")
    parser.add_argument("--account", default=None)
    parser.add_argument("--walltime", default="01:00:00")
    parser.add_argument("--memory", default="32GB")
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from distributed import Client

    cluster = make_cluster(args.jobs, args.queue, args.account, args.walltime, args.memory)
    cluster.adapt(minimum=1, maximum=args.jobs)  # type: ignore[attr-defined]
    settings = vs.load_settings(overrides={
        "predict.chunks": [args.chunks] * 3, "predict.batch_size": args.batch_size, "predict.device": "cuda",
    })
    with Client(cluster) as client:
        print(f"dashboard: {client.dashboard_link}")
        result = vs.predict(args.image, args.model, args.output, settings, progress=True)
    print(f"{result.output}: {result.blocks_computed} blocks computed, {result.blocks_skipped} were done before")


if __name__ == "__main__":
    main()
