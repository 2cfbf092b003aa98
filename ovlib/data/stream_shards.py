"""Pre-rendered micro-world stream shards: the pre-training stream rendered once, in parallel, onto disk.

The pre-trainers (:mod:`ovlib.train.pretrain`) read the micro-world stream (:class:`MicroWorldStream`) in order
from a start index. Rendering it inline costs about a third of every micro CLIP step on one thread while
torch's other threads wait (profile of issue 22). With ``data_pipeline="shards"`` the items a run needs are
rendered *before* its first step by ``processes`` worker processes of one thread each (the trainer waits, so
threads x processes never exceeds the cores it was given), and the optimiser loop then only reads them back.

* A shard holds the stream items ``first .. first + n - 1`` (``first`` a multiple of ``n =``
  :func:`shard_items`), as ``image (n, 3, S, S) uint8``, ``caption`` (list of n str) and ``index (n,) int64``,
  written atomically (:func:`ovlib.io.atomic_save`, content digest) and read with ``weights_only=True``.
* Shards live in ``root/<key>/`` where ``key`` (:func:`stream_key`) hashes everything the items depend on:
  the world's config (:attr:`MicroWorld.config`, incl. its version), the stream options (size, object views)
  and the SHA-256 of the generator's source file -- any change of the world or of its code starts a new folder.
* The batches (:func:`shard_batches`) are bit-identical to those of the inline stream (same scenes, order,
  captions; ``uint8 / 255`` is how the stream makes its float images). A shard that is unreadable, truncated,
  fails its digest or does not hold what its name says is set aside, counted (:func:`ovlib.io.rebuild_counts`)
  and rebuilt in-process; a missing one is rendered when reached.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ovlib.io import atomic_save, config_hash, load_cache

__all__ = ["StreamSpec", "ensure_shards", "remove_shards", "render_shard", "shard_batches", "shard_items",
           "shard_path", "stream_key"]

#: bump when the shard file layout changes
SHARD_FORMAT = 1


@dataclass(frozen=True)
class StreamSpec:
    """What a :class:`~ovlib.data.microworld.MicroWorldStream` yields: its world's seed, image size and
    object-view options (the stream's own arguments of the same names)."""

    world_seed: int
    size: int
    object_views: float = 0.0
    view_render_size: int = 128
    view_context: tuple[float, float] = (1.2, 2.5)

    def stream(self, start: int = 0, stop: int | None = None):
        from ovlib.data.microworld import MicroWorld, MicroWorldStream

        return MicroWorldStream(MicroWorld(seed=self.world_seed), size=self.size, start=start, stop=stop, uint8=True,
                                object_views=self.object_views, view_render_size=self.view_render_size,
                                view_context=self.view_context)


def shard_items(size: int) -> int:
    """Items per shard: about 1.5 MB of uint8 pixels (128 items at 64 px, 20 at 160 px), at least 8 -- small
    enough that a run renders at most one shard it does not use, large enough that the per-file write (fsync)
    is negligible next to rendering it."""
    return max(8, (1 << 19) // (int(size) * int(size)))


_SOURCE_SHA: dict[str, str] = {}


def _generator_sha() -> str:
    """SHA-256 of the micro-world generator's source file (computed once per process)."""
    from ovlib.data import microworld

    path = str(microworld.__file__)
    if path not in _SOURCE_SHA:
        _SOURCE_SHA[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _SOURCE_SHA[path]


def stream_key(spec: StreamSpec) -> str:
    """Content key of a stream's shards: world config, stream options, items per shard, generator source."""
    from ovlib.data.microworld import MicroWorld

    return config_hash({"format": SHARD_FORMAT, "world": MicroWorld(seed=spec.world_seed).config,
                        "stream": asdict(spec), "items": shard_items(spec.size), "generator": _generator_sha()})


def shard_path(root: str | Path, key: str, first: int) -> Path:
    return Path(root) / key / f"items-{int(first):012d}.pt"


def render_shard(spec: StreamSpec, first: int) -> dict[str, Any]:
    """The stream items ``first .. first + shard_items - 1``, rendered by the stream itself (``uint8=True``):
    ``{"first", "image" (n, 3, S, S) uint8, "caption" [n str], "index" (n,) int64}``."""
    n = shard_items(spec.size)
    stream = spec.stream()
    items = [stream.item(i) for i in range(first, first + n)]
    return {"first": int(first), "image": torch.stack([it["image"] for it in items]),
            "caption": [it["caption"] for it in items],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64)}


def _validator(spec: StreamSpec, key: str, first: int):
    n, s = shard_items(spec.size), spec.size

    def valid(sh: dict) -> None:
        if sh.get("key") != key or int(sh.get("first", -1)) != first:
            raise ValueError(f"shard holds key {sh.get('key')!r} / first {sh.get('first')}, expected {key!r} / {first}")
        img, idx = sh["image"], sh["index"]
        if img.dtype != torch.uint8 or tuple(img.shape) != (n, 3, s, s):
            raise ValueError(f"image is {img.dtype} {tuple(img.shape)}, expected uint8 {(n, 3, s, s)}")
        if not torch.equal(idx, torch.arange(first, first + n)) or len(sh["caption"]) != n:
            raise ValueError(f"index/captions do not cover items {first}..{first + n - 1}")

    return valid


def _load_or_render(root: Path, spec: StreamSpec, key: str, first: int) -> dict:
    """A shard from disk, or -- when it is missing or unusable (set aside and counted by ``load_cache``) --
    rendered here and written."""
    path = shard_path(root, key, first)
    sh = load_cache(path, _validator(spec, key, first), what="stream shard")
    if sh is None:
        sh = {"key": key, **render_shard(spec, first)}
        atomic_save(sh, path)
    return sh


class _Shards(torch.utils.data.Dataset):
    """Shard ``k`` of a list of shard starts, rendered in a DataLoader worker (one thread: the loader sets
    torch's, the initialiser numpy's BLAS)."""

    def __init__(self, spec: StreamSpec, firsts: list[int]):
        self.spec, self.firsts = spec, firsts

    def __len__(self) -> int:
        return len(self.firsts)

    def __getitem__(self, k: int) -> dict:
        return render_shard(self.spec, self.firsts[k])


def _one_blas_thread(_worker: int) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def ensure_shards(root: str | Path, spec: StreamSpec, start: int, stop: int, processes: int = 1,
                  progress: dict | None = None) -> dict[str, Any]:
    """Render every missing shard that holds a stream item in ``[start, stop)``, in ``processes`` worker
    processes of one thread each (``1``: in this process); the caller waits meanwhile. Existing shards are
    not re-read here (:func:`shard_batches` validates each as it reads it). Returns ``{"key", "built",
    "seconds"}`` (wall time of the rendering; 0 when nothing was missing); ``progress``: tqdm kwargs
    (``{"disable": True}`` silences the bar)."""
    from tqdm.auto import tqdm

    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    root, key, n = Path(root), stream_key(spec), shard_items(spec.size)
    t0 = time.perf_counter()
    firsts = [f for f in range(start // n * n, stop, n) if not shard_path(root, key, f).is_file()]
    if firsts:
        workers = min(processes, len(firsts))
        loader = torch.utils.data.DataLoader(_Shards(spec, firsts), batch_size=None,
                                             num_workers=workers if workers > 1 else 0,
                                             worker_init_fn=_one_blas_thread if workers > 1 else None)
        with tqdm(total=len(firsts) * n, desc=f"render stream shards ({workers} proc)", **(progress or {})) as bar:
            for sh in loader:
                atomic_save({"key": key, **sh}, shard_path(root, key, sh["first"]))
                bar.update(n)
    return {"key": key, "built": len(firsts), "seconds": time.perf_counter() - t0 if firsts else 0.0}


def shard_batches(root: str | Path, spec: StreamSpec, start: int, batch_size: int) -> Iterator[dict]:
    """Batches of ``batch_size`` consecutive stream items from ``start`` on, read from the shards (a missing or
    bad shard is rendered in-process): ``{"image" (B, 3, S, S) float32 in [0, 1], "caption" [B str],
    "index" (B,) int64}`` -- the same tensors as the inline stream's batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root, key, n = Path(root), stream_key(spec), shard_items(spec.size)
    i, sh = int(start), None
    while True:
        imgs, caps, idx = [], [], []
        while len(caps) < batch_size:
            first = i // n * n
            if sh is None or sh["first"] != first:
                sh = _load_or_render(root, spec, key, first)
            take = min(batch_size - len(caps), first + n - i)
            sl = slice(i - first, i - first + take)
            imgs.append(sh["image"][sl])
            caps += sh["caption"][sl]
            idx.append(sh["index"][sl])
            i += take
        yield {"image": torch.cat(imgs).float().div_(255.0), "caption": caps, "index": torch.cat(idx)}


def remove_shards(root: str | Path, spec: StreamSpec, start: int, stop: int) -> int:
    """Delete the shards holding items ``[start, stop)`` (a finished run's; they are rebuildable) and the
    key's folder when it is left empty. Returns the number of files removed."""
    root, key, n = Path(root), stream_key(spec), shard_items(spec.size)
    removed = 0
    for f in range(start // n * n, stop, n):
        p = shard_path(root, key, f)
        if p.is_file():
            p.unlink()
            removed += 1
    try:
        (root / key).rmdir()
    except OSError:  # not empty (another run's shards) or already gone
        pass
    return removed
