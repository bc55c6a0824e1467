"""The life cycle of the Zarr outputs: creation, provenance, completeness, atomic finish, locks.

Every array this package writes carries an attribute ``volseg_dask`` holding its provenance and a
``complete`` flag. The flag turns true only once every block is written; readers
(:func:`volseg_dask.io.open_volume`, merge, evaluate, export) refuse an array whose flag is false.
Outputs written in one go (convert, export) are built under a hidden temporary name and renamed
into place at the end, so a crash leaves nothing at the destination. Outputs built over many tasks
(predict) are written in place and resumed from their done-record instead.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ._version import __version__
from .errors import (
    IncompleteOutputError,
    OutputExistsError,
    OutputLockedError,
    VolsegError,
    WriteFailedError,
)

log = logging.getLogger(__name__)

ATTR = "volseg_dask"
"""Name of the Zarr attribute holding provenance and the ``complete`` flag."""


def now() -> str:
    """The current UTC time, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(**extra: Any) -> dict[str, Any]:
    """Provenance record: package and library versions, host, time, plus ``extra``."""
    import dask

    record: dict[str, Any] = {
        "version": __version__,
        "created": now(),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "libraries": {"dask": dask.__version__, "zarr": zarr.__version__, "numpy": np.__version__},
    }
    record.update(extra)
    return json.loads(json.dumps(record, default=str))


def blosc(codec: Any = "zstd", clevel: int = 5, itemsize: int = 1) -> BloscCodec:
    """A Blosc codec: byte shuffle for multi-byte types (a no-op for one byte)."""
    return BloscCodec(cname=codec, clevel=clevel, shuffle="shuffle" if itemsize > 1 else "noshuffle")


def create_array(
    store: str | Path | zarr.Group,
    *,
    name: str | None = None,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    codec: str = "zstd",
    clevel: int = 5,
    dimension_names: Sequence[str] | None = None,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> zarr.Array:
    """Create a Zarr v3 array marked incomplete, with a Blosc codec and ``attrs`` under ``ATTR``."""
    dtype = np.dtype(dtype)
    meta = {ATTR: {**(attrs or {}), "complete": False}}
    kwargs: dict[str, Any] = dict(
        shape=tuple(int(s) for s in shape),
        dtype=dtype,
        chunks=tuple(int(c) for c in chunks),
        compressors=[blosc(codec, clevel, dtype.itemsize)],
        fill_value=0,
        attributes=meta,
        dimension_names=tuple(dimension_names) if dimension_names else None,
        overwrite=overwrite,
    )
    if isinstance(store, zarr.Group):
        return store.create_array(name=name, **kwargs)  # type: ignore[arg-type]
    return zarr.create_array(store=str(store), name=name, zarr_format=3, **kwargs)


def open_for_writing(output: str | os.PathLike[str], path: str) -> zarr.Array:
    """The array ``path`` of the group ``output``, opened to write whole chunks.

    Chunks are written even when they hold only the fill value: zarr's scan for such chunks costs a
    pass over every chunk, and which blocks are done is recorded apart (done-markers, the ``complete``
    attribute), never read from which chunk files exist.
    """
    return zarr.open_array(store=os.fspath(output), path=path, mode="r+").with_config({"write_empty_chunks": True})


def set_status(node: zarr.Array | zarr.Group, **fields: Any) -> None:
    """Update fields of the ``volseg_dask`` attribute (e.g. ``complete=True``)."""
    record = {**(status(node) or {}), **fields}
    node.attrs[ATTR] = json.loads(json.dumps(record, default=str))


def mark_complete(node: zarr.Array | zarr.Group, **fields: Any) -> None:
    """Flag an array or group as fully written (the last write of any output)."""
    set_status(node, complete=True, finished=now(), **fields)


def status(node: zarr.Array | zarr.Group) -> dict[str, Any] | None:
    """The ``volseg_dask`` attribute of a node, or None for arrays written by other tools."""
    value = node.attrs.get(ATTR)
    return dict(value) if isinstance(value, Mapping) else None


def read_status(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``volseg_dask`` attribute of the Zarr v3 node at ``path``, read from its ``zarr.json`` alone (cheap
    enough before every chunk write); None when it is missing, unreadable or written by another tool."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    record = (meta.get("attributes") or {}).get(ATTR) if isinstance(meta, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else None


def require_complete(node: zarr.Array | zarr.Group, path: str | Path) -> None:
    """Raise IncompleteOutputError when ``node`` was written by us and not finished."""
    st = status(node)
    if st is None or st.get("complete", True):
        return
    done = st.get("blocks_done")
    total = st.get("blocks_total")
    detail = f" ({done} of {total} blocks written)" if done is not None and total else ""
    fix = st.get("resume_hint") or "rerun the command that wrote it with the same settings to finish it"
    raise IncompleteOutputError(f"{path}: this output is incomplete{detail}; {fix}")


def check_output_path(dst: Path, overwrite: bool) -> None:
    """Refuse an existing output (unless ``overwrite``) or an unwritable parent, before any work."""
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise OutputExistsError(
            f"{dst}: already exists; choose another output path or pass --overwrite "
            "(the old output is replaced only after the new one is complete)"
        )
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise WriteFailedError(f"{dst}: the output folder {parent} does not exist; create it first")
    try:  # try for real: permission bits say nothing for root, ACLs or read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".volseg-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WriteFailedError(f"{dst}: the output folder {parent} is not writable ({exc.strerror}); choose a "
                               "writable location") from None


def remove_path(path: Path) -> None:
    """Remove a file or folder if present, never raising."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()


def partial_name(dst: Path) -> Path:
    """Hidden temporary name for an output being built: ``.NAME.partial-HOST-PID-RANDOM``."""
    return dst.with_name(f".{dst.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_partials(dst: Path) -> None:
    """Remove temporary outputs for ``dst`` left by killed processes of this host."""
    host = socket.gethostname()
    for candidate in dst.parent.glob(f".{dst.name}.partial-*"):
        owner_and_pid = candidate.name[len(f".{dst.name}.partial-"):].rpartition("-")[0]  # drop RANDOM
        owner_host, _, pid_text = owner_and_pid.rpartition("-")
        if owner_host == host and pid_text.isdigit() and not _pid_alive(int(pid_text)):
            log.info("removing %s, left by a killed run", candidate)
            remove_path(candidate)


@contextlib.contextmanager
def atomic_output(dst: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build an output under a hidden temporary name; move it to ``dst`` only on success.

    Yields the temporary path. On any exception the temporary output is removed and ``dst`` is
    untouched; an ``OSError`` (disk full, permission) becomes a :class:`WriteFailedError`.
    """
    dst = Path(dst)
    check_output_path(dst, overwrite)
    remove_stale_partials(dst)
    tmp = partial_name(dst)
    try:
        yield tmp
    except VolsegError:
        remove_path(tmp)
        raise
    except OSError as exc:
        remove_path(tmp)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = "free some disk space" if exc.errno == errno.ENOSPC else "check the location and permissions"
        raise WriteFailedError(
            f"{dst}: writing failed ({reason}); the partial output was removed and nothing was left at "
            f"{dst}; {hint} and run again"
        ) from exc
    except BaseException:
        remove_path(tmp)
        raise
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            remove_path(tmp)
            raise OutputExistsError(f"{dst}: appeared while this output was being written; not replaced")
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        remove_path(old)
    else:
        os.replace(tmp, dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive lock beside an output (``.NAME.lock`` in its folder), with stale-lock detection.

    The lock lives beside the output, not in it, so it can be taken before the output exists and
    survives the output being replaced. The file holds the owner's host and pid. A lock left by a
    dead process on this host is taken over (with a warning); a live owner, or one on another host,
    makes :meth:`acquire` raise :class:`OutputLockedError`.
    """

    def __init__(self, output: str | Path) -> None:
        output = Path(output)
        self.output = output
        self.path = output.with_name(f".{output.name}.lock")
        self._held = False

    def acquire(self) -> OutputLock:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": now()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # being written by its owner right now, or empty: look again
                    continue
                if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    log.warning("removing a stale lock %s left by pid %s", self.path, owner.get("pid"))
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise OutputLockedError(
                    f"{self.output}: in use by another run (pid {owner.get('pid')} on "
                    f"{owner.get('host')} since {owner.get('since')}); wait for it to finish, or if it "
                    f"is dead, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self._held = True
            return self
        raise OutputLockedError(f"{self.output}: could not take the lock {self.path}; try again")

    def _owner(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
            return dict(json.loads(text)) if text.strip() else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes (hex), read 1 MB at a time."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def read_stamp(path: str | os.PathLike[str]) -> tuple[Any, ...]:
    """A cheap fingerprint that changes when an input is rewritten (Zarr metadata files or file time)."""
    text = os.fspath(path)
    base = Path(text.split(".zarr:", 1)[0] + ".zarr") if ".zarr:" in text else Path(text)
    stamps: list[Any] = []
    for meta in (base / "zarr.json", base / "0" / "zarr.json", base / ".zarray"):
        with contextlib.suppress(OSError):
            st = meta.stat()
            stamps.append((meta.name, st.st_ino, st.st_mtime_ns))
    if not stamps:
        file = Path(text.split(":", 1)[0]) if not base.exists() else base
        with contextlib.suppress(OSError):
            st = file.stat()
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


@contextlib.contextmanager
def unchanged_while_reading(*paths: str | os.PathLike[str]) -> Iterator[None]:
    """Raise :class:`IncompleteOutputError` if any input was rewritten while the block ran.

    Guards readers (evaluate, export) against a concurrent merge or prediction replacing their
    input: such a read could mix old and new chunks. The check is after the fact, so the caller's
    own output must not be finished before the block exits.
    """
    before = [read_stamp(p) for p in paths]
    yield
    for path, stamp in zip(paths, before):
        if read_stamp(path) != stamp:
            raise IncompleteOutputError(f"{path}: was rewritten while it was being read (another run is writing "
                                        "it); wait for that run to finish and run again")


def require_complete_tree(path: str | os.PathLike[str]) -> None:
    """Refuse a Zarr node when it, or any group above it in the same store, is marked incomplete.

    ``seg.zarr/labels`` of a prediction that was interrupted (or is being redone) is refused even
    if the labels array itself was finished by an earlier run.
    """
    node = Path(path)
    while (node / "zarr.json").exists():
        try:
            meta = json.loads((node / "zarr.json").read_text())
        except (OSError, ValueError):
            return
        record = (meta.get("attributes") or {}).get(ATTR)
        if isinstance(record, Mapping) and record.get("complete") is False:
            done, total = record.get("blocks_done"), record.get("blocks_total")
            detail = f" ({done} of {total} blocks written)" if done is not None and total else ""
            where = "" if node == Path(path) else f" (it belongs to {node}, which is)"
            fix = record.get("resume_hint") or "rerun the command that wrote it with the same settings to finish it"
            raise IncompleteOutputError(f"{path}: this output is incomplete{where}{detail}; {fix}")
        node = node.parent
