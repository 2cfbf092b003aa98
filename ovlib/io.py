"""Checkpoint and cache I/O shared by every part of ovlib.

* :func:`atomic_save` writes to a temporary file in the target directory and renames it, so an
  interrupted write never corrupts the previous file.
* :func:`safe_load` always uses ``torch.load(..., weights_only=True)``: a checkpoint carrying a pickled
  callable is refused with an error that names the file.
* :func:`config_hash` / :func:`cache_path` key cached artefacts by the content of their config
  ("load if present, else train").

Crash safety (a process may be killed at any instant; what it leaves must never be taken for something it is not):

* a checkpoint saved by :func:`atomic_save` carries a SHA-256 of its content (key :data:`DIGEST_KEY`, for dict
  objects), which :func:`safe_load` verifies and removes: a flipped byte is an error naming the file, not a silently
  wrong model (``torch.load`` itself reads a bit-flipped tensor without complaint);
* :func:`load_cache` -- the one loader of rebuildable caches (micro CLIP / VFM, and any later cache): a missing
  file is ``None``; an unreadable, corrupt, truncated or invalid one is set aside (``<name>.corrupt-<k>``), counted
  (:func:`rebuild_counts`), logged, and ``None`` is returned so the caller rebuilds -- or, with
  ``on_bad="error"``, a :class:`CheckpointError` naming it;
* :func:`append_jsonl` / :func:`read_jsonl` / :func:`rewrite_jsonl` -- append-only record files: a torn last line
  (a kill during a write) is dropped, counted and logged by the reader; a bad line elsewhere is an error;
* :func:`set_aside` -- move the records of an earlier run out of the way under a named folder, never delete them;
* :func:`run_once` / :func:`read_done` / :func:`mark_done` -- a run directory is finished only when its ``done.json``
  exists: it is written last, atomically, after everything the run produces (training, evaluation, ...);
* :func:`fault_point` -- named instants where the environment variable :data:`FAULT_ENV` (``name`` or ``name@k``,
  the k-th time that point is reached in the process) makes the process SIGKILL itself; the fault-injection
  tests (``tests/test_fault_tolerance.py``) kill runs there. ``write:<file name>`` points sit inside the atomic
  writers (the temporary file is left half written) and :func:`append_jsonl` (half a line is on disk).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_text", "safe_load", "model_state", "config_hash", "key_fields",
           "cache_path",
           "CheckpointError",
           "DIGEST_KEY", "FAULT_ENV", "fault_point", "load_cache", "rebuild_counts", "append_jsonl", "read_jsonl",
           "rewrite_jsonl", "set_aside", "remove_stale_temps", "read_done", "mark_done", "run_once", "DONE"]

log = logging.getLogger("ovlib.io")

#: key under which :func:`atomic_save` stores the SHA-256 of a dict checkpoint's content
DIGEST_KEY = "__ovlib_sha256__"
#: environment variable naming the fault point (``name`` or ``name@k``) at which the process kills itself
FAULT_ENV = "OVLIB_FAULT"
#: the marker file of a finished run directory (:func:`run_once`)
DONE = "done.json"


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read safely."""


_fault_hits: collections.Counter = collections.Counter()


def fault_point(name: str, before_kill: Callable[[], None] | None = None) -> None:
    """Fault injection for the crash-safety tests: when ``$OVLIB_FAULT`` is ``name`` (first time this point is
    reached) or ``name@k`` (k-th time), run ``before_kill`` (e.g. leave a half-written file) and SIGKILL this
    process -- no ``finally``, no ``atexit``, exactly what a power cut or the OOM killer leaves. A no-op otherwise."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _fault_hits[name] += 1
    if _fault_hits[name] == int(nth or 1):
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), signal.SIGKILL)


def _truncate_half(path: str) -> Callable[[], None]:
    return lambda: os.truncate(path, os.path.getsize(path) // 2)


def _content_digest(obj: Any) -> str:
    """SHA-256 over a checkpoint object's structure and bytes: mappings (keys in order), sequences, tensors (dtype,
    shape, raw bytes), other leaves by ``repr``. Equal before ``torch.save`` and after ``torch.load``."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().reshape(-1).contiguous()
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy().data)
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k, v in x.items():
                h.update(repr(k).encode() + b":")
                walk(v)
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
                h.update(b",")
            h.update(b"]")
        else:
            h.update(f"{type(x).__name__}={x!r};".encode())

    walk(obj)
    return h.hexdigest()


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


def atomic_save(obj: Any, path: str | os.PathLike, digest: bool = True) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``).

    A dict ``obj`` gets its content's SHA-256 under :data:`DIGEST_KEY` (unless ``digest=False``), which
    :func:`safe_load` checks and strips."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if digest and isinstance(obj, dict):
        obj = {**{k: v for k, v in obj.items() if k != DIGEST_KEY}, DIGEST_KEY: _content_digest(
            {k: v for k, v in obj.items() if k != DIGEST_KEY})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write:{path.name}", _truncate_half(tmp))
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
        fault_point(f"write:{path.name}", _truncate_half(tmp))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; errors name the file and the reason. A checkpoint written by
    :func:`atomic_save` has its content digest verified (a mismatch is a :class:`CheckpointError`) and removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it cannot be read with weights_only=True "
            f"(it may carry pickled code objects, or be truncated/corrupt): {type(e).__name__}: {e}"
        ) from e
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        want = obj.pop(DIGEST_KEY)
        got = _content_digest(obj)
        if got != want:
            raise CheckpointError(f"refusing to load checkpoint {path}: its content does not match the SHA-256 "
                                  f"stored when it was written (corrupt file: {got[:12]} != {want[:12]})")
    return obj


# ------------------------------------------------------------------------------------------ caches
_rebuilds: collections.Counter = collections.Counter()


def model_state(ck: Any, base: Mapping[str, torch.Tensor] | None = None, where: str = "checkpoint"
                ) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a trainer checkpoint (or ``ck`` itself when it is a bare state dict), whole.

    A run saved with ``DistillConfig.checkpoint = "final"`` (the dry run's) leaves out its frozen student weights,
    which equal those of the model the run started from, and lists their keys under ``ck["omitted"]``; they are
    taken from ``base`` (that model's state dict, keys as in the checkpoint). Without ``base`` such a checkpoint is
    an error naming ``where``; so is an omitted key ``base`` lacks."""
    sd = ck["model"] if isinstance(ck, dict) and isinstance(ck.get("model"), dict) else ck
    omitted = list(ck.get("omitted", ())) if isinstance(ck, dict) and "model" in ck else []
    if not omitted:
        return dict(sd)
    if base is None:
        raise ValueError(f"{where} leaves out {len(omitted)} frozen weights (a checkpoint='final' run): its loader "
                         "must pass the state dict of the model the run started from")
    lacking = [k for k in omitted if k not in base]
    if lacking:
        raise ValueError(f"{where}: the base model lacks {len(lacking)} of the omitted weights, e.g. {lacking[:3]}")
    return {**{k: base[k] for k in omitted}, **sd}


def rebuild_counts() -> dict[str, int]:
    """How many bad cache files :func:`load_cache` set aside in this process, per cache file name."""
    return dict(_rebuilds)


def _aside_name(path: Path, tag: str) -> Path:
    k = 1
    while (cand := path.with_name(f"{path.name}.{tag}-{k}")).exists():
        k += 1
    return cand


def load_cache(path: str | os.PathLike, validate: Callable[[Any], None] | None = None, what: str = "cache",
               on_bad: str = "rebuild") -> Any:
    """The one loader of rebuildable cache files. Returns the loaded object, or ``None`` when the caller must
    (re)build it: the file is missing, or -- ``on_bad="rebuild"`` -- it is unreadable, truncated, fails its content
    digest, or ``validate(obj)`` raises (wrong config, keys, shapes). A bad file is renamed
    ``<name>.corrupt-<k>`` (kept for inspection), counted (:func:`rebuild_counts`) and logged. With
    ``on_bad="error"`` a bad file raises :class:`CheckpointError` naming it and the reason."""
    if on_bad not in ("rebuild", "error"):
        raise ValueError(f"on_bad must be 'rebuild' or 'error', got {on_bad!r}")
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = safe_load(path)
        if validate is not None:
            validate(obj)
        return obj
    except Exception as e:  # CheckpointError, KeyError, ValueError, ... from reading or validate
        reason = f"{type(e).__name__}: {e}"
        if on_bad == "error":
            raise CheckpointError(f"{what} file {path} is unusable: {reason}") from e
    aside = _aside_name(path, "corrupt")
    os.replace(path, aside)
    _rebuilds[path.name] += 1
    log.warning("%s file %s is unusable (%s); moved to %s, rebuilding it (rebuild #%d of this file in this process)",
                what, path, reason, aside.name, _rebuilds[path.name])
    return None


# ------------------------------------------------------------------------------------------ records
def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON record (one line) to ``path`` and fsync it, so a record is on disk before any checkpoint
    written after it. A kill during the write leaves a torn last line, which :func:`read_jsonl` drops."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record) + "\n").encode()
    with open(path, "ab") as f:
        def torn() -> None:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())

        fault_point(f"write:{path.name}", torn)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """``(records, torn)`` of an append-only JSON-lines file (missing file: ``([], 0)``). A last line without its
    newline or not valid JSON -- a write cut by a kill -- is dropped, counted in ``torn`` and logged; a bad line
    anywhere else is a ``ValueError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, else a torn record
    torn = 0
    if tail.strip():
        torn = 1
    recs = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            recs.append(json.loads(ln))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({e}): {ln[:80]!r}") from e
    if torn:
        log.warning("%s: dropped a torn last record (a write cut by a kill): %r", path, tail[:80])
    return recs, torn


def rewrite_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Replace ``path`` atomically by ``records``, one JSON line each."""
    return atomic_write_text("".join(json.dumps(r) + "\n" for r in records), path)


def set_aside(paths: Iterable[str | os.PathLike], folder: str | os.PathLike, reason: str) -> Path | None:
    """Move the existing ``paths`` into ``folder-<k>`` (first free ``k``): the records of an earlier run that must
    not be mixed with a new one are kept, under a name that says why, and logged. Returns the folder (None when
    nothing existed)."""
    paths = [Path(p) for p in paths if Path(p).exists()]
    if not paths:
        return None
    folder = Path(folder)
    k = 1
    while (dest := folder.with_name(f"{folder.name}-{k}")).exists():
        k += 1
    dest.mkdir(parents=True)
    for p in paths:
        os.replace(p, dest / p.name)
    _fsync_dir(dest.parent)
    log.warning("%s: moved %s to %s", reason, ", ".join(p.name for p in paths), dest)
    return dest


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files an atomic write killed half-way left in ``folder`` (``.<name>.*.tmp``). Only for
    folders one process owns (a run directory), never for a shared cache folder."""
    folder = Path(folder)
    gone = []
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            if p.is_file():
                p.unlink()
                gone.append(p.name)
    return gone


# ------------------------------------------------------------------------------------------ run directories
def read_done(folder: str | os.PathLike, marker: str = DONE) -> dict[str, Any] | None:
    """The record of a finished run directory (its ``done.json``), or ``None`` when the run is not finished."""
    path = Path(folder) / marker
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # written atomically: only outside damage gets here
        raise ValueError(f"{path}: the finished-run marker is not valid JSON ({e}); remove it to redo the run") from e


def mark_done(folder: str | os.PathLike, record: Mapping[str, Any], marker: str = DONE) -> Path:
    """Write the finished-run marker -- the last write of a run, atomic."""
    return atomic_write_text(json.dumps(dict(record), indent=2, default=str), Path(folder) / marker)


def run_once(folder: str | os.PathLike, produce: Callable[[], Mapping[str, Any]], marker: str = DONE,
             requires: Iterable[str] = ()) -> tuple[dict[str, Any], bool]:
    """``(record, produced_now)``: the record of the finished run in ``folder``, or -- when there is none, or a file
    named in ``requires`` (relative to ``folder``) is missing -- ``produce()``'s record after marking the run done.
    ``produce`` does all the work (train, evaluate, write results; it must resume or redo a run killed half-way);
    the marker is written only after it returns, so a run killed anywhere inside it is never taken as finished."""
    folder = Path(folder)
    rec = read_done(folder, marker)
    if rec is not None:
        if all((folder / r).exists() for r in requires):
            return rec, False
        missing = [r for r in requires if not (folder / r).exists()]
        log.warning("%s: marked finished but %s is missing; redoing the run", folder, missing)
        (folder / marker).unlink()
    rec = dict(produce())
    fault_point("run_once.produced")
    mark_done(folder, rec, marker)
    return rec, True


def key_fields(cfg: Any) -> dict[str, Any]:
    """``dataclasses.asdict(cfg)`` without the fields marked ``metadata={"cache_key": False}``: options that
    change how an artefact is computed but not the artefact (e.g. a pre-training's data pipeline), so neither
    :func:`config_hash` nor a saved-config check tells two such configs apart."""
    d = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("cache_key", True):
            d.pop(f.name)
    return d


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": type(obj).__name__, **{k: _canonical(v) for k, v in key_fields(obj).items()}}
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
