"""Helpers for the tests that break a cluster while a prediction runs (test_slurm.py, test_worker_loss.py).

"Mid-run" is read off the output itself: each finished block task leaves a done-marker in
``OUT.zarr/.volseg/done/<array>/<block index>`` (see ``volseg_dask.prediction``) until the run completes,
so a thread polls them and strikes when some, but not all, blocks are done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .conftest import read_array

PREDICTION_ARRAYS = ("labels", "confidence", "probabilities/z", "probabilities/y", "probabilities/x")


def done_markers(output: Path) -> int:
    """Blocks marked done so far in a prediction output (0 before the first one and after completion)."""
    return sum(1 for p in (Path(output) / ".volseg" / "done").rglob("*") if p.is_file())


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.02,
             cancel: threading.Event | None = None) -> Any:
    """Poll ``predicate`` until it returns something true; that value, or TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout:.0f} s still waiting for {what}")
        if cancel is not None and cancel.is_set():
            raise TimeoutError(f"cancelled while waiting for {what}")
        time.sleep(interval)


class Background(threading.Thread):
    """Run ``fn(cancel_event)`` in a daemon thread; ``outcome()`` joins it and re-raises its exception."""

    def __init__(self, fn: Callable[[threading.Event], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.cancel = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(self.cancel)
        except BaseException as exc:  # handed to the test thread by outcome()
            self.error = exc

    def outcome(self, timeout: float = 120) -> Any:
        self.join(timeout)
        if self.is_alive():
            self.cancel.set()
            self.join(10)
            raise AssertionError(f"the background action did not finish within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self.result


def assert_same(output: Path, reference: Path, names: Sequence[str] = PREDICTION_ARRAYS) -> None:
    """Every array of ``names`` is bit for bit the same in both prediction outputs."""
    for name in names:
        np.testing.assert_array_equal(read_array(Path(output) / name), read_array(Path(reference) / name),
                                      err_msg=name)
