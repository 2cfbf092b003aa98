"""One F-ViT per backbone and seed, trained (or loaded from its cache) and evaluated as a self-contained job.

Chapter 06 trains a detector on each frozen backbone (the CLIP and every student seed) and evaluates it under
several sets of class names. Those runs are independent, so :func:`run_detector_jobs` spreads them over worker
processes (:func:`ovlib.parallel.map_processes`): on two cores two one-thread detectors side by side beat one
two-thread detector after the other (``benchmarks/bench_detector.py`` measures both). A :class:`DetectorJob`
carries everything its run needs (the frozen tower itself, the training data, the text embeddings); its result
does not depend on the process that ran it, up to the floating-point order of its threads, and the trained
detector is cached on disk under ``cache_dir`` exactly as :func:`ovlib.train.detect.train_detector` caches it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ovlib.data.detection import DetectionDataset, VocabSplit
from ovlib.eval.detection import DetectionEval, evaluate_vocabularies
from ovlib.parallel import map_processes
from ovlib.train.detect import DetectorTrainConfig, train_detector

__all__ = ["DetectorJob", "DetectorResult", "run_detector_job", "run_detector_jobs"]


@dataclass
class DetectorJob:
    """One detector: train ``cfg`` on the frozen ``clip`` with the base ``text (C_base, D)`` and ``background (D,)``,
    then evaluate it on ``eval_root/split`` under each of ``vocabularies`` (name -> ``(text (C, D), background (D,),
    novel (C,))`` of ``vocab.vocab``). ``constructor``: a student's own dense map (DenseRC's HSG module, called as
    ``constructor(adapter, images, normalize=True)``) in place of the CLIP's dense mode."""

    name: str
    cfg: DetectorTrainConfig
    clip: nn.Module
    dataset: DetectionDataset
    text: torch.Tensor
    background: torch.Tensor
    cache_dir: str
    eval_root: str
    split: str
    vocab: VocabSplit
    vocabularies: Mapping[str, tuple]
    constructor: nn.Module | None = None
    max_images: int | None = None
    score_lo: float = 0.01
    n_boot: int = 1000
    eval_seed: int = 0
    device: str = "cpu"


@dataclass
class DetectorResult:
    """``info``: :func:`train_detector`'s (history, train_seconds, loaded, path); ``evals``: one
    :class:`DetectionEval` per vocabulary; ``threads``: torch threads of the process that ran the job."""

    name: str
    info: dict
    evals: dict[str, DetectionEval] = field(default_factory=dict)
    threads: int = 0


class _ConstructorMap:
    """A student's dense map as :data:`ovlib.methods.fvit.DenseFn` (a picklable callable, not a closure)."""

    def __init__(self, constructor: nn.Module):
        self.constructor = constructor

    def __call__(self, adapter, images: torch.Tensor) -> torch.Tensor:
        return self.constructor(adapter, images, normalize=True)  # (B, C, h, w)


def run_detector_job(job: DetectorJob) -> DetectorResult:
    """Train (or load) and evaluate the detector of ``job``."""
    dev = torch.device(job.device)
    dense_fn = None
    if job.constructor is not None:
        dense_fn = _ConstructorMap(job.constructor.to(dev).eval())
    det, info = train_detector(job.cfg, job.clip.to(dev), job.dataset, job.text, job.background,
                               Path(job.cache_dir), dev, progress=False, dense_fn=dense_fn)
    evals = evaluate_vocabularies(det, job.eval_root, job.split, job.vocab, dict(job.vocabularies),
                                  max_images=job.max_images, device=dev, name=job.name, score_lo=job.score_lo,
                                  n_boot=job.n_boot, seed=job.eval_seed)
    return DetectorResult(job.name, info, evals, torch.get_num_threads())


def run_detector_jobs(jobs: Sequence[DetectorJob], workers: int = 1) -> list[DetectorResult]:
    """:func:`run_detector_job` of every job, in ``workers`` processes sharing this process's threads (``<= 1``:
    here, one after the other); results in job order."""
    if workers > 1 and any(torch.device(j.device).type != "cpu" for j in jobs):
        raise ValueError("run_detector_jobs: worker processes are for CPU runs (one accelerator: workers=1)")
    return map_processes(run_detector_job, jobs, workers, label=lambda j: j.name)
