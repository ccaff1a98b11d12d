"""Writing files so that a reader sees the old file or the new one, never half of one; hashing them.

Shared by adapter directories (:mod:`moa_fx.adapter_files`), training checkpoints (:mod:`moa_fx.train`),
evaluation results and the asset cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "sha256_file", "cache_dir"]


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary ``.<name>.*.tmp`` file in ``path``'s directory, fsync it,
    then rename it over ``path``. On any failure the temporary file is removed and ``path`` is left
    as it was."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = pathlib.Path(tmp)
    try:
        write(tmp_path)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp_path, 0o666 & ~mask)  # mkstemp makes 0600; a saved file gets the umask's mode
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> pathlib.Path:
    """The moa-fx cache folder (not created here).

    ``$MOA_FX_CACHE`` if set, else ``$XDG_CACHE_HOME/moa-fx``, else
    ``~/.cache/moa-fx``.
    """
    explicit = os.environ.get("MOA_FX_CACHE")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "moa-fx"
