"""Helpers shared by the benchmark scripts: machine description, peak memory, results files.

Peak memory is measured by running the measured step in a child process and polling the resident
set size of that process and all its children (``psutil``) every 20 ms, plus the kernel's own
high-water mark (``ru_maxrss`` of the children) as a cross-check.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """Cores, RAM, CPU model, Python, torch threads and GPU presence of this machine."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus machine and command line to ``results/<name>.json``; return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"results written to {path}")
    return path


def run_measured(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 interval: float = 0.02, timeout: float | None = None) -> dict[str, Any]:
    """Run ``cmd`` as a child process; return wall time, peak RSS of its process tree, exit code, output."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        try:
            parent = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                total = parent.memory_info().rss
                for child in parent.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        total += child.memory_info().rss
                peak = max(peak, total)
            except psutil.NoSuchProcess:
                return
            time.sleep(interval)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        stop.set()
        thread.join()
    wall = time.perf_counter() - start
    kernel_peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "wall_s": wall,
        "peak_rss_mb": peak / 2**20,
        "children_max_rss_mb_so_far": kernel_peak_kb / 1024,
        "returncode": proc.returncode,
        "output": output,
    }


def run_child(module: str, args: Sequence[str], *, timeout: float = 3600) -> dict[str, Any]:
    """Run ``python -m benchmarks.MODULE ARGS`` measured (``run_measured``); merge its last JSON line.

    The child prints one JSON object as its last ``{``-line; the result is that object plus the
    parent's ``peak_rss_mb`` (whole process tree) and ``wall_s``. A failed child stops the benchmark.
    """
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *args]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    res = run_measured(cmd, env=env, cwd=REPO, timeout=timeout)
    if res["returncode"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res['returncode']}):\n{res['output']}")
    last = [line for line in res["output"].splitlines() if line.startswith("{")][-1]
    return {"peak_rss_mb": res["peak_rss_mb"], "wall_s": res["wall_s"], **json.loads(last)}


def default_workdir() -> Path:
    """Where benchmarks put their (large) scratch data: /work when writable, else the temp folder."""
    for base in (Path("/work"), Path(tempfile.gettempdir())):
        if base.is_dir() and os.access(base, os.W_OK):
            return base
    return Path.cwd()


def disk_bytes(path: Path) -> int:
    """Bytes of all files below ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def vm_hwm_mb() -> float:
    """This process's resident-set high-water mark (``VmHWM``), MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with the given columns."""
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
