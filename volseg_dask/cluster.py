"""Which dask scheduler runs the graphs: local threads, a ``LocalCluster``, or an existing scheduler.

:func:`compute` runs a graph on whatever scheduler is active, with the progress display that fits
it: with a ``distributed.Client`` active (``with Client(...)`` or the CLI's ``--workers`` /
``--scheduler``) graphs run there and ``distributed.progress`` shows the bar; otherwise the local
scheduler runs them under dask's ``ProgressBar``. The library never creates a cluster; only the
command line does, through :func:`dask_scheduler`. On GPU nodes start one worker per GPU with
``--resources GPU=1`` and :data:`GPU_WORKER_THREADS` threads (``dask worker ADDRESS --nworkers 1
--nthreads 4 --resources GPU=1`` with ``CUDA_VISIBLE_DEVICES`` set, or ``dask-cuda-worker``); each
prediction task then asks for the worker's ``GPU`` divided by its threads (see
``prediction.run``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import dask
from dask.callbacks import Callback

from .errors import ConfigError, VolsegError

log = logging.getLogger(__name__)

__all__ = ["GPU_WORKER_THREADS", "WORKER_CONFIG", "active_client", "compute", "dask_scheduler"]

GPU_WORKER_THREADS = 4
"""Threads of a GPU worker that ``--workers N --device cuda`` starts: they read and write blocks around the
worker's one device thread (``benchmarks/bench_pipeline.py`` measures the choice)."""


def active_client() -> Any | None:
    """The ``distributed.Client`` that dask would use now, or None for a local scheduler."""
    if "distributed" not in sys.modules:  # no client can exist without distributed imported
        return None
    from distributed import Client

    scheduler = dask.base.get_scheduler()
    owner = getattr(scheduler, "__self__", None)
    return owner if isinstance(owner, Client) else None


WORKER_CONFIG: dict[str, Any] = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
"""dask config for the workers of the clusters ``--workers N`` starts: without distributed's default
``MALLOC_TRIM_THRESHOLD_=65536`` (which also fixes glibc's mmap threshold, so every buffer of a block is a
fresh zero-filled mmap) a worker's host side did the same blocks in 0.70-0.75× the time,
at 0.82× the local scheduler's rate instead of 0.66×
(``benchmarks/results/bench_pipeline_cluster.json``); the block tasks hand free memory back
with ``malloc_trim`` themselves (:mod:`volseg_dask.memory`). For workers started by hand or by dask-jobqueue,
set it in their dask config (README, "Clusters and HPC")."""


def compute(*collections: Any, progress: bool | str = False, label: str = "tasks", **kwargs: Any) -> tuple[Any, ...]:
    """``dask.compute`` on the active scheduler, showing progress.

    ``progress``: ``True`` draws a bar (for a terminal); ``"lines"`` prints one line per ~5 % of the tasks
    with the time so far and an ETA, prefixed by ``label`` (for batch jobs, whose stderr is a file);
    ``False`` shows nothing.
    """
    client = active_client()
    if client is not None:
        futures = client.compute(list(collections), **kwargs)
        if progress == "lines":
            from distributed import as_completed

            lines = _ProgressLines(label, len(futures))
            for _ in as_completed(futures):
                lines.done(1)
        elif progress:
            from distributed import progress as dist_progress

            dist_progress(futures)
            print(file=sys.stderr)
        return tuple(client.gather(futures))
    if progress == "lines":
        with _LineCallback(label):
            return dask.compute(*collections, **kwargs)
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr, dt=0.5, minimum=1.0):
            return dask.compute(*collections, **kwargs)
    return dask.compute(*collections, **kwargs)


class _ProgressLines:
    """Prints ``LABEL: 45 % (9/20, 31 s, ETA 38 s)`` each time another ~5 % of ``total`` is done."""

    STEP = 5

    def __init__(self, label: str, total: int, stream: Any = None) -> None:
        self.label, self.total, self.count = label, max(0, int(total)), 0
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.next = self.STEP

    def done(self, n: int) -> None:
        self.count += n
        if not self.total:
            return
        percent = 100 * self.count // self.total
        if percent < self.next and self.count < self.total:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed * (self.total - self.count) / self.count if self.count else float("nan")
        print(f"{self.label}: {percent} % ({self.count}/{self.total}, {elapsed:.0f} s, ETA {eta:.0f} s)",
              file=self.stream, flush=True)
        self.next = (percent // self.STEP + 1) * self.STEP


class _LineCallback(Callback):
    """dask's local-scheduler callback that feeds :class:`_ProgressLines` as tasks finish."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.lines: _ProgressLines | None = None

    def _start_state(self, dsk: Any, state: Any) -> None:
        self.lines = _ProgressLines(self.label, len(state["ready"]) + len(state["waiting"]))

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if self.lines is not None:
            self.lines.done(1)


@contextlib.contextmanager
def dask_scheduler(workers: int | None = None, address: str | None = None, *, threads_per_worker: int = 1,
                   memory_limit: str = "auto", gpus: bool = False,
                   echo: Callable[[str], Any] = log.info) -> Iterator[Any]:
    """Run the enclosed API calls on the chosen scheduler; yields the client (None for threads).

    Parameters
    ----------
    workers
        Start a ``distributed.LocalCluster`` of this many worker processes.
    address
        Connect to a running scheduler (``tcp://host:8786``), e.g. one started by dask-jobqueue.
    threads_per_worker
        Threads per worker process of a LocalCluster.
    memory_limit
        Memory limit per LocalCluster worker (dask's syntax, e.g. ``"4GB"``).
    gpus
        Each LocalCluster worker declares ``GPU=1`` and runs on its own GPU (worker ``k`` on GPU ``k`` of
        those visible, see :func:`volseg_dask.device.select_device`).
    echo
        Where the dashboard address is reported.
    """
    if workers and address:
        raise ConfigError("give either --workers (a local cluster) or --scheduler (an existing one), not both")
    if not workers and not address:
        yield None
        return
    from distributed import Client, LocalCluster

    if address:
        try:
            client = Client(address, timeout="30s")
        except OSError as exc:
            raise VolsegError(f"--scheduler {address}: cannot connect ({exc}); is the scheduler running and "
                              "reachable from this node?") from exc
        with client:
            echo(f"connected to {address}; dashboard: {client.dashboard_link}")
            yield client
        return
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: {workers} must be at least 1")
    extra: dict[str, Any] = {"resources": {"GPU": 1}} if gpus else {}
    with dask.config.set(WORKER_CONFIG), LocalCluster(
            n_workers=workers, threads_per_worker=threads_per_worker, processes=True, memory_limit=memory_limit,
            dashboard_address=":0", **extra) as cluster, Client(cluster) as client:
        echo(f"started a local cluster of {workers} worker process(es) x {threads_per_worker} thread(s)"
             f"{', one GPU each' if gpus else ''}; dashboard: {client.dashboard_link}")
        yield client
