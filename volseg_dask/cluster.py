"""Which dask scheduler runs the graphs: local threads, a ``LocalCluster``, or an existing scheduler.

Only the command line uses this module; the API runs on whatever scheduler is active and never
creates a cluster. On GPU nodes start one worker per GPU with one thread and ``--resources GPU=1``
(``dask worker ADDRESS --nworkers 1 --nthreads 1 --resources GPU=1`` with ``CUDA_VISIBLE_DEVICES`` set,
or ``dask-cuda-worker``); prediction then asks for ``GPU=1`` per task.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from .errors import ConfigError, VolsegError

log = logging.getLogger(__name__)

__all__ = ["dask_scheduler"]


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
