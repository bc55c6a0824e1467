"""A real one-node SLURM for the tests: tests/slurm/start.sh and stop.sh driven from Python.

``TestSlurm(state_dir).start()`` runs start.sh (which installs Debian's slurm-wlm and munge when they are
absent), sets ``SLURM_CONF`` in ``os.environ`` and keeps the PIDs start.sh recorded. ``stop()`` runs stop.sh
(which cancels the jobs and kills exactly those PIDs) and returns what is still running: a recorded
daemon, a slurmstepd or a job's process of this cluster. Nothing here signals a process itself.
Where SLURM cannot be installed (no root, no Debian registry), start.sh exits with :data:`SKIP` and a
one-line reason, and ``start()`` skips the test with that reason; any other failure fails it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "slurm"
SKIP = 77  # start.sh's exit code for "SLURM cannot be installed here"


def _alive(pid: int, name: str) -> bool:
    """``pid`` runs (is no zombie) and is still the program ``name`` (not a reused PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and comm == name


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


class TestSlurm:
    """The daemons of one test cluster, whose config, state and logs live in ``state``."""

    __test__ = False  # not a test class

    def __init__(self, state: Path) -> None:
        self.state = Path(state)
        self.conf = self.state / "slurm.conf"
        self.pids: list[tuple[str, int]] = []
        self._saved_conf: str | None = None
        self.running = False
        self.skip_reason = ""

    def start(self) -> TestSlurm:
        if self.skip_reason:  # tried before in this session: no second apt-get
            pytest.skip(self.skip_reason)
        proc = subprocess.run(["bash", str(HERE / "start.sh"), str(self.state)], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode == SKIP:
            self.skip_reason = proc.stderr.strip().splitlines()[-1]
            pytest.skip(self.skip_reason)
        if proc.returncode != 0:
            pytest.fail(f"tests/slurm/start.sh failed (exit {proc.returncode}):\n{proc.stderr}", pytrace=False)
        assert proc.stdout.strip().splitlines()[-1] == str(self.conf)
        self.pids = [(name, int(pid)) for name, pid in
                     (line.split() for line in (self.state / "pids").read_text().splitlines())]
        self._saved_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        self.running = True
        return self

    def leftovers(self) -> list[str]:
        """Processes of this cluster still running: recorded daemons, and any process whose environment
        names this cluster's slurm.conf and that is a slurmstepd or runs inside one of its jobs."""
        left = [f"{name} ({pid})" for name, pid in self.pids if _alive(pid, name)]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            env = _environ(int(entry.name))
            if env.get("SLURM_CONF") != str(self.conf):
                continue
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:  # gone meanwhile
                continue
            if (comm == "slurmstepd" or "SLURM_JOB_ID" in env) and _alive(int(entry.name), comm):
                left.append(f"{comm} ({entry.name}, job {env.get('SLURM_JOB_ID', '?')})")
        return left

    def stop(self) -> list[str]:
        """Cancel the jobs, stop the daemons start.sh started; return what is left running (should be nothing)."""
        if not self.running:
            return []
        proc = subprocess.run(["bash", str(HERE / "stop.sh"), str(self.state)], capture_output=True, text=True,
                              timeout=300)
        self.running = False
        if self._saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._saved_conf
        deadline = time.monotonic() + 10  # a killed process may take a moment to leave /proc
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.returncode != 0:
            left.append(f"stop.sh exit {proc.returncode}: {proc.stderr.strip()}")
        return left

    # ---- helpers for the tests ----
    def squeue(self, *states: str) -> dict[str, str]:
        """``{job id: state}`` of the jobs in the queue (optionally only those in ``states``, e.g. RUNNING)."""
        out = subprocess.run(["squeue", "-h", "-o", "%A %T"], capture_output=True, text=True, check=True,
                             timeout=30).stdout
        jobs = dict(line.split() for line in out.splitlines() if line.strip())
        return {j: s for j, s in jobs.items() if not states or s in states}

    def log(self, name: str = "slurmctld.log", lines: int = 40) -> str:
        path = self.state / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
