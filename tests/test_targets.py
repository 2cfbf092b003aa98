"""The teacher-target cache (ovlib.train.targets): identical losses and gradients with and without it for every
method family, invalidation when a frozen network's weights change, corrupt files, and exact resume."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from ovlib.methods.base import run_chunked
from ovlib.methods.clipself import CLIPSelf
from ovlib.methods.declip import DeCLIP
from ovlib.methods.denserc import DenseRC
from ovlib.methods.refiner import Refiner
from ovlib.methods.rsc import RSCCLIPSelf, SCCLIPSelf
from ovlib.methods.synclip import SynCLIP
from ovlib.train.targets import TargetCache, fingerprint, row_digests
from tests.helpers.method_batches import micro_nets, synthetic_method_batch
from tests.helpers.synthetic_distill import build, small_config

CATS = [{"id": 1, "name": "dog", "synonyms": ["puppy"], "definition": "a domestic animal"},
        {"id": 2, "name": "cat", "synonyms": ["kitty"], "definition": "a small feline"},
        {"id": 5, "name": "car", "synonyms": ["automobile"], "definition": "a road vehicle"}]


@pytest.fixture(scope="module")
def nets():
    return micro_nets()


def _refiner(teacher):
    torch.manual_seed(3)
    ref = Refiner(teacher, num_blocks=1, inter_layers=None, hidden=32)
    for p in ref.parameters():  # a "trained" Refiner: its zero-initialised heads moved away from 0
        p.data.add_(0.05 * torch.randn_like(p))
    return ref


FAMILIES = {
    "clipself": lambda s, t, v, tok: CLIPSelf(s, {"teacher": t}),
    "sc-clipself": lambda s, t, v, tok: SCCLIPSelf(s, {"teacher": t}),
    "sc-clipself-global": lambda s, t, v, tok: SCCLIPSelf(s, {"teacher": t}, scd_scope="global"),
    "rsc-clipself": lambda s, t, v, tok: RSCCLIPSelf(s, {"teacher": t}, refiner=_refiner(t)),
    "rsc-clipself-global": lambda s, t, v, tok: RSCCLIPSelf(s, {"teacher": t}, refiner=_refiner(t),
                                                            scd_scope="global"),
    "declip": lambda s, t, v, tok: DeCLIP(s, {"teacher": t, "vfm": v}),
    "synclip": lambda s, t, v, tok: SynCLIP(s, {"teacher": t, "vfm": v}, tokenizer=tok, categories=CATS),
    "denserc": lambda s, t, v, tok: DenseRC(s, {"teacher": t, "vfm": v}),
}


def _encoder(teacher, chunk=4):
    return lambda x: run_chunked(teacher.encode_image, x, chunk)


def _batch(seed=0, B=2, K=3):
    return synthetic_method_batch(B, 32, K, seed, labels=(1, 2, 5, 1, 2, 5), image_labels=((1, 2), (5,)))


def _step(method, batch):
    """Loss terms and the gradients of their sum w.r.t. every trainable parameter."""
    method.zero_grad(set_to_none=True)
    terms = method(batch)
    sum(terms.values()).backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


def _same(a, b):
    (ta, ga), (tb, gb) = a, b
    assert ta.keys() == tb.keys() and ga.keys() == gb.keys() and ga
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])] + [k for k in ga if not torch.equal(ga[k], gb[k])]
    assert not bad, f"differ: {bad[:5]}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_steps_equal_uncached_steps(nets, family):
    student, teacher, vfm, tok = nets
    method = FAMILIES[family](copy.deepcopy(student), teacher, vfm, tok)
    method.train()
    batch = _batch()
    plain = _step(method, batch)
    cache = TargetCache(max_mb=64)
    method.target_cache = cache
    cold = _step(method, batch)  # every row a miss: the networks run on the whole batch, as without the cache
    assert cache.stats["hits"] == 0 and cache.stats["misses"] > 0 and len(cache) == cache.stats["misses"]
    warm = _step(method, batch)  # every row a hit: no frozen network runs
    assert cache.stats["hits"] == cache.stats["misses"]
    _same(plain, cold)
    _same(plain, warm)
    # a batch sharing its first image (and that image's crops and boxes) with the cached one: a mixed step
    other = _batch(seed=1)
    mixed = dict(other)
    mixed["images"] = torch.cat([batch["images"][:1], other["images"][1:]])
    mixed["vfm_images"] = torch.cat([batch["vfm_images"][:1], other["vfm_images"][1:]])
    mixed["boxes"] = [batch["boxes"][0], other["boxes"][1]]
    mixed["crops"] = torch.cat([batch["crops"][:3], other["crops"][3:]])
    hits = cache.stats["hits"]
    got = _step(method, mixed)
    assert cache.stats["hits"] > hits  # some rows came from the cache, the rest were computed
    method.target_cache = None
    _same(_step(method, mixed), got)  # rows computed in other batches: the same bits (fixed-size chunks)


def test_a_frozen_network_whose_weights_change_is_not_served_stale_targets(nets):
    student, teacher, _, _ = nets
    teacher = copy.deepcopy(teacher)
    method = CLIPSelf(copy.deepcopy(student), {"teacher": teacher})
    cache = TargetCache(max_mb=64)
    method.target_cache = cache
    crops = _batch()["crops"]
    before = method.teacher_crop_cls(crops)
    fp = cache.fingerprint(teacher)
    with torch.no_grad():  # in place, as load_state_dict does
        next(teacher.visual.parameters()).mul_(1.5)
    assert cache.fingerprint(teacher) != fp == fingerprint(copy.deepcopy(nets[1]))
    after = method.teacher_crop_cls(crops)
    assert cache.stats["hits"] == 0 and cache.stats["misses"] == 2 * crops.shape[0]
    method.target_cache = None
    assert torch.equal(after, method.teacher_crop_cls(crops)) and not torch.equal(before, after)
    # a checkpoint loaded into the tower (load_state_dict copies in place) invalidates as well
    method.target_cache = cache
    teacher.load_state_dict(nets[1].state_dict())
    assert cache.fingerprint(teacher) == fp
    assert torch.equal(method.teacher_crop_cls(crops), before) and cache.stats["hits"] == crops.shape[0]


def test_autocast_dtype_is_part_of_the_key(nets):
    _, teacher, _, _ = nets
    cache = TargetCache(max_mb=64)
    crops = _batch()["crops"]
    fp32 = cache.call("clip.encode_image", teacher, _encoder(teacher), crops)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = cache.call("clip.encode_image", teacher, _encoder(teacher), crops)
    assert cache.stats["hits"] == 0 and fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16


def test_run_chunked_pads_the_last_chunk_and_makes_rows_independent_of_their_batch(nets):
    _, teacher, _, _ = nets
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return x * 2, x.sum(dim=(1, 2, 3))

    x = torch.randn(7, 3, 2, 2)
    out = run_chunked(fn, x, 3)
    assert calls == [3, 3, 3] and torch.equal(out[0], 2 * x) and torch.equal(out[1], x.sum(dim=(1, 2, 3)))
    assert run_chunked(lambda t: t + 1, x, 0).shape == x.shape
    g = torch.Generator().manual_seed(5)
    crops = torch.randn(11, 3, 64, 64, generator=g)
    ref = run_chunked(teacher.encode_image, crops, 4)
    for sub in ([3], [0, 5], [10, 2, 7, 1, 4], list(range(11))[::-1]):  # other companions, positions, sizes
        assert torch.equal(run_chunked(teacher.encode_image, crops[sub], 4), ref[sub])
    m = CLIPSelf(copy.deepcopy(nets[0]), {"teacher": teacher})  # rows per call from the input pixels per call
    rows = (m.chunk_rows(64 * 64), m.chunk_rows(160 * 160), m.chunk_rows(10 ** 6))
    assert (m.teacher_chunk_px, *rows) == (32768, 8, 1, 1)
    m.teacher_chunk_px = 0
    assert m.chunk_rows(64 * 64) == 0  # the whole batch


def test_row_digests_see_content_dtype_and_shape():
    x = torch.arange(24.0).reshape(2, 3, 4)
    d = row_digests(x)
    assert d[0] != d[1] and row_digests(x.clone()) == d
    assert row_digests(x.double())[0] != d[0] and row_digests(x.reshape(2, 4, 3))[0] != d[0]
    y = x.clone()
    y[1, 2, 3] += 1e-6
    assert row_digests(y) == [d[0], row_digests(y)[1]] and row_digests(y)[1] != d[1]


def test_memory_bound_evicts_least_recently_used():
    net = torch.nn.Linear(4, 4)
    cache = TargetCache(max_mb=3 * 16 / 2 ** 20)  # room for three rows of 4 floats
    x = torch.randn(5, 4)
    cache.call("lin", net, net, x[:3])
    cache.call("lin", net, net, x[:1])  # row 0 becomes the most recent
    cache.call("lin", net, net, x[3:4])  # evicts row 1
    assert len(cache) == 3 and cache.nbytes == 48 and cache.stats["evicted"] == 1
    hits = cache.stats["hits"]
    cache.call("lin", net, net, x[[0, 2, 3]])
    assert cache.stats["hits"] == hits + 3


def test_disk_store_survives_the_process_and_rebuilds_corrupt_files(nets, tmp_path, caplog):
    _, teacher, _, _ = nets
    crops = _batch()["crops"]
    first = TargetCache(max_mb=0, cache_dir=tmp_path)  # disk only
    ref = first.call("clip.encode_image", teacher, _encoder(teacher), crops)
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) == crops.shape[0] == first.stats["disk_writes"]
    second = TargetCache(max_mb=64, cache_dir=tmp_path)  # another process: memory empty
    assert torch.equal(second.call("clip.encode_image", teacher, _encoder(teacher), crops), ref)
    assert second.stats["disk_hits"] == crops.shape[0] and second.stats["misses"] == 0
    files[0].write_bytes(files[0].read_bytes()[:40])  # torn
    files[1].write_bytes(b"not a checkpoint")
    third = TargetCache(max_mb=64, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ovlib.train.targets"):
        again = third.call("clip.encode_image", teacher, _encoder(teacher), crops)
    assert torch.equal(again, ref)
    assert third.stats["corrupt_rebuilt"] == 2 and third.stats["misses"] == 2
    assert str(files[0]) in caplog.text and str(files[1]) in caplog.text
    fourth = TargetCache(max_mb=64, cache_dir=tmp_path)  # rewritten: every file loads again
    fourth.call("clip.encode_image", teacher, _encoder(teacher), crops)
    assert fourth.stats["disk_hits"] == crops.shape[0] and fourth.stats["corrupt_rebuilt"] == 0


def test_a_file_holding_another_key_is_rebuilt(nets, tmp_path):
    _, teacher, _, _ = nets
    crops = _batch()["crops"][:2]
    cache = TargetCache(max_mb=0, cache_dir=tmp_path)
    cache.call("clip.encode_image", teacher, _encoder(teacher), crops)
    a, b = sorted(tmp_path.rglob("*.pt"))
    a.write_bytes(b.read_bytes())  # a valid file in the wrong place
    fresh = TargetCache(max_mb=0, cache_dir=tmp_path)
    fresh.call("clip.encode_image", teacher, _encoder(teacher), crops)
    assert fresh.stats["corrupt_rebuilt"] == 1 and fresh.stats["disk_hits"] == 1


def test_bad_cache_options_are_errors(tmp_path):
    with pytest.raises(ValueError, match="max_mb"):
        TargetCache(max_mb=-1)
    with pytest.raises(ValueError, match="teacher_cache_mb"):
        small_config(str(tmp_path), teacher_cache_mb=-5)
    with pytest.raises(ValueError, match="kind"):
        TargetCache().call("a|b", torch.nn.Linear(2, 2), lambda x: x, torch.zeros(1, 2))


def test_training_with_the_cache_matches_training_without_it_and_resumes_exactly(tmp_path):
    # 16 images, 2 epochs: the second epoch's crops are all hits (the synthetic dataset's crops are a function of
    # (epoch, index), so a 2-epoch run with a constant dataset is needed for hits: repeat epoch 0's items)
    kw = {"max_steps": 0, "epochs": 2, "batch_size": 4, "save_every": 1}

    def trainer(out, cache, cache_dir=None):
        tr = build(small_config(str(tmp_path / out), teacher_cache=cache, teacher_cache_dir=cache_dir, **kw), n=16)
        tr.dataset.set_epoch = lambda e: None  # the same crops every epoch, so that epoch 2 hits
        if cache:
            tr.target_cache.clear()  # the process-wide cache: start cold
        return tr

    plain = trainer("plain", False)
    plain.fit(resume=False)
    cached = trainer("cached", True, str(tmp_path / "targets"))
    cached.fit(resume=False)
    stats = json.loads((tmp_path / "cached" / "results.json").read_text())["teacher_cache"]
    assert stats["hits"] == stats["misses"] == 16 * 2  # epoch 2 reads every crop of epoch 1
    assert json.loads((tmp_path / "plain" / "results.json").read_text())["teacher_cache"] is None
    a, b = plain.method.state_dict(), cached.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    part = trainer("part", True)
    part.fit(resume=False, stop_after=5)  # into epoch 2
    again = trainer("part", True)  # a new process: the memory store is empty
    again.fit(resume=True)
    c = again.method.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert plain.method.target_cache is None and cached.method.target_cache is cached.target_cache


def test_cache_settings_are_outside_the_run_identity(repo_root, tmp_path):
    """The cache changes how fast a run is, not what it computes: the same run directory (hash) and a resume
    across settings; the run directory hash of a config without the cache fields is the one it had before."""
    import dataclasses

    from ovlib import config
    from ovlib.io import config_hash
    from ovlib.train.distill import CACHE_FIELDS
    from ovlib.train.recipes import distill_config

    p = config.resolve("micro", root=repo_root)
    on = distill_config(p, "sc-clipself")
    off = distill_config(p, "sc-clipself", {"teacher_cache": False, "teacher_chunk_px": 0, "teacher_cache_mb": 1.0})
    assert on.out_dir == off.out_dir
    key = {k: v for k, v in dataclasses.asdict(on).items()
           if k not in ("out_dir", "device", "num_workers", *CACHE_FIELDS)}
    assert on.out_dir.endswith(config_hash(key))
    first = build(small_config(str(tmp_path), max_steps=4, teacher_cache=True))
    first.fit(resume=False, stop_after=2)
    again = build(small_config(str(tmp_path), max_steps=4, teacher_cache=False, teacher_chunk_px=1000))
    assert again.resume() and again.step == 2
