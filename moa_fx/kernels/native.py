"""Native CPU loops: a C source beside this module, compiled once with the system C compiler, loaded with ctypes.

Why: a loop whose trip count is data dependent (the dropout gap streams of ``dropout_lora``) is tens
of small torch passes on CPU, each a full read and write of its arrays; in C it is one pass with no
temporaries. The sources depend on libm only (no torch headers), so a build takes well under a second.

Where: ``<cache>/native/<name>-<hash>.so`` (``moa_fx.fileio.cache_dir``), the hash over the source,
the compiler command and the platform; the library is written to a temporary name and renamed, so a
reader never loads half of one. ``$CC`` picks the compiler (default ``cc``). ``MOA_FX_NATIVE=0`` turns
the native loops off (the torch paths compute the same values). When there is no compiler or the build
fails, :func:`library` warns once, naming the cause and the way out, and returns None: callers then
take their torch path.

Map: :func:`library` (the loaded ``ctypes.CDLL`` of a source, or None), :func:`pointer` (a tensor's
data as the ctypes pointer an argument wants).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from moa_fx.fileio import cache_dir

__all__ = ["library", "pointer", "NATIVE_ENV"]

NATIVE_ENV = "MOA_FX_NATIVE"
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]
_BUILD_TIMEOUT_S = 120
_LOADED: dict[str, Optional[ctypes.CDLL]] = {}
_LOCK = threading.Lock()


def _compiler() -> list[str]:
    command = shlex.split(os.environ.get("CC") or "cc")
    if not command:
        raise OSError("$CC names no compiler")
    return command


def _build(name: str) -> ctypes.CDLL:
    source = Path(__file__).with_name(f"{name}.c")
    text = source.read_bytes()
    command = _compiler() + _FLAGS
    digest = hashlib.sha256(text + repr((command, platform.machine(), platform.system())).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"{name}-{digest}.so"
    if not target.is_file():
        if shutil.which(command[0]) is None:
            raise OSError(f"no C compiler '{command[0]}' on PATH (set $CC)")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so.tmp", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(command + ["-o", tmp, str(source), "-lm"], capture_output=True, text=True,
                                  timeout=_BUILD_TIMEOUT_S)
            if done.returncode != 0:
                raise OSError(f"'{' '.join(command)}' failed on {source.name}: {done.stderr.strip()[-400:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def library(name: str) -> Optional[ctypes.CDLL]:
    """The compiled ``moa_fx/kernels/<name>.c`` (built on first use, then cached), or None when native
    loops are off (``MOA_FX_NATIVE=0``) or cannot be built here (warned once)."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    with _LOCK:
        if name not in _LOADED:
            try:
                _LOADED[name] = _build(name)
            except (OSError, subprocess.SubprocessError, ValueError, IndexError) as err:  # ValueError: $CC unparsable
                warnings.warn(f"moa-fx: the native CPU loop '{name}' is unavailable ({err}); its torch path runs "
                              f"instead (same values, slower). Install a C compiler (or set $CC), or set "
                              f"{NATIVE_ENV}=0 to silence this.", RuntimeWarning, stacklevel=3)
                _LOADED[name] = None
        return _LOADED[name]


def pointer(t: Optional[torch.Tensor]) -> Optional[int]:
    """The address of a contiguous CPU tensor's data (None for None: a NULL argument)."""
    if t is None:
        return None
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"native loops take contiguous CPU tensors, got one on {t.device} "
                         f"(contiguous: {t.is_contiguous()})")
    return t.data_ptr()
