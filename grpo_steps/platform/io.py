"""File I/O that never leaves a half-written output behind (write to a temporary sibling, then rename), file
digests, and the lock that keeps two runs from writing the same outputs. Reading data files:
grpo_steps/data/files.py."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grpo_steps.errors import UserError


class DiskFullError(UserError, OSError):
    """The device ran out of space while an output was written: named as such, and not retried (a retry meets
    the same full disk). The half-written temporary is removed; the previous output is untouched."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    Works for files and directories. On error the temporary is removed and `path` is untouched; an error that
    came from a full device is raised as `DiskFullError`, whatever the writer called it (torch's zip writer
    says "unexpected pos").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except Exception as e:
        full = disk_full(e, path.parent)  # before the temporary is removed: that frees the space again
        shutil.rmtree(tmp.parent, ignore_errors=True)
        if full:
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(f"no space left on the device of {path.parent.resolve()} while "
                                f"writing {path} ({free / 2**20:.0f} MiB free once its temporary was removed); "
                                "free space (fewer checkpoints: grpo.keep_checkpoints), then run again") from e
        raise
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def left_by_a_kill(path: str | Path) -> tuple[list[Path], Path | None]:
    """Undo what a killed `atomic_path` left beside `path`: its temporaries are removed (returned), and a previous
    output caught between the two renames of a folder's replacement is put back (returned second). Call only
    under the lock of whoever writes `path`: a live writer's temporary looks the same."""
    path = Path(path)
    if not path.parent.is_dir():
        return [], None
    temporary = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}$")  # tempfile.mkdtemp's names
    previous = re.compile(rf"^\.{re.escape(path.name)}\.old-\d+$")
    removed, restored = [], None
    for p in sorted(path.parent.iterdir()):
        if previous.match(p.name) and not path.exists():
            p.rename(path)
            restored = path
        elif temporary.match(p.name) or previous.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed, restored


def set_aside(path: str | Path, prefix: str = "corrupt-") -> Path:
    """Move an unusable file or folder out of the names it is read under (`<prefix><name>`, numbered when taken):
    kept for a look, never read again. Returns where it went."""
    path = Path(path)
    aside, n = path.with_name(f"{prefix}{path.name}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{prefix}{path.name}.{n}")
    path.rename(aside)
    return aside


# Below this many free bytes a failed write is taken for a full device, whatever its message.
NEARLY_FULL_BYTES = 1 << 20


def disk_full(error: BaseException, where: Path) -> bool:
    """Whether `error` (or one it came from) is the device running out of space, or the device under `where` is
    (nearly) full now."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(where).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes, read in chunks (checkpoints can be large)."""
    h = hashlib.new(algorithm)
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    return file_digest(path, "sha256")


def fsync_tree(path: str | Path) -> None:
    """Flush every file under `path` (and the directories) to disk, so a rename after it publishes
    complete data even across a power loss, not only a killed process."""
    path = Path(path)
    files = [path] if path.is_file() else [*path.rglob("*"), path]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:  # some filesystems cannot fsync a directory
            if e.errno not in (errno.EINVAL, errno.EBADF):
                raise
        finally:
            os.close(fd)


class OutputLockedError(UserError, RuntimeError):
    """Another process holds the lock on the outputs this one would write: a user error (exit code 2, no retry
    by the flow; a retry 30 s later would meet the same holder), naming the holder."""


_HELD: set[Path] = set()  # the locks this process holds


def held_here(path: str | Path) -> bool:
    """Whether this process holds the lock on `path` (a flow inside `grpo run`, which took it first)."""
    return Path(path).resolve() in _HELD


@contextmanager
def exclusive_lock(path: str | Path, what: str, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive `flock` on `path` (created if needed): fail fast naming the holder's pid, or with
    `wait`, wait for the holder to let go.

    The kernel releases the lock when the holder exits, however it exits (SIGKILL included), so a stale lock
    file never blocks a later run. The file itself is kept: unlinking it would let two processes lock two
    different files of the same name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("utf-8", "replace").strip() or "unknown"
            raise OutputLockedError(
                f"{what} is in use by another run (pid {holder} holds {path.resolve()}); "
                "wait for it to finish, or stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(path.resolve())
        try:
            yield path
        finally:
            _HELD.discard(path.resolve())
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
