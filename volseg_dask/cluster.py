"""Which dask scheduler runs the graphs: local threads, a ``LocalCluster``, or an existing scheduler.

:func:`compute` runs a graph on whatever scheduler is active, with the progress display that fits
it: with a ``distributed.Client`` active (``with Client(...)`` or the CLI's ``--workers`` /
``--scheduler``) graphs run there and ``distributed.progress`` shows the bar; otherwise the local
scheduler runs them under dask's ``ProgressBar``. The library never creates a cluster; only the
command line does, through :func:`dask_scheduler`. On GPU nodes start one worker per GPU and
``--resources GPU=1`` (``dask worker ADDRESS --nworkers 1 --resources GPU=1`` with
``CUDA_VISIBLE_DEVICES`` set, or ``dask-cuda-worker``); prediction then asks for ``GPU=1`` per task.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import dask

from .errors import ConfigError, VolsegError

log = logging.getLogger(__name__)

__all__ = ["active_client", "compute", "dask_scheduler"]


def active_client() -> Any | None:
    """The ``distributed.Client`` that dask would use now, or None for a local scheduler."""
    if "distributed" not in sys.modules:  # no client can exist without distributed imported
        return None
    from distributed import Client

    scheduler = dask.base.get_scheduler()
    owner = getattr(scheduler, "__self__", None)
    return owner if isinstance(owner, Client) else None


def compute(*collections: Any, progress: bool = False, **kwargs: Any) -> tuple[Any, ...]:
    """``dask.compute`` on the active scheduler, with a progress bar when ``progress`` is true."""
    client = active_client()
    if client is not None:
        futures = client.compute(list(collections), **kwargs)
        if progress:
            from distributed import progress as dist_progress

            dist_progress(futures)
            print(file=sys.stderr)
        return tuple(client.gather(futures))
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr, dt=0.5, minimum=1.0):
            return dask.compute(*collections, **kwargs)
    return dask.compute(*collections, **kwargs)


@contextlib.contextmanager
def dask_scheduler(workers: int | None = None, address: str | None = None, *, threads_per_worker: int = 1,
                   memory_limit: str = "auto", echo: Callable[[str], Any] = log.info) -> Iterator[Any]:
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
    with LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                      memory_limit=memory_limit, dashboard_address=":0") as cluster, Client(cluster) as client:
        echo(f"started a local cluster of {workers} worker process(es); dashboard: {client.dashboard_link}")
        yield client
