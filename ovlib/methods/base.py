"""What a distillation method supplies to the shared trainer (:mod:`ovlib.train.distill`).

A method is an ``nn.Module`` (:class:`Distiller`) that owns the trainable student CLIP and any extra modules
of its own (a Refiner, HSG gates, ...); its ``forward(batch)`` returns the **unweighted** loss terms as a dict.
The trainer weights them with ``DistillConfig.loss_weights`` (missing names weigh 1.0), sums, and handles
everything else: DDP, AMP, accumulation, optimiser, schedule, checkpoints, the alpha ensemble.

Frozen networks the method reads — the teacher CLIP, the VFM, the text tower — are held in
:attr:`Distiller.frozen`, a plain dict that is *not* registered as submodules, so DDP neither broadcasts
nor synchronises them and the student's ``state_dict`` stays the student's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import torch
from torch import nn


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
                 categories: Optional[list[dict]] = None, **options: Any):
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
