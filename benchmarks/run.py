"""All benchmarks in one run: one markdown table on stdout and ``benchmarks/results.json``.

    python benchmarks/run.py                         # every section, --repeats 5 (minutes on 2 idle CPU cores)
    python benchmarks/run.py --quick                 # fewer repeats and smaller inputs (a smoke test)
    python benchmarks/run.py --only methods,memory   # some sections
    python benchmarks/run.py --vit-b                 # also a random ViT-B/16 at a small input (slow on CPU)
    python benchmarks/run.py --out /tmp/bench.json

Sections (``--only``):

* ``microworld`` -- micro-world generation on one thread: full 64-px and 160-px scenes (masks, boxes, segments)
  and the 64-px pre-training stream items (the stream options of ``pretrain_configs("micro")``), scenes/s of
  wall-clock time per block of scenes and of this process's CPU time (the one to read on a loaded machine).
  Target: >= 300 full 64-px scenes/s.
* ``pretrain`` -- real ``pretrain_clip`` runs with the micro config (``pretrain_configs("micro")``, whatever its
  current defaults, with the step budget replaced) into temporary caches, ``--repeats`` rounds of the paths of
  ``bench_pretrain.PIPELINE_VARIANTS`` back to back: samples/s of the steps after the first with the scenes
  rendered in the loop and the text tower over all 32 positions (``inline``, the old path), and with
  pre-rendered shards (the optimiser loop alone, and with the run's shard rendering charged to its steps) with
  the full and with the trimmed text context (``text_context``; shards + trim is the new default), the per-round
  ratios new / old (target >= 2x) and trimmed / full, the fp32 and bf16 matmul peaks measured in the same run
  (``matmul_peak``, repeated), and MFU = samples/s x ``clip_train_flops_per_sample`` (the text tower at the
  positions the path computes) / median peak, against both peaks.
* ``methods`` -- one training step (the trainer's own ``_loss``: autocast as the recipe's ``amp``, weighted sum
  of the method's loss terms; backward; the trainer's AdamW step) of every method of ``ovlib.methods.METHODS``
  on the same synthetic batch with the same random micro CLIP student, micro VFM and (for ``rsc-clipself``,
  ``rsc-v``) an untrained Refiner of the recipe's architecture; loss weights and method options from the micro
  profile's recipes. Each method is timed against plain ``clipself`` in alternating pairs (clipself, M, clipself,
  M, ...) after a warm-up, and the figure is the per-pair ratio step(M) / step(clipself); ``clipself /
  clipself`` (the same step twice) shows the noise floor of the pairing; SynCLIP is also paired with DeCLIP
  (the recipe's, ``qq``) directly. Targets: SC-CLIPSelf and R-SC-CLIPSelf <= 1.25x; DeCLIP and SynCLIP <= 1.3x
  CLIPSelf (issue 22) and SynCLIP / DeCLIP <= 1.3x; DenseRC <= 1.05x (where ``METHODS`` has it). Every method runs
  with the trainer's teacher-target cache (``DistillConfig.teacher_cache``, the default; the batch is fixed, so
  after the warm-up every frozen output is a hit: the steady state of a run that has seen its images, and the
  cost of a step whose targets another run computed) and, with ``--teacher-cache both`` (default), again without
  it (figures named ``... (no teacher cache)``, no targets): every frozen network runs on every step.
* ``dense`` -- ``dense_features`` per mode / ``encode_image`` of the same random micro CLIP on the same batch,
  round-robin, per-round ratios, under ``torch.no_grad``. Target: ``x+v`` <= 1.05x.
* ``detector`` -- chapter 06's detector phase (``bench_detector``): the same micro F-ViT jobs (train + evaluate)
  one after the other in this process on every thread, and in two worker processes sharing the threads
  (``ovlib.parallel``), back to back per round; their per-round ratio says whether ``workers: 2`` pays.
* ``runs`` -- the chapters' distillation runs (``bench_runs``): the same batch of CLIPSelf and DeCLIP runs through
  ``Study.run_many`` with ``workers: 1`` (here, every thread) and ``workers: 2`` (two one-thread processes), back
  to back per round; their per-round ratio says whether the chapters' ``workers: 2`` pays.
* ``memory`` -- peak resident memory *added* by loss + backward at a ``--grid`` x ``--grid`` token grid (64 x 64 =
  4096 tokens): global SCD naive vs chunked (``--chunk`` rows) on unit tokens of ``--dim`` channels, and
  DeCLIP/SynCLIP's context loss (no chunked path exists) on ``q`` of the same width; each measurement in a
  freshly forked child of a process that only imported torch and ovlib (Linux ``VmHWM`` reset through
  ``/proc/self/clear_refs``: what the allocator really touched, not an estimate), plus the loss + backward time.

Every figure is the median of ``n`` repeated measurements with the spread given as min-max (``_common.SPREAD``).
No assertions: timing targets are printed beside the figures with a verdict computed from the measured range
("met": the whole min-max range meets the target; "met at median"; "missed at median"; "missed").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _common import SPREAD, machine_info, paired_ratios, summarize, verdict  # noqa: E402 (after the sys.path lines)

SECTIONS = ("microworld", "pretrain", "methods", "dense", "memory", "detector", "runs")
DEFAULT_OUT = HERE / "results.json"
SCHEMA = 1


# ------------------------------------------------------------------------------------------------ figures
class Figures:
    """Collects figures: ``add(section, name, samples, unit, target=..., higher_is_better=..., note=...)``."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def add(self, section: str, name: str, samples, unit: str, target: float | None = None,
            higher_is_better: bool = False, note: str = "", **extra: Any) -> dict[str, Any]:
        s = summarize(samples)
        row = {"section": section, "name": name, "unit": unit, **s,
               "target": None if target is None else {"value": target, "op": ">=" if higher_is_better else "<="},
               "verdict": verdict(s, target, higher_is_better), "note": note, **extra}
        self.rows.append(row)
        return row


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| section | figure | median | spread (min-max) | n | unit | target | verdict |\n"
            "|---|---|---:|---|---:|---|---|---|")
    lines = [head]
    for r in rows:
        tgt = f"{r['target']['op']} {r['target']['value']:g}" if r["target"] else ""
        lines.append(f"| {r['section']} | {r['name']} | {_fmt(r['median'])} | {_fmt(r['min'])}-{_fmt(r['max'])} | "
                     f"{r['n']} | {r['unit']} | {tgt} | {r['verdict']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- sections
def section_microworld(a, F: Figures) -> dict:
    """Scenes/s on one thread (numpy BLAS and torch limited to one thread for the section)."""
    import torch
    from bench_microworld import block_rates
    from threadpoolctl import threadpool_limits

    from ovlib.data.microworld import MicroWorld, MicroWorldStream
    from ovlib.train.pretrain import pretrain_configs

    clip_cfg, _ = pretrain_configs("micro")
    views = {k: getattr(clip_cfg, k) for k in ("object_views", "view_render_size", "view_context")
             if hasattr(clip_cfg, k)}
    n64, n160 = (40, 10) if a.quick else (150, 40)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            world = MicroWorld(seed=0)
            cases = [("full scene 64 px", lambda i: world.sample(i, 64), n64, 300.0),
                     ("full scene 160 px", lambda i: world.sample(i, 160), n160, None)]
            stream = MicroWorldStream(world, size=clip_cfg.image_size, **views)
            cases.append((f"pre-training stream item {clip_cfg.image_size} px", stream.item, n64, None))
            for name, fn, per_block, target in cases:
                wall, cpu = block_rates(fn, per_block * a.repeats, a.repeats, warmup=5 if a.quick else 20)
                F.add("microworld", f"{name}, wall", wall, "scenes/s", target, higher_is_better=True,
                      note=f"{per_block} scenes per block, 1 thread")
                F.add("microworld", f"{name}, CPU time", cpu, "scenes/s", target, higher_is_better=True,
                      note=f"{per_block} scenes per block, 1 thread, process CPU time")
    finally:
        torch.set_num_threads(threads)
    return {"stream_views": {k: list(v) if isinstance(v, tuple) else v for k, v in views.items()}}


def section_pretrain(a, F: Figures) -> dict:
    import torch
    from bench_pretrain import PIPELINE_VARIANTS, pipeline_rounds

    from ovlib.train.pretrain import clip_train_flops_per_sample, matmul_peak, pretrain_configs

    base, _ = pretrain_configs("micro")
    block = 3  # timed steps per run (after a warm-up step that also renders the shards)
    if a.quick:
        base = dataclasses.replace(base, batch_size=32)
    sec = 0.2 if a.quick else 0.5
    p32 = [matmul_peak(torch.float32, seconds=sec) for _ in range(a.repeats)]
    p16 = [matmul_peak(torch.bfloat16, n=512, seconds=sec) for _ in range(a.repeats)]
    r = pipeline_rounds(base, a.repeats, block, log=a.log)
    from ovlib.models import load_clip

    model, tok, _ = load_clip(base.model, seed=0)
    trim_len = round(summarize(r["text_len"])["median"])  # text positions the trimmed runs' timed steps computed
    fps = {"full": clip_train_flops_per_sample(model, tok, base.image_size),
           "trim": clip_train_flops_per_sample(model, tok, base.image_size, text_len=trim_len)}
    m32, m16 = summarize(p32)["median"], summarize(p16)["median"]
    prec = "bf16 autocast" if all(r["bf16"]) else "fp32" if not any(r["bf16"]) else "mixed"
    threads = torch.get_num_threads()
    F.add("pretrain", "fp32 matmul peak (1024^3)", [p / 1e9 for p in p32], "GFLOP/s",
          note=f"matmul_peak, {threads} threads")
    F.add("pretrain", "bf16 matmul peak (512^3)", [p / 1e9 for p in p16], "GFLOP/s",
          note=f"matmul_peak, {threads} threads")
    common = f"batch {base.batch_size}, {block} steps after step 1 of a fresh pretrain_clip run, {prec}"
    F.add("pretrain", "micro CLIP pre-training, inline data, full text (old)", r["inline"], "samples/s",
          note=f"{common}; scenes rendered in the loop (data_pipeline='inline'), text_context='full'")
    for name, what in (("shards-full", "full text"), ("shards", "trimmed text (new)")):
        F.add("pretrain", f"micro CLIP pre-training, shards, {what}: optimiser loop", r[name], "samples/s",
              note=f"{common}; pre-rendered shards read back, text_context={PIPELINE_VARIANTS[name][1]!r}")
        F.add("pretrain", f"micro CLIP pre-training, shards incl. rendering, {what}", r[f"{name}+render"],
              "samples/s", note=f"{common}; the run's shard rendering ({_threads_note(threads)}, process start "
                                "included) charged to its steps")
    F.add("pretrain", "new / old end to end (shards incl. rendering, trimmed text / inline, full text)",
          paired_ratios(r["shards+render"], r["inline"]), "x", target=2.0, higher_is_better=True,
          note="per round, the runs back to back")
    F.add("pretrain", "new optimiser loop / old (shards, trimmed text / inline, full text)",
          paired_ratios(r["shards"], r["inline"]), "x",
          note="per round: the ceiling when rendering is free (cached shards)")
    F.add("pretrain", "trimmed / full text (both shards, optimiser loop)", paired_ratios(r["shards"], r["shards-full"]),
          "x", note=f"per round; the timed batches' captions end by position {trim_len} (mean) of {tok(['']).shape[1]}")
    for label, key, text in (("inline, full text (old)", "inline", "full"),
                             ("shards incl. rendering, trimmed text (new)", "shards+render", "trim")):
        for pname, peak in (("fp32", m32), ("bf16", m16)):
            F.add("pretrain", f"MFU {label} vs {pname} matmul peak", [100 * s * fps[text] / peak for s in r[key]],
                  "%", note=f"{fps[text] / 1e6:.1f} MFLOP/sample (3x forward matmuls, text over "
                            f"{'all' if text == 'full' else trim_len} positions) / median {pname} peak")
    return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(base).items()},
            "flops_per_sample": fps, "text_len": trim_len, "bf16": prec, "block": block, "render_s": r["render_s"]}


def _threads_note(threads: int) -> str:
    from ovlib.train.pretrain import _shard_processes

    return f"{_shard_processes()} render processes x 1 thread, then {threads} torch threads"


# -------------------------------------------------------------------------------------------- methods
@dataclasses.dataclass
class MethodBench:
    """One backbone setting of the ``methods`` section."""

    label: str
    backbone: str            # micro config or open_clip name
    profile: str             # whose recipes give loss weights / method options / amp
    image_size: int          # student images (px)
    crop_size: int           # teacher crops (px) = the CLIP's native size
    batch: int
    boxes: int               # boxes per image
    refiner: dict            # Refiner architecture for rsc-clipself / rsc-v (others take it from the recipe)


def _categories():
    from ovlib.data.microworld import MicroWorld

    world = MicroWorld(seed=0)
    return [{"id": c.id, "name": c.name, "synonyms": list(c.synonyms), "definition": c.definition}
            for c in world.classes]


def synthetic_batch(B: int, S: int, K: int, crop: int, vfm_size: int, cat_ids: list[int], seed: int = 0) -> dict:
    """A ``collate_regions``-shaped batch every method accepts: images (B,3,S,S), K boxes per image (xyxy px),
    (B*K,3,crop,crop) crops, region labels and per-image label sets from ``cat_ids``, image ids, VFM images."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, K, 2, generator=g) * S * 0.6
    wh = S * 0.08 + torch.rand(B, K, 2, generator=g) * S * 0.3
    def pick(n):
        return [cat_ids[int(i)] for i in torch.randint(len(cat_ids), (n,), generator=g)]

    return {"images": torch.randn(B, 3, S, S, generator=g),
            "boxes": [torch.cat([xy[b], (xy[b] + wh[b]).clamp(max=S)], 1) for b in range(B)],
            "crops": torch.randn(B * K, 3, crop, crop, generator=g),
            "labels": torch.tensor(pick(B * K)),
            "image_labels": [torch.tensor(sorted(set(pick(4)))) for _ in range(B)],
            "image_ids": torch.arange(B),
            "vfm_images": torch.randn(B, 3, vfm_size, vfm_size, generator=g)}


def _build_clip(name: str, size: int):
    """Random-init CLIP (eval) and tokenizer; open_clip models built for ``size`` px."""
    if name.startswith("micro"):
        from ovlib.models import load_clip

        model, tok, _ = load_clip(name, seed=0)
        return model, tok
    import open_clip
    import torch

    torch.manual_seed(0)
    return open_clip.create_model(name, force_image_size=size).eval(), open_clip.get_tokenizer(name)


def method_steps(spec: MethodBench, methods: list[str], repeats: int, device: str = "cpu",
                 log: Callable[[str], None] = print, teacher_cache: bool = True) -> dict[str, Any]:
    """Paired step times: for each method M (in turn, so at most three students live at once), ``repeats``
    rounds of (clipself step, M step) after one warm-up step of each, then (declip, synclip) likewise. Returns,
    keyed by ``M`` (or ``"synclip/declip"``), lists of wall and process-CPU seconds of M and of its base, and the
    per-round ratios."""
    import torch

    from ovlib import config as params_lib
    from ovlib.methods import get_method
    from ovlib.methods.refiner import Refiner
    from ovlib.models import load_vfm, vit_adapter
    from ovlib.train.distill import Trainer, _to_device, dist_info, lock_visual
    from ovlib.train.recipes import distill_config

    params = params_lib.resolve(spec.profile, root=ROOT)
    dev = torch.device(device)
    info = dist_info(device)
    cats = _categories()
    base, tok = _build_clip(spec.backbone, spec.crop_size)
    teacher = copy.deepcopy(base).eval().requires_grad_(False).to(dev)
    vfm = load_vfm("micro-vfm", seed=1, device=dev)
    grid = spec.image_size // vit_adapter(base).patch_size[0]
    vfm_size = grid * int(vfm.patch_embed.patch_size[0])
    batch = _to_device(synthetic_batch(spec.batch, spec.image_size, spec.boxes, spec.crop_size, vfm_size,
                                       [c["id"] for c in cats]), dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    tmp = tempfile.mkdtemp(prefix="ovbook-bench-methods-")  # run dirs of the configs (the trainer writes nothing)

    def make(method: str):
        cfg = distill_config(params, method, {"backbone": spec.backbone, "batch_size": spec.batch,
                                              "max_steps": 10 ** 6, "warmup_steps": 1, "device": device,
                                              "student_size": spec.image_size, "crop_size": spec.crop_size,
                                              "teacher_cache": teacher_cache},
                             out_dir=os.path.join(tmp, method))
        student = copy.deepcopy(base).to(dev)
        lock_visual(student, cfg.unlocked_blocks)
        margs = dict(cfg.method_args)
        if method in ("rsc-clipself", "rsc-v"):
            margs["refiner"] = Refiner(teacher, **spec.refiner)
        if method in ("refiner", "rsc-e2e") and spec.profile != "micro":
            margs.update(spec.refiner)
        frozen = {"teacher": teacher}
        if "vfm" in get_method(method).needs:
            frozen["vfm"] = vfm
        distiller = get_method(method)(student, frozen, tokenizer=tok, categories=cats, **margs)
        tr = Trainer(cfg, distiller, [None] * spec.batch, lambda x: x, info=info)
        tr.method.train()

        def step():
            total, _ = tr._loss(batch)
            total.backward()
            tr.opt.step()
            tr.opt.zero_grad(set_to_none=True)

        return step

    def timed(step):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    try:
        return _paired(make, timed, methods, repeats, spec.label + ("" if teacher_cache else " (no teacher cache)"),
                       log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _paired(make, timed, methods, repeats, label, log) -> dict[str, Any]:
    """The pairing loop of :func:`method_steps` (``make(name)`` -> step callable; ``timed(step)`` -> wall, CPU):
    every method against ``clipself`` (kept alive throughout), then ``synclip`` against ``declip`` directly."""
    pairs = [("clipself", m) for m in methods]
    if "declip" in methods and "synclip" in methods:
        pairs.append(("declip", "synclip"))
    live = {"clipself": make("clipself")}
    live["clipself"]()
    out: dict[str, Any] = {}
    for base, m in pairs:
        t_load = time.perf_counter()
        live = {k: v for k, v in live.items() if k in ("clipself", base)}  # at most three students alive
        if base not in live:
            live[base] = make(base)
            live[base]()
        ref = live[base]
        step = ref if m == base else make(m)
        step()  # warm-up (also fills text caches: one-off costs)
        w_ref, w_m, c_ref, c_m = [], [], [], []
        for _ in range(repeats):
            w, c = timed(ref)
            w_ref.append(w)
            c_ref.append(c)
            w, c = timed(step)
            w_m.append(w)
            c_m.append(c)
        key = m if base == "clipself" else f"{m}/{base}"
        out[key] = {"wall_s": w_m, "base": base, "base_wall_s": w_ref, "cpu_s": c_m, "base_cpu_s": c_ref,
                    "ratio": paired_ratios(w_m, w_ref), "cpu_ratio": paired_ratios(c_m, c_ref)}
        log(f"  {label} {m}: median step {summarize(w_m)['median'] * 1e3:.0f} ms, "
            f"x{summarize(out[key]['ratio'])['median']:.2f} {base} ({time.perf_counter() - t_load:.0f} s)")
        del step, ref
    return out


#: step(M) / step(clipself) targets: issue 13 (SC-/R-SC-CLIPSelf), issue 9 (DenseRC); SynCLIP / DeCLIP <= 1.3 apart.
TARGETS = {"sc-clipself": 1.25, "rsc-clipself": 1.25, "declip": 1.3, "synclip": 1.3, "denserc": 1.05}


def _method_specs(a) -> list[MethodBench]:
    if a.quick:
        specs = [MethodBench("micro", "micro-clip", "micro", 64, 64, 2, 2,
                             {"num_blocks": 2, "inter_layers": (1, 2), "hidden": 512})]
    else:
        specs = [MethodBench("micro", "micro-clip", "micro", 160, 64, 8, 10,
                             {"num_blocks": 2, "inter_layers": (1, 2), "hidden": 512})]
    if a.vit_b:  # the paper's Refiner (K=4 blocks, layers 4 and 7); images twice the (reduced) native size
        specs.append(MethodBench("ViT-B/16", "ViT-B-16", "paper", *((112, 112, 1, 2) if a.quick else (224, 112, 2, 4)),
                                 {"num_blocks": 4, "inter_layers": (4, 7), "hidden": 4096}))
    return specs


def section_methods(a, F: Figures) -> dict:
    from ovlib.methods import METHODS

    names = list(METHODS)
    meta = {}
    variants = {"both": (True, False), "on": (True,), "off": (False,)}[a.teacher_cache]
    for spec, cache in ((spec, cache) for spec in _method_specs(a) for cache in variants):
        res = method_steps(spec, names, a.repeats, log=a.log, teacher_cache=cache)
        where = (f"{spec.label} at {spec.image_size} px, batch {spec.batch} x {spec.boxes} boxes, "
                 f"{spec.crop_size}-px crops, teacher cache {'on (every frozen output a hit)' if cache else 'off'}")
        tag = "" if cache else " (no teacher cache)"
        for m in names:
            F.add("methods", f"{spec.label} {m}: step time{tag}", res[m]["wall_s"], "s", note=where)
        for key, r in res.items():
            m, base = key.split("/")[0], r["base"]
            name = (f"{spec.label} clipself / clipself (noise floor){tag}" if m == base
                    else f"{spec.label} {m} / {base}{tag}")
            target = 1.3 if (m, base) == ("synclip", "declip") else TARGETS.get(m) if base == "clipself" else None
            target = target if cache else None  # the targets are of the trainer's default (cached) step
            F.add("methods", name, r["ratio"], "x", target,
                  note="paired per-round wall-time ratio (alternating steps); " + where,
                  cpu_ratio=summarize(r["cpu_ratio"]),
                  ratio_of_medians=summarize(r["wall_s"])["median"] / summarize(r["base_wall_s"])["median"])
        meta[spec.label] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()}
    return {"settings": meta, "declip_recipe_mode": "recipe method_args (micro: qq)"}


def section_dense(a, F: Figures) -> dict:
    import torch
    from bench_dense import build_model, make_call, round_robin

    from ovlib.models.dense import DENSE_MODES

    runs = [("micro CLIP", "micro-clip", 64 if a.quick else 160, 2 if a.quick else 4)]
    if a.vit_b:
        runs.append(("ViT-B/16", "ViT-B-16", 112 if a.quick else 224, 1))
    meta = {}
    for label, name, size, batch in runs:
        model = build_model(name, size)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        calls = {c: make_call(model, c, x) for c in ("encode_image", *DENSE_MODES)}
        times = round_robin(calls, a.repeats)
        where = f"{label} at {size} px, batch {batch}, no_grad, round-robin"
        F.add("dense", f"{label} encode_image time", times["encode_image"], "s", note=where)
        for c in DENSE_MODES:
            F.add("dense", f"{label} dense_features({c}) / encode_image",
                  paired_ratios(times[c], times["encode_image"]), "x", 1.05 if c == "x+v" else None,
                  note="per-round ratio; " + where)
        meta[label] = {"model": name, "size": size, "batch": batch}
    return meta


def section_memory(a, F: Figures) -> dict:
    from bench_scd import MemoryServer, memory_subprocess

    grid, dim, chunk = a.grid, a.dim, a.chunk
    cases = ("naive", "chunked", "context")
    runs: list[dict] = []
    can_fork = hasattr(os, "fork")
    if can_fork:
        with MemoryServer() as ms:
            runs = [ms.measure(c, grid, dim, chunk) for _ in range(a.repeats) for c in cases]
    else:
        runs = [memory_subprocess(c, grid, dim, chunk) for _ in range(a.repeats) for c in cases]
    res = {c: [r for r in runs if r["case"] == c] for c in cases}
    where = f"{grid}x{grid} grid (L={grid * grid}), D={dim}, loss+backward"
    label = {"naive": "SCD naive", "chunked": f"SCD chunked ({chunk} rows)", "context": "context loss (naive only)"}
    peak = {c: [r["peak_added_mib"] for r in rs] for c, rs in res.items()}
    for c, p in peak.items():
        F.add("memory", f"{label[c]}: peak added", p, "MiB", note=where + ", VmHWM of a fresh child")
    F.add("memory", "SCD naive / chunked peak", paired_ratios(peak["naive"], peak["chunked"]), "x", note=where)
    for c, rs in res.items():
        F.add("memory", f"{label[c]}: time", [r["time_s"] for r in rs], "s", note=where)
    return {"grid": grid, "dim": dim, "chunk": chunk, "fresh": "forked child" if can_fork else "subprocess",
            "losses": {c: rs[0]["loss"] for c, rs in res.items()}}


def _serial_vs_workers(F: Figures, section: str, r: dict[str, list[float]], what: str, where: str, started: str,
                       who: str) -> int:
    """The three figures of a serial-vs-worker-processes section: both wall times and their per-round ratio."""
    import torch

    threads = torch.get_num_threads()
    F.add(section, f"one process x {threads} threads, one {what} after the other", r["serial"], "s", note=where)
    F.add(section, f"2 processes x {max(1, threads // 2)} thread(s), side by side", r["workers"], "s",
          note=where + f"; {started} included")
    F.add(section, "speed-up of the worker processes (serial / workers)", paired_ratios(r["serial"], r["workers"]),
          "x", higher_is_better=True, note=f"per round, back to back; > 1: {who} `workers: 2` pays")
    return threads


def section_detector(a, F: Figures) -> dict:
    from bench_detector import rounds

    n_jobs, steps = (2, 3) if a.quick else (4, 20)
    r = rounds(a.repeats, n_jobs, steps, log=a.log)
    where = f"{n_jobs} micro F-ViT jobs x ({steps} steps + 8 evaluation images), random micro CLIP"
    threads = _serial_vs_workers(F, "detector", r, "job", where, "process start", "chapter 06's")
    return {"jobs": n_jobs, "steps": steps, "threads": threads}


def section_runs(a, F: Figures) -> dict:
    from bench_runs import rounds

    seeds, steps = (1, 2) if a.quick else (2, 30)
    r = rounds(a.repeats, seeds=seeds, steps=steps, log=a.log)
    where = f"CLIPSelf and DeCLIP x {seeds} seed(s) x {steps} steps (micro recipes, micro CLIP)"
    threads = _serial_vs_workers(F, "runs", r, "run", where, "process start and cache warm-up", "the chapters'")
    return {"seeds": seeds, "steps": steps, "threads": threads}


RUNNERS = {"microworld": section_microworld, "pretrain": section_pretrain, "methods": section_methods,
           "dense": section_dense, "memory": section_memory, "detector": section_detector,
           "runs": section_runs}


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=None, help="repeated measurements per figure (default 5; "
                                                               "--quick: 2)")
    p.add_argument("--quick", action="store_true", help="few repeats and small inputs (a smoke test)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--vit-b", action="store_true", help="also a random ViT-B/16 at a small input (methods, dense)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results file (JSON)")
    p.add_argument("--grid", type=int, default=64, help="memory section: token grid side")
    p.add_argument("--dim", type=int, default=512, help="memory section: channels (ViT-B/16's projected width)")
    p.add_argument("--chunk", type=int, default=256, help="memory section: rows per block of chunked SCD")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--teacher-cache", choices=("both", "on", "off"), default="both",
                   help="methods section: steps with the trainer's teacher-target cache, without it, or both")
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = sorted(set(a.sections) - set(SECTIONS))
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
    if a.repeats is None:
        a.repeats = 2 if a.quick else 5
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    return a


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    a = parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    a.log = lambda msg: print(msg, file=sys.stderr, flush=True)
    t_all = time.perf_counter()
    machine = machine_info()
    F = Figures()
    meta: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for s in SECTIONS:
        if s not in a.sections:
            continue
        a.log(f"[{s}] ...")
        t0 = time.perf_counter()
        meta[s] = RUNNERS[s](a, F)
        seconds[s] = time.perf_counter() - t0
        a.log(f"[{s}] {seconds[s]:.0f} s")
    machine["loadavg_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    result = {"schema": SCHEMA, "machine": machine,
              "args": {k: v for k, v in vars(a).items() if k not in ("log",)},
              "spread": SPREAD, "sections": {s: {"seconds": seconds[s], "meta": meta[s]} for s in seconds},
              "figures": F.rows, "wall_s": time.perf_counter() - t_all}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, out)
    print(f"Benchmarks on {machine['cpu']} ({machine['cores']} cores, torch {machine['torch']}, "
          f"{machine['torch_threads']} threads), {machine['date']}; load average {machine['loadavg_start']} -> "
          f"{machine['loadavg_end']}; median of n runs, spread {SPREAD}.")
    if max(machine["loadavg_start"] or 0, machine["loadavg_end"] or 0) > (machine["cores"] or 1):
        print("Note: the load average exceeded the number of cores: other processes competed for the CPU during "
              "this run, so absolute timings are pessimistic and spreads wide.")
    print()
    print(markdown_table(F.rows))
    print(f"\nwall time {result['wall_s']:.0f} s; written {out}")
    return result


if __name__ == "__main__":
    main()
