"""Predict a large volume on a SLURM cluster of GPU nodes with dask-jobqueue.

    pip install "volseg_dask[hpc]"          # adds dask-jobqueue
    python examples/slurm_predict.py /data/big.zarr model.pt /scratch/seg.zarr --jobs 8

Each SLURM job is one dask worker process with one GPU (``--gres=gpu:1``) and four threads: they read,
decode, encode and write blocks while the worker's one device thread keeps the GPU busy (why four:
``benchmarks/README.md``, ``bench_pipeline.py``). The worker declares ``--resources GPU=1``; each
task asks for a share of it, so the GPU's blocks go through one queue and it never computes two at once.
``--lifetime`` with ``--lifetime-stagger`` retires workers
before the walltime kills them; ``adapt`` starts replacements (and replaces a job that was cancelled
or died). A job killed anyway loses only the block it was on: every finished block is on disk, and
rerunning this script (or ``volseg predict ... --scheduler ADDRESS``) with the same arguments
computes only the rest.

Adapt the queue, account, memory and walltime to your site. All workers need the input and the
output on a shared filesystem (GPFS, Lustre, NFS), and the same Python environment: ``--python``
names the interpreter the jobs start (default: this one), ``--prologue`` adds shell lines that run
before it (``module load ...``, ``source venv/bin/activate``, ``export PYTHONPATH=...``).

The same script on CPU-only nodes (no GPU, two cores per job)::

    python examples/slurm_predict.py big.zarr model.pt seg.zarr --queue cpu --gres "" --device cpu \\
        --cores 2 --threads 1 --memory 8GB
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import volseg_dask as vs

DEFAULT_PROLOGUE = ("export OMP_NUM_THREADS=4",)
# imported by each worker before it joins: the first block then does not wait for torch and smp (seconds),
# and --lifetime does not count the imports
DEFAULT_PRELOAD = ("segmentation_models_pytorch",)


def make_cluster(queue: str = "gpu", account: str | None = None, walltime: str = "01:00:00", memory: str = "32GB",
                 *, cores: int = 8, gres: str = "gpu:1", threads: int | None = None, lifetime: str | None = "55m",
                 lifetime_stagger: str = "4m", python: str | None = None,
                 prologue: Sequence[str] = DEFAULT_PROLOGUE, preload: Sequence[str] = DEFAULT_PRELOAD,
                 log_directory: str | None = None) -> object:
    """A SLURMCluster of single-GPU workers (imports dask-jobqueue only when called).

    ``gres=""`` asks for no generic resource (CPU-only nodes); the worker then declares no GPU either.
    ``threads=None``: :data:`volseg_dask.cluster.GPU_WORKER_THREADS` with a GPU, else one per core.
    ``lifetime=None`` keeps workers until their walltime.
    """
    from dask_jobqueue import SLURMCluster

    from volseg_dask.cluster import GPU_WORKER_THREADS

    gpu = "gpu" in gres
    if threads is None:
        threads = GPU_WORKER_THREADS if gpu else cores
    worker_args = ["--nthreads", str(threads)]
    for module in preload:
        worker_args += ["--preload", module]
    if gpu:
        worker_args += ["--resources", "GPU=1"]
    if lifetime:
        # leave gracefully (handing on its results) before the walltime ends; adapt() starts a replacement
        worker_args += ["--lifetime", lifetime, "--lifetime-stagger", lifetime_stagger]
    return SLURMCluster(
        queue=queue,
        account=account,
        cores=cores,  # CPU cores per job: data loading and decoding; inference runs on the GPU
        processes=1,  # one dask worker per job ...
        memory=memory,
        walltime=walltime,
        job_extra_directives=[f"--gres={gres}"] if gres else [],  # ... with one GPU
        worker_extra_args=worker_args,
        job_script_prologue=list(prologue),
        python=python,  # None: the interpreter running this script
        log_directory=log_directory,  # None: slurm-<jobid>.out in the submission folder
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("model")
    parser.add_argument("output")
    jobs = parser.add_argument_group("SLURM jobs (one dask worker each)")
    jobs.add_argument("--jobs", type=int, default=4, help="maximum number of jobs")
    jobs.add_argument("--min-jobs", type=int, default=1, help="jobs kept running; prediction starts when they are up")
    jobs.add_argument("--queue", default="gpu", help="partition (sbatch -p)")
    jobs.add_argument("--account", default=None, help="account to charge (sbatch -A)")
    jobs.add_argument("--walltime", default="01:00:00")
    jobs.add_argument("--memory", default="32GB", help="memory per job")
    jobs.add_argument("--cores", type=int, default=8, help="CPU cores per job")
    jobs.add_argument("--gres", default="gpu:1", help="generic resources per job; \"\" for CPU-only nodes")
    jobs.add_argument("--threads", type=int, default=None,
                      help="dask threads per worker (default: 4 with a GPU, around its device thread; else --cores)")
    jobs.add_argument("--lifetime", default="55m", help="retire a worker after this long; \"\" never")
    jobs.add_argument("--lifetime-stagger", default="4m", help="spread the retirements by up to this much")
    jobs.add_argument("--python", default=None, help="Python the jobs run (default: this interpreter)")
    jobs.add_argument("--prologue", action="append", default=None, metavar="LINE",
                      help=f"shell line run in each job before the worker (repeatable; default: {DEFAULT_PROLOGUE[0]})")
    jobs.add_argument("--preload", action="append", default=None, metavar="MODULE",
                      help=f"module each worker imports before it joins (repeatable; default: {DEFAULT_PRELOAD[0]})")
    jobs.add_argument("--log-directory", default=None, help="folder for the jobs' stdout/stderr")
    pred = parser.add_argument_group("prediction")
    pred.add_argument("--settings", default=None, help="settings YAML (the options below override it)")
    pred.add_argument("--device", default="cuda", help="cuda, cpu, ...")
    pred.add_argument("--chunks", type=int, default=256, help="block edge (voxels)")
    pred.add_argument("--halo", type=int, default=None, help="in-plane context per block (default: settings)")
    pred.add_argument("--batch-size", default="auto", help="planes per forward pass; auto: from the GPU's free memory")
    return parser.parse_args(argv)


def cluster_options(args: argparse.Namespace) -> dict:
    """make_cluster's keyword arguments from the command line."""
    return dict(
        queue=args.queue, account=args.account, walltime=args.walltime, memory=args.memory, cores=args.cores,
        gres=args.gres, threads=args.threads, lifetime=args.lifetime or None, lifetime_stagger=args.lifetime_stagger,
        python=args.python, prologue=DEFAULT_PROLOGUE if args.prologue is None else args.prologue,
        preload=DEFAULT_PRELOAD if args.preload is None else [m for m in args.preload if m],
        log_directory=args.log_directory,
    )


def main(argv: list[str] | None = None) -> vs.prediction.PredictResult:
    args = parse_args(argv)
    from distributed import Client

    cluster = make_cluster(**cluster_options(args))
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    settings = vs.load_settings(args.settings, overrides={
        "predict.chunks": [args.chunks] * 3, "predict.halo": args.halo, "predict.batch_size": batch,
        "predict.device": args.device,
    })
    with cluster, Client(cluster) as client:  # leaving the block cancels the jobs
        cluster.adapt(minimum=args.min_jobs, maximum=args.jobs)  # type: ignore[attr-defined]
        print(f"dashboard: {client.dashboard_link}", flush=True)
        client.wait_for_workers(args.min_jobs)  # SLURM may keep the jobs pending for a while
        result = vs.predict(args.image, args.model, args.output, settings, progress=sys.stderr.isatty())
    print(f"{result.output}: {result.blocks_computed} blocks computed, {result.blocks_skipped} were done before")
    return result


if __name__ == "__main__":
    main()
