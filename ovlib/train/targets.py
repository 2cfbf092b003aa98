"""A cache of frozen-teacher outputs for the distillation loop (``DistillConfig.teacher_cache``).

Every method re-runs frozen networks on every step: the teacher CLIP's CLS embedding of each region crop
(CLIPSelf, SC/R-SC-CLIPSelf, DeCLIP, SynCLIP, DenseRC), the teacher's dense map of the student image (SCD targets,
SynCLIP's semantic maps), the frozen Refiner's refined region tokens (R-SC-CLIPSelf, R-SC-V) and the VFM's patch
features (DeCLIP/SynCLIP context, DenseRC coherence). A frozen network is a pure function of its input, so its
output can be computed once and reused. A method asks for such an output through
:meth:`ovlib.methods.base.Distiller.frozen_call` / :meth:`~ovlib.methods.base.Distiller.frozen_rows`; the trainer
attaches a :class:`TargetCache` to the method, without one the call runs the network as before.

**Keys.** One entry per *sample row* (a crop, an image, an (image, box) pair), keyed by

* ``kind`` -- which function of the network (``"clip.encode_image"``, ``"clip.dense:x+v:normalized"``,
  ``"vfm.patch_features"``, ``"refiner.image"``, ``"refiner.tokens:k=8"``...): every option the output depends
  on is in it;
* the network's **content fingerprint** -- SHA-256 of its ``state_dict`` (names, dtypes, shapes, bytes),
  recomputed whenever a parameter or buffer is replaced or modified in place (``Tensor._version``), so a new
  checkpoint or a ``load_state_dict`` invalidates every entry of the old weights;
* the **autocast state** (enabled, dtype) and device type -- a bf16 output is never served to an fp32 run;
* the row's **content digest** -- BLAKE2b of the input row's bytes, dtype and shape (plus the box coordinates and
  grid for region rows). The teacher's input *is* the (image, region set / crop geometry, input size, dtype)
  tuple, so keying by its content is exact whatever data root, split or image id produced it and cannot serve a
  stale entry when the data changes.

**When the cache hits** (the determinism a hit needs). Per-image entries -- the VFM's features of the VFM proxy
image, the teacher's dense map of the student image -- depend on the image only, so they hit from the second
time an image is seen: every later epoch, every seed and every method that uses the same network and input size
(DeCLIP, SynCLIP and DenseRC share the VFM features; SC-CLIPSelf and, with global SCD, R-SC-CLIPSelf read
per-image maps). Per-crop entries (the teacher's CLS of a region crop) hit when the same crop recurs: region
sampling is a function of ``(seed, epoch, image index)`` (:class:`ovlib.data.distill.RegionDistillDataset`), so
runs of different methods with the same seed and region settings (CLIPSelf, SC/R-SC-CLIPSelf, DeCLIP, DenseRC,
RegionText with image nouns) see exactly the same crops and share them; grid regions come from a finite set of
cells (``grid_choices(max_split)``), so later epochs and other seeds hit the cells drawn before; SynCLIP's GT-box
crops (a box expanded by ``thing_crop_scale``, no jitter) are keyed one by one, so a box hits whenever it is drawn
again, whatever subset it comes with. A sampler with random jitter (random crop scale or offset per draw) would
never hit: its crops must be keyed per (image, box) exactly as here, and then only a deterministic box recurs.
A frozen Refiner (R-SC-CLIPSelf/R-SC-V) has a per-image part (the frozen tower up to its blocks and the Eq. 11
map: hits like a dense map) and per-(image, box, grid) tokens (hit like crops). What cannot hit, and is not
cached: anything of a network that trains (R-SC-E2E's live Refiner; the student), and random crops drawn anew
each step (the Refiner stage's local boxes are seeded by the batch, so they recur only when the batch does -- not
cached).

**Exactness.** A hit returns the stored row bit for bit, in the memory layout the network produced (a
channels-last map is rebuilt channels-last: reductions over differently laid out maps can round differently). A
miss runs the network on the missing rows only. Kernels choose their blocking from the problem size, so a row's
output can differ at float rounding between batch sizes; the methods therefore run every frozen network on
fixed-size chunks (``DistillConfig.teacher_chunk_px`` input pixels per call), with or without the cache
(:func:`ovlib.methods.base.run_chunked`), which makes a row's output a function of the row alone (checked for the
micro towers on CPU by ``tests/test_targets.py``): cached and uncached steps give identical losses and gradients,
and a resumed run (memory cache empty) continues bit-identically.

**Memory and disk.** An in-memory LRU bounded by ``max_mb`` (entries on the device they were computed on), shared
by every trainer of the process (:func:`shared_cache`), so a chapter's runs reuse each other's targets; optionally
an on-disk store under ``cache_dir/<kind>/<fingerprint>/<digest>.pt`` written atomically
(:func:`ovlib.io.atomic_save`, content digest inside) and read with ``torch.load(weights_only=True)``
(:func:`ovlib.io.safe_load`). A file that does not load or holds another key is **rebuilt**: recomputed,
rewritten, counted in :attr:`TargetCache.stats` (``corrupt_rebuilt``) and logged with its path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ovlib.io import atomic_save, safe_load

__all__ = ["TargetCache", "fingerprint", "row_digests", "shared_cache"]

log = logging.getLogger(__name__)

Rows = torch.Tensor | tuple[torch.Tensor, ...]


class Entry(NamedTuple):
    """One cached row: its output tensors (row shapes), the batch outputs' dimension orders (outermost first, so
    a hit rebuilds the batch in the layout the network produced: reductions over a channels-last and a contiguous
    map can round differently) and whether the function returned a single tensor."""

    rows: tuple[torch.Tensor, ...]
    orders: tuple[tuple[int, ...], ...]
    single: bool


# ------------------------------------------------------------------------------------------ fingerprints
def _state_signature(net: nn.Module) -> tuple:
    """Cheap identity of a module's current weights: every tensor's storage pointer and in-place version."""
    return tuple((k, v.data_ptr(), v._version, tuple(v.shape)) for k, v in net.state_dict(keep_vars=True).items())


def fingerprint(net: nn.Module) -> str:
    """SHA-256 (24 hex digits) of ``net``'s class and ``state_dict``: names, dtypes, shapes and bytes."""
    h = hashlib.sha256(type(net).__qualname__.encode())
    for k, v in net.state_dict().items():
        t = v.detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def row_digests(x: torch.Tensor, extra: Sequence[bytes] | None = None) -> list[str]:
    """BLAKE2b (32 hex digits) of each row ``x[i]`` (bytes, dtype and row shape), plus ``extra[i]`` if given."""
    if x.ndim == 0:
        raise ValueError("row_digests needs a batch of rows (x.ndim >= 1)")
    buf = x.detach().contiguous().cpu()
    head = f"{buf.dtype}|{tuple(buf.shape[1:])}".encode()
    flat = buf.reshape(buf.shape[0], -1).view(torch.uint8).numpy() if buf.numel() else None
    out = []
    for i in range(buf.shape[0]):
        h = hashlib.blake2b(head, digest_size=16)
        if flat is not None:
            h.update(flat[i].data)
        if extra is not None:
            h.update(extra[i])
        out.append(h.hexdigest())
    return out


def _nbytes(e: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in e.rows)


def _dim_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dimensions of ``t`` from the outermost (largest stride) to the innermost."""
    return tuple(sorted(range(t.ndim), key=lambda d: (-t.stride(d), d)))


def _assemble(rows: list[torch.Tensor], order: Sequence[int]) -> torch.Tensor:
    """Stack ``rows`` into a new ``(N, *row shape)`` tensor laid out in memory as ``order`` says."""
    shape = (len(rows), *rows[0].shape)
    strides, acc = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = acc
        acc *= shape[d]
    out = torch.empty_strided(shape, strides, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i].copy_(r)
    return out


def _autocast_tag(device: torch.device) -> str:
    dt = device.type
    if torch.is_autocast_enabled(dt):
        return f"{dt}:autocast-{str(torch.get_autocast_dtype(dt)).replace('torch.', '')}"
    return f"{dt}:fp32"


# ------------------------------------------------------------------------------------------ the cache
class TargetCache:
    """Per-row cache of frozen-network outputs (see the module docstring).

    ``max_mb``: bound of the in-memory LRU (0 = no memory store); ``cache_dir``: optional on-disk store.
    :attr:`stats` counts ``hits`` / ``misses`` (rows), ``disk_hits``, ``disk_writes``, ``corrupt_rebuilt`` and
    ``evicted`` (rows dropped from memory)."""

    def __init__(self, max_mb: float = 1024.0, cache_dir: str | os.PathLike | None = None):
        if max_mb < 0:
            raise ValueError(f"teacher cache max_mb must be >= 0, got {max_mb}")
        self.max_bytes = int(max_mb * 2 ** 20)
        self.dir = Path(cache_dir) if cache_dir else None
        self._mem: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._prints: dict[int, tuple[weakref.ref, tuple, str]] = {}  # id(net) -> (net, signature, fingerprint)
        self.stats = {"hits": 0, "misses": 0, "disk_hits": 0, "disk_writes": 0, "corrupt_rebuilt": 0, "evicted": 0}

    def __len__(self) -> int:
        return len(self._mem)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        """Drop the in-memory entries (the disk store stays)."""
        self._mem.clear()
        self._bytes = 0

    def fingerprint(self, net: nn.Module) -> str:
        """:func:`fingerprint` of ``net``, recomputed only when its weights changed since the last call."""
        sig = _state_signature(net)
        known = self._prints.get(id(net))
        if known is None or known[0]() is not net or known[1] != sig:  # another module at a recycled id, or new weights
            known = (weakref.ref(net), sig, fingerprint(net))
            self._prints[id(net)] = known
        return known[2]

    # -------------------------------------------------------------------------------------- storage
    def _path(self, key: str) -> Path:
        kind, fp, tag, digest = key.split("|")
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in kind)
        return self.dir / safe / f"{fp}-{tag.replace(':', '_')}" / digest[:2] / f"{digest}.pt"

    def _remember(self, key: str, value: Entry) -> None:
        if self.max_bytes <= 0:
            return
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        old = self._mem.pop(key, None)
        if old is not None:
            self._bytes -= _nbytes(old)
        self._mem[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._mem.popitem(last=False)
            self._bytes -= _nbytes(dropped)
            self.stats["evicted"] += 1

    def _lookup(self, key: str, device: torch.device) -> Entry | None:
        value = self._mem.get(key)
        if value is not None:
            self._mem.move_to_end(key)
            return value
        if self.dir is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            payload = safe_load(path, map_location=device)
            if not isinstance(payload, dict) or payload.get("key") != key:
                raise ValueError(f"holds key {payload.get('key') if isinstance(payload, dict) else None!r}")
            value = Entry(tuple(payload["rows"]), tuple(tuple(int(d) for d in o) for o in payload["orders"]),
                          bool(payload["single"]))
            if len(value.rows) != len(value.orders) or not value.rows:
                raise ValueError(f"{len(value.rows)} rows and {len(value.orders)} layouts")
        except Exception as e:  # noqa: BLE001 -- any unreadable file is rebuilt, counted and logged
            self.stats["corrupt_rebuilt"] += 1
            log.warning("teacher cache: %s is unreadable (%s: %s); recomputing it (%d rebuilt so far)", path,
                        type(e).__name__, e, self.stats["corrupt_rebuilt"])
            return None
        self.stats["disk_hits"] += 1
        self._remember(key, value)
        return value

    def _store(self, key: str, value: Entry) -> None:
        self._remember(key, value)
        if self.dir is not None:
            atomic_save({"key": key, "rows": list(value.rows), "orders": [list(o) for o in value.orders],
                         "single": value.single}, self._path(key))
            self.stats["disk_writes"] += 1

    # -------------------------------------------------------------------------------------- calls
    def rows(self, kind: str, net: nn.Module, digests: Sequence[str], compute: Callable[[list[int]], Rows],
             device: torch.device) -> Rows:
        """Outputs for rows ``digests`` (len N): stored rows where present, ``compute(missing indices)`` for the
        others (it returns a tensor, or a tuple of tensors, whose leading dimension indexes the missing rows in
        the order given). A full miss returns ``compute``'s output itself."""
        if "|" in kind:
            raise ValueError(f"teacher cache kind must not contain '|', got {kind!r}")
        prefix = f"{kind}|{self.fingerprint(net)}|{_autocast_tag(device)}|"
        keys = [prefix + d for d in digests]
        found = [self._lookup(k, device) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        self.stats["hits"] += len(keys) - len(missing)
        self.stats["misses"] += len(missing)
        if missing:
            with torch.no_grad():
                fresh = compute(missing)
            single = isinstance(fresh, torch.Tensor)
            parts = (fresh,) if single else tuple(fresh)
            orders = tuple(_dim_order(p) for p in parts)  # the batch's memory layout, restored on a hit
            for j, i in enumerate(missing):
                found[i] = Entry(tuple(p[j].clone() for p in parts), orders, single)
                self._store(keys[i], found[i])
            if len(missing) == len(keys):
                return fresh
        first = found[0]
        out = tuple(_assemble([e.rows[p] for e in found], first.orders[p]) for p in range(len(first.rows)))
        return out[0] if first.single else out

    @staticmethod
    def image_digests(x: torch.Tensor) -> list[str]:
        """:func:`row_digests` of a batch (the content keys a method combines with per-row extras)."""
        return row_digests(x)

    def call(self, kind: str, net: nn.Module, fn: Callable[[torch.Tensor], Rows], x: torch.Tensor) -> Rows:
        """``fn(x)`` for a batch ``x (N, ...)`` of independent rows, row by row from the cache (``fn`` runs on the
        missing rows only: exact when a row's output does not depend on its batch, see
        :func:`ovlib.methods.base.run_chunked`, which :meth:`ovlib.methods.base.Distiller.frozen_call` uses)."""
        return self.rows(kind, net, row_digests(x), lambda idx: fn(x[idx] if len(idx) < x.shape[0] else x),
                         x.device)


_SHARED: dict[tuple[str | None, int], TargetCache] = {}


def shared_cache(max_mb: float = 1024.0, cache_dir: str | os.PathLike | None = None) -> TargetCache:
    """The process-wide :class:`TargetCache` of ``(cache_dir, max_mb)``: every trainer of a process (a chapter's
    runs of several methods and seeds) reads the targets the others computed."""
    key = (str(Path(cache_dir).resolve()) if cache_dir else None, int(max_mb * 2 ** 20))
    if key not in _SHARED:
        _SHARED[key] = TargetCache(max_mb, cache_dir)
    return _SHARED[key]
