"""Files written safely: atomically (temporary file in the same folder, fsync, rename), skipped when the
bytes are unchanged, and hashed the same way everywhere."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

#: Permissions of every file the store writes: what ``open()`` gives under the usual umask 022.
_FILE_MODE = 0o644


def atomic_write(path: Path, write: Callable[[Path], object]) -> bool:
    """Call ``write(tmp_path)``, then move the result over ``path`` unless it is byte-identical.

    The temporary file lives in the target folder so that ``os.replace`` is an atomic rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if path.exists() and _same_bytes(tmp, path):
            return False
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; data and reports are for everyone to read
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def copy_file_atomic(src: Path, dst: Path) -> bool:
    data = Path(src).read_bytes()
    return atomic_write(dst, lambda tmp: Path(tmp).write_bytes(data))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return file_sha256(a) == file_sha256(b)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> bool:
    """Atomically write ``text`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, payload: Mapping[str, object]) -> Path:
    """Atomically write ``payload`` as indented, key-sorted JSON; returns ``path``."""
    write_text(Path(path), json.dumps(payload, indent=2, sort_keys=True, default=str))
    return Path(path)


def files_fingerprint(paths: Iterable[Path]) -> str:
    """One sha256 for a set of data files: order independent, changes when any byte or name changes."""
    entries = sorted((Path(path).name, file_sha256(Path(path))) for path in paths)
    digest = hashlib.sha256()
    for name, sha in entries:
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()
