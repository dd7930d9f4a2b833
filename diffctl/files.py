"""Writing files so that they appear complete or not at all: the one place diffctl does it.

The bytes go to a hidden temporary file in the same directory (`.<name>.<pid>.tmp`: never *.ckpt,
never *.npz), are flushed to disk, and only then renamed over the target with os.replace (and the
directory is synced), so a process killed at any moment (kill -9), a full disk or a crash leaves
either the previous complete file or the new complete file, never a torn one.
`remove_stale_temporaries` deletes the temporaries a killed run left behind.

- `atomic_write(path, write)`: through a callback given the open binary file; `atomic_write_bytes`,
  `atomic_write_text`, `atomic_write_json` for data already in memory. I/O errors become one-line
  CheckpointErrors (DiskFullError when the device is full).
- `create_new(path, data, taken)`: the same for a file that must not exist; refuses, with the
  caller's one-line message, to write over one (also one that appeared meanwhile).
- `atomic_file(path)`: the bare context manager under them, OSErrors left as they are (for callers
  that report I/O failures their own way, e.g. a download).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from diffctl.errors import CheckpointError, ConfigError

_TEMP = re.compile(r"^\..+\.\d+\.tmp$")


class DiskFullError(CheckpointError):
    """The device being written to has no space (or quota) left."""


def temporary_path(path: str | Path) -> Path:
    """Where `path` is written before it is renamed into place (same directory, hidden, not *.ckpt)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.tmp")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed write. torch.save reports its file object's OSError (a full disk)
    as a RuntimeError of its zip writer ("unexpected pos ..."), with the OSError as its context."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _write_error(target: Path, err: BaseException) -> CheckpointError | None:
    """The one-line error for a failed write of `target` (None: not an I/O failure, re-raise it)."""
    os_err = _os_error(err)
    if os_err is None and not (isinstance(err, RuntimeError) and "writ" in str(err).lower()):
        return None
    kept = "the previous file there is intact" if target.exists() else "nothing was written"
    if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on device while saving {target} ({kept})")
    return CheckpointError(f"could not write {target}: {os_err or err}. {kept[0].upper()}{kept[1:]}.")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """`with atomic_file(path) as f:` write f; `path` gets the content only if the block completes.
    On any failure the temporary is removed, `path` is untouched and the exception propagates as is."""
    target = Path(path)
    tmp = temporary_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)  # make the rename itself durable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(file)` so that it appears complete or not at all.

    On any failure (disk full, unwritable directory, interruption) the temporary file is removed
    and the previous content of `path`, if any, is untouched; I/O errors become a CheckpointError
    (DiskFullError when the device is full)."""
    target = Path(path)
    try:
        with atomic_file(target) as f:
            write(f)
    except BaseException as err:
        error = _write_error(target, err)
        if error is None:
            raise
        raise error from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def json_text(obj: Any) -> str:
    """diffctl's JSON files: indented by 2, one final newline."""
    return json.dumps(obj, indent=2) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def atomic_create(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """atomic_write of a file that must not exist: the complete temporary file gets its name by a
    hard link, which fails (FileExistsError) if the name is taken meanwhile, so it never replaces a
    file. On a filesystem without hard links it is renamed (the caller's check before any work stands)."""
    target = Path(path)
    tmp = temporary_path(target)
    atomic_write(tmp, write)
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def create_new(path: str | Path, data: bytes | str, taken: str) -> None:
    """Write `path`, which must not exist, all at once (never a partial file, never over another);
    a name already taken is a ConfigError `{path} {taken}` (taken: what happened and what to do)."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        atomic_create(path, lambda f: f.write(raw))
    except FileExistsError:
        raise ConfigError(f"{path} {taken}") from None


def atomic_link(source: str | Path, target: str | Path) -> None:
    """Make `target` a second name of the complete file `source` (a hard link, or a copy where the
    filesystem has none), replacing any previous `target` atomically."""
    src, dst = Path(source), Path(target)
    tmp = temporary_path(dst)
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        error = _write_error(dst, err) if isinstance(err, OSError) else None
        if error is None:
            raise
        raise error from None
    _fsync_dir(dst.parent)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files that killed runs left in `directory`; returns what was removed.

    Only call this where no other live process writes (diffctl: rank 0, before training)."""
    d = Path(directory)
    removed = []
    if d.is_dir():
        for p in d.iterdir():
            if _TEMP.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
