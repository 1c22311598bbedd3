"""Atomic file and folder writes: a crash or full disk never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should read like any file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def write_errors(folder: str | Path) -> Iterator[None]:
    """Writers that do not raise OSError when the disk fills up raise one here, naming `folder`.

    torch's zip writer says only `RuntimeError: ... unexpected pos N vs M`, safetensors
    `SafetensorError: ... I/O error: ... (os error 28)`; the CLI's error boundary turns an OSError
    into one line with the fix, so a full disk reads the same whichever library was writing.
    """
    from safetensors import SafetensorError

    try:
        yield
    except (RuntimeError, SafetensorError) as err:
        text = str(err)
        torch_writer = any(s in text for s in ("unexpected pos", "PytorchStreamWriter", "file write failed"))
        if not (torch_writer if isinstance(err, RuntimeError) else "I/O error" in text):
            raise
        code = re.search(r"os error (\d+)", text)
        if code or _nearly_full(folder):
            number = int(code.group(1)) if code else errno.ENOSPC
            raise OSError(number, f"{os.strerror(number)} (while writing)", str(folder)) from err
        raise OSError(
            errno.EIO,
            "a write did not complete (a full disk or a file size limit?): free space or point "
            "--output_dir elsewhere (complete checkpoints are kept)",
            str(folder),
        ) from err


def _nearly_full(path: str | Path) -> bool:
    existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("."))
    with contextlib.suppress(OSError):
        return shutil.disk_usage(existing).free < 64 * 2**20
    return False


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the `.NAME.*.tmp` files that `atomic_write_bytes` / `atomic_file` leave when their
    process is killed mid-write (each can be as large as the file it was becoming). Call it only
    while no other process writes into `folder`."""
    folder = Path(folder)
    removed = [p for p in folder.glob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    for p in removed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return removed


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it is renamed over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` (an older `path` is removed last).

    Readers either see the old complete folder or the new complete one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a shared run folder or cache must follow the umask
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def describe_os_error(err: OSError) -> str:
    """The one description of a file-system failure (the CLI prints it): the file and what to do.
    Writers that fail some other way on a full disk are turned into an OSError by `write_errors`."""
    what = f"{err.strerror or err}: {err.filename}" if err.filename else str(err)
    hints = {
        errno.ENOSPC: "the disk is full: free space or point --output_dir/--data_dir elsewhere, then rerun "
        "(finished datagen chunks and complete checkpoints are kept)",
        errno.EACCES: "no permission: choose an --output_dir you can write to",
        errno.EROFS: "read-only file system: choose an --output_dir you can write to",
        errno.ENOTDIR: "a path that must be a folder is a file: choose another --output_dir",
        errno.EEXIST: "a path that must be a folder is a file: choose another --output_dir",
    }
    hint = hints.get(err.errno)
    return f"{what}; {hint}" if hint else what
