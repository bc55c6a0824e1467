"""Run dask graphs on whatever scheduler is active, with the progress display that fits it.

The library never creates a cluster: with a ``distributed.Client`` active (``with Client(...)`` or
the CLI's ``--workers``/``--scheduler``) graphs run there and ``distributed.progress`` shows the
bar; otherwise the local scheduler runs them under dask's ``ProgressBar``.
"""

from __future__ import annotations

import sys
from typing import Any

import dask
from dask.diagnostics import ProgressBar


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
        with ProgressBar(out=sys.stderr, dt=0.5, minimum=1.0):
            return dask.compute(*collections, **kwargs)
    return dask.compute(*collections, **kwargs)
