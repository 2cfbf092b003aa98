"""What a distillation method supplies to the shared trainer (:mod:`ovlib.train.distill`).

A method is an ``nn.Module`` (:class:`Distiller`) that owns the trainable student CLIP and any extra modules
of its own (a Refiner, HSG gates, ...); its ``forward(batch)`` returns the **unweighted** loss terms as a dict.
The trainer weights them with ``DistillConfig.loss_weights`` (missing names weigh 1.0), sums, and handles
everything else: DDP, AMP, accumulation, optimiser, schedule, checkpoints, the alpha ensemble.

Frozen networks the method reads — the teacher CLIP, the VFM, the text tower — are held in
:attr:`Distiller.frozen`, a plain dict that is *not* registered as submodules, so DDP neither broadcasts
nor synchronises them and the student's ``state_dict`` stays the student's.

A method runs a frozen network through :meth:`Distiller.frozen_call` (a batch of independent rows) or
:meth:`Distiller.frozen_rows` (rows with keys of its own, e.g. (image, box) pairs): without a cache these simply
compute; the trainer attaches its teacher-target cache (:class:`ovlib.train.targets.TargetCache`, duck-typed
here so that methods import nothing of the trainer) as :attr:`Distiller.target_cache`, and the outputs are then
computed once per row and reused (``DistillConfig.teacher_cache``). Either way the frozen network runs on
fixed-size chunks (:attr:`Distiller.teacher_chunk_px` pixels of input per call, :func:`run_chunked`), so a
row's output does not
depend on which rows share its batch and a cached row equals a recomputed one bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn


def run_chunked(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, chunk: int) -> Any:
    """``fn(x)`` for a batch ``x (N, ...)`` of independent rows, computed ``chunk`` rows at a time; the last chunk
    is padded with copies of its last row (their outputs dropped), so every call of ``fn`` sees exactly ``chunk``
    rows. Kernels pick their blocking from the problem size, so a row's output can differ at float rounding
    between batch sizes (e.g. a micro-CLIP crop encoded alone vs among twelve) but not between batches of the
    same size: with a fixed chunk, a row's output is a function of the row alone. ``chunk <= 0``: ``fn(x)``.
    ``fn`` returns a tensor or a tuple of tensors with leading dimension N."""
    n = x.shape[0]
    if chunk <= 0 or n == chunk:
        return fn(x)
    outs = []
    for s in range(0, n, chunk):
        part = x[s:s + chunk]
        m = part.shape[0]
        if m < chunk:
            part = torch.cat([part, part[-1:].expand(chunk - m, *part.shape[1:])])
        o = fn(part)
        outs.append(o[:m] if isinstance(o, torch.Tensor) else tuple(t[:m] for t in o))
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return tuple(torch.cat([o[i] for o in outs]) for i in range(len(outs[0])))


class Distiller(nn.Module):
    """Base class of every teacher-student method.

    Subclasses set :attr:`name`, :attr:`loss_names` and :attr:`needs` (subset of ``{"teacher", "vfm", "text"}``),
    and implement :meth:`forward`. ``tokenizer`` (of the frozen text tower) and ``categories`` (the training
    set's, with ``id`` and ``name``) are given by the launcher to every method; the rest of the options come
    from ``DistillConfig.method_args``.
    """

    name: ClassVar[str] = ""
    loss_names: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset({"teacher"})
    #: region pooling convention of the method's own evaluation (``ovlib.eval.region_cls.POOLINGS``):
    #: CLIPSelf's, unless a method pools unnormalised tokens (DeCLIP / SynCLIP)
    eval_pooling: ClassVar[str] = "normalize-then-pool"
    #: the typed options of the method (``DistillConfig.method_args``): one or more dataclasses whose fields,
    #: together, are every key the method accepts (:meth:`check_options`)
    option_types: ClassVar[tuple[type, ...]] = ()

    @classmethod
    def option_names(cls) -> list[str]:
        return sorted({f.name for t in cls.option_types for f in dataclasses.fields(t)})

    @classmethod
    def check_options(cls, method_args: dict[str, Any]) -> None:
        """An unknown ``method_args`` key is an error naming the method and the key (before anything is built)."""
        unknown = sorted(set(method_args) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"method {cls.name!r}: unknown method_args key(s) {unknown}; known: {cls.option_names()}")

    def __init__(self, student: nn.Module, frozen: dict[str, nn.Module], tokenizer: Any = None,
                 categories: list[dict] | None = None, **options: Any):
        super().__init__()
        if options:  # what a subclass did not take is not an option of the method
            raise TypeError(f"method {self.name!r}: unknown method_args key(s) {sorted(options)}; known: "
                            f"{self.option_names()}")
        self.student = student
        missing = sorted(self.needs - set(frozen))
        if missing:
            raise ValueError(f"method {self.name!r} needs frozen network(s) {missing}; got {sorted(frozen)}")
        for m in frozen.values():
            m.eval()
            m.requires_grad_(False)
        self.frozen = dict(frozen)
        self.tokenizer = tokenizer  # of the frozen text tower (methods that embed text)
        self.categories = list(categories or [])  # dataset categories: id, name (+ synonyms, definition)
        self.options: dict[str, Any] = {}
        self.target_cache: Any = None  # a TargetCache (set by the trainer) or None: frozen outputs are recomputed
        self.teacher_chunk_px = 32768  # input pixels per frozen-network call (DistillConfig.teacher_chunk_px)

    def chunk_rows(self, row_pixels: int) -> int:
        """Rows per frozen-network call for rows of ``row_pixels`` input pixels: ``teacher_chunk_px //
        row_pixels`` (at least 1; 0 = the whole batch). A function of the row's shape only, so fixed per kind
        (micro: 8 crops of 64 px, one 160-px image)."""
        if self.teacher_chunk_px <= 0:
            return 0
        return max(1, self.teacher_chunk_px // max(1, int(row_pixels)))

    def frozen_call(self, kind: str, net: nn.Module, fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
        """``fn(x)`` under ``torch.no_grad`` for a frozen ``net`` and a batch ``x (N, ...)`` of independent rows
        (``fn``'s output: a tensor or tuple of tensors with leading dimension N, row ``i`` a function of ``x[i]``
        only). ``kind`` names the function and every option it depends on. Run in chunks of
        :meth:`chunk_rows` rows (:func:`run_chunked`); cached per row when the trainer attached a cache."""
        chunk = self.chunk_rows(x.shape[-1] * x.shape[-2] if x.ndim >= 3 else 1)

        def compute(idx: list[int]) -> Any:
            return run_chunked(fn, x if len(idx) == x.shape[0] else x[idx], chunk)

        if self.target_cache is None:
            with torch.no_grad():
                return compute(list(range(x.shape[0])))
        return self.target_cache.rows(kind, net, self.target_cache.image_digests(x), compute, x.device)

    def frozen_rows(self, kind: str, net: nn.Module, n: int, digests: Callable[[], Sequence[str]],
                    compute: Callable[[list[int]], Any], device: torch.device) -> Any:
        """``n`` rows of a frozen ``net``'s output keyed by ``digests()`` (content keys, see
        :func:`ovlib.train.targets.row_digests`; called only with a cache); ``compute(indices)`` computes the
        listed rows in that order (all ``n`` of them without a cache), each a function of its row alone (compute
        in fixed-size chunks, :func:`run_chunked`)."""
        if self.target_cache is None:
            with torch.no_grad():
                return compute(list(range(n)))
        return self.target_cache.rows(kind, net, digests(), compute, device)

    def teacher_crop_cls(self, crops: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's CLS embedding ``(R, C)`` of each region crop ``(R, 3, c, c)`` (no grad; cached per
        crop by the trainer's teacher-target cache)."""
        teacher = self.frozen["teacher"]
        return self.frozen_call("clip.encode_image", teacher, teacher.encode_image, crops)

    def train(self, mode: bool = True):  # frozen networks stay in eval mode
        super().train(mode)
        for m in self.frozen.values():
            m.eval()
        return self

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def lr_multipliers(self) -> dict[str, float]:
        """``{module prefix: multiplier}`` of the learning rate for parameters under that prefix (the trainer's
        ``ovlib.train.optim.param_groups``); default: every parameter at the recipe's ``lr``."""
        return {}

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """What the checkpoint's ``model`` entry holds: the student CLIP (and the method's extra modules)."""
        return self.state_dict()
