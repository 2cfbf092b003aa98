"""Checkpoint and cache I/O shared by every part of ovlib.

* :func:`atomic_save` writes to a temporary file in the target directory and renames it, so an
  interrupted write never corrupts the previous file.
* :func:`safe_load` always uses ``torch.load(..., weights_only=True)``: a checkpoint carrying a pickled
  callable is refused with an error that names the file.
* :func:`config_hash` / :func:`cache_path` key cached artefacts by the content of their config
  ("load if present, else train").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_text", "safe_load", "config_hash", "cache_path", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read safely."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (temp file in the same directory + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; errors name the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it cannot be read with weights_only=True "
            f"(it may carry pickled code objects, or be truncated/corrupt): {type(e).__name__}: {e}"
        ) from e


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": type(obj).__name__, **{k: _canonical(v) for k, v in dataclasses.asdict(obj).items()}}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return repr(obj)
    return obj


def config_hash(cfg: Any, length: int = 12) -> str:
    """Stable short hash of a dataclass / dict config (key order does not matter)."""
    blob = json.dumps(_canonical(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def cache_path(cache_dir: str | os.PathLike, kind: str, cfg: Any, suffix: str = ".pt") -> Path:
    """``cache_dir/kind/<kind>-<hash(cfg)><suffix>``: where an artefact built from ``cfg`` lives."""
    return Path(cache_dir) / kind / f"{kind}-{config_hash(cfg)}{suffix}"


def tqdm_disabled() -> bool:
    """``TQDM_DISABLE`` is set to a true value. Read explicitly because ``tqdm.auto`` in a notebook is
    ``tqdm.notebook``, whose own ``disable=False`` default shadows tqdm's environment defaults."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
