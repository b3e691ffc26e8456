"""Atomic file writes: a crash leaves either the old file or the new one, never half of one."""

import contextlib
import json
import math
import os
import secrets
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside `path` to write to, synced to disk and renamed over `path` when
    the block ends without an exception (and deleted if it does not). For writers that take a
    file name (torch.jit.save, torch.onnx.export); `atomic_open` gives a file.

    The temporary name starts with a dot and ends in `.tmp`, so that a process killed mid-write
    leaves nothing that looks like a finished file (a checkpoint listing sees no stray `.pth`).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    # Created as open() would create `path` (permissions from the umask), unlike mkstemp's 0600.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """A file to write `path` through, atomically (see `atomic_path`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
        yield f


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def _fsync_folder(folder: str) -> None:
    # The rename itself reaches the disk only with the folder's entry; some systems cannot sync
    # a folder, and the file is complete either way.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_safe(value):
    """`value` in plain JSON types, with null for NaN and infinities: COCO gives AP NaN when
    nothing was detected, and strict JSON parsers refuse a bare NaN."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    value = float(value)  # numpy and torch scalars too
    return value if math.isfinite(value) else None


def write_json(path: str, value) -> None:
    """`value` as strict JSON (`json_safe`), indented, written atomically to `path`."""
    atomic_write_text(path, json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")
