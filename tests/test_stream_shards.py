"""Pre-rendered stream shards (ovlib.data.stream_shards) and the pre-trainers' ``data_pipeline``: the shards give
the inline stream's batches bit for bit, are keyed by everything the items depend on, survive corruption as a
counted rebuild, and a pre-training resumes exactly across pipelines."""

from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path

import pytest
import torch

from ovlib.data import stream_shards as ss
from ovlib.io import cache_path, config_hash, rebuild_counts
from ovlib.train import pretrain as pt

VIEWS = {"object_views": 0.7, "view_render_size": 128, "view_context": (1.2, 2.5)}
SMALL = 128  # px of the scenes of the shard-only tests: few items per shard (ss.shard_items)


def _run(tmp_path: Path, cfg) -> "pt._RunLog":
    return pt._RunLog(tmp_path / "unused.pt", cfg, "test", "test", progress=False)


def _same_batches(a, b, n: int) -> None:
    for k in range(n):
        x, y = next(a), next(b)
        assert torch.equal(x["image"], y["image"]), f"batch {k}: images differ"
        assert x["image"].dtype == y["image"].dtype == torch.float32
        assert x["caption"] == y["caption"], f"batch {k}: captions differ"
        assert torch.equal(x["index"], y["index"]), f"batch {k}: indices differ"


def test_shard_batches_equal_the_inline_stream_across_shard_boundaries(tmp_path):
    """Same scenes, order and captions as the inline DataLoader, from a start inside a shard, across a shard
    boundary, with the shards rendered by two worker processes."""
    cfg = pt.ClipPretrainConfig(batch_size=16)
    n = ss.shard_items(64)
    start = n - 24  # the second batch straddles the first shard boundary
    inline = pt._stream_loader(0, 64, 16, start, 0, **VIEWS)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # _shard_processes() -> 2 render processes for the 2 shards
    try:
        shards = pt._data_batches(cfg, tmp_path, 0, 64, 16, start, start + 48, 10 ** 6, _run(tmp_path, cfg), False,
                                  **VIEWS)
        _same_batches(inline, shards, 3)
    finally:
        torch.set_num_threads(threads)
    key = ss.stream_key(ss.StreamSpec(0, 64, **VIEWS))
    assert sorted(p.name for p in (tmp_path / "stream" / key).iterdir()) == [
        ss.shard_path(tmp_path, key, f).name for f in (0, n)]


def test_dense_vfm_scene_batches_equal_the_inline_stream(tmp_path):
    cfg = pt.DenseVfmPretrainConfig()
    o = pt._VFM_STREAM_OFFSET
    n = ss.shard_items(cfg.scene_size)
    old = pt._scene_batches(0, cfg.scene_size, 3, o + n - 2)  # the inline stream of before the pipelines
    new = pt._scene_batches(0, cfg.scene_size, 3, o + n - 2, {
        "cfg": cfg, "cache_dir": tmp_path, "stop": o + n + 4, "end": o + 10 ** 6, "run": _run(tmp_path, cfg),
        "progress": False})
    for _ in range(2):
        a, b = next(old), next(new)
        assert a.shape == (3, 3, cfg.scene_size, cfg.scene_size) and torch.equal(a, b)


def test_stream_key_changes_with_world_stream_and_generator(monkeypatch):
    base = ss.StreamSpec(0, 64, **VIEWS)
    key = ss.stream_key(base)
    assert ss.stream_key(ss.StreamSpec(0, 64, **VIEWS)) == key  # stable
    others = [replace(base, world_seed=1), replace(base, size=48), replace(base, object_views=0.5),
              replace(base, view_render_size=96), replace(base, view_context=(1.2, 2.0))]
    keys = {ss.stream_key(s) for s in others}
    assert key not in keys and len(keys) == len(others)
    monkeypatch.setattr("ovlib.data.microworld.MICROWORLD_VERSION", "changed-world")  # the world's config
    assert ss.stream_key(base) != key
    monkeypatch.undo()
    assert ss.stream_key(base) == key
    monkeypatch.setattr(ss, "_generator_sha", lambda: "0" * 64)
    assert ss.stream_key(base) != key  # an edit of the generator's code


def test_shards_of_another_world_are_not_used(tmp_path):
    """A run with another world seed reads its own folder and gets its own (different) images."""
    a, b = ss.StreamSpec(0, SMALL), ss.StreamSpec(1, SMALL)
    ss.ensure_shards(tmp_path, a, 0, 8)
    assert ss.ensure_shards(tmp_path, a, 0, 8)["built"] == 0  # cached
    assert ss.ensure_shards(tmp_path, b, 0, 8)["built"] == 1
    xa, xb = next(ss.shard_batches(tmp_path, a, 0, 8)), next(ss.shard_batches(tmp_path, b, 0, 8))
    assert not torch.equal(xa["image"], xb["image"])
    assert torch.equal(xb["image"], next(pt._stream_loader(1, SMALL, 8, 0, 0))["image"])


@pytest.mark.parametrize("damage", ["truncated", "other-shard"])
def test_bad_shard_is_a_counted_rebuild(tmp_path, damage, caplog):
    spec = ss.StreamSpec(0, SMALL)
    n = ss.shard_items(SMALL)
    ss.ensure_shards(tmp_path, spec, 0, 2 * n)
    key = ss.stream_key(spec)
    p0, p1 = ss.shard_path(tmp_path, key, 0), ss.shard_path(tmp_path, key, n)
    if damage == "truncated":
        p0.write_bytes(p0.read_bytes()[: p0.stat().st_size // 2])
    else:  # a valid shard file under the wrong name: it holds items n.., not 0..
        p0.write_bytes(p1.read_bytes())
    before = rebuild_counts().get(p0.name, 0)
    with caplog.at_level("WARNING", logger="ovlib.io"):
        got = next(ss.shard_batches(tmp_path, spec, 0, 2 * n))
    assert rebuild_counts()[p0.name] == before + 1 and str(p0) in caplog.text
    assert p0.with_name(p0.name + ".corrupt-1").is_file() and p0.is_file()  # set aside, rebuilt
    want = next(pt._stream_loader(0, SMALL, 2 * n, 0, 0))
    assert torch.equal(got["image"], want["image"]) and got["caption"] == want["caption"]


def test_pipeline_is_outside_the_cache_key():
    """``data_pipeline`` does not change the model: the key (and thus the micro CLIP's cache file) is that of
    the same config class without the field."""
    cfg = pt.ClipPretrainConfig()
    assert config_hash(cfg) == config_hash(replace(cfg, data_pipeline="inline"))
    kept = [(f.name, f.type, field(default=getattr(cfg, f.name))) for f in fields(cfg) if f.name != "data_pipeline"]
    without = make_dataclass("ClipPretrainConfig", kept, frozen=True)()
    assert config_hash(cfg) == config_hash(without)
    assert cache_path("c", cfg.model, cfg) == cache_path("c", cfg.model, without)
    # a file written before the field existed (no data_pipeline in its config) or by the other pipeline fits
    old_file = {k: v for k, v in asdict(cfg).items() if k != "data_pipeline"}
    pt._same_config(old_file, cfg, Path("old.pt"))
    pt._same_config(asdict(replace(cfg, data_pipeline="inline")), cfg, Path("inline.pt"))
    with pytest.raises(ValueError, match="another config"):
        pt._same_config({**old_file, "lr": cfg.lr / 2}, cfg, Path("other.pt"))

    @dataclass(frozen=True)
    class Other:
        a: int = 1

    assert config_hash(Other()) != config_hash(Other(a=2))  # ordinary fields still count
    with pytest.raises(ValueError, match="data_pipeline"):
        pt._data_batches(replace(cfg, data_pipeline="magic"), "c", 0, 64, 4, 0, 4, 4, None, False)


TINY = pt.ClipPretrainConfig(batch_size=4, steps=4, warmup=1, ckpt_every=100, precision="fp32")  # state: at max_steps


def _weights_equal(a, b) -> None:
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_clip_pretraining_is_identical_under_both_pipelines_and_resumes_across_them(tmp_path):
    inline_cfg = replace(TINY, data_pipeline="inline")
    ref, _, ref_info = pt.pretrain_clip(inline_cfg, tmp_path / "inline", progress=False)
    straight, _, info = pt.pretrain_clip(TINY, tmp_path / "shards", progress=False)
    _weights_equal(ref, straight)
    assert [h["loss"] for h in info["history"]] == [h["loss"] for h in ref_info["history"]]
    assert not list((tmp_path / "shards").rglob("items-*.pt")), "a finished run's shards are removed"
    # killed (max_steps) under the inline pipeline, resumed under the shards one
    _, _, part = pt.pretrain_clip(inline_cfg, tmp_path / "mixed", progress=False, max_steps=2)
    assert part["path"].endswith(".state.pt")
    resumed, _, info2 = pt.pretrain_clip(TINY, tmp_path / "mixed", progress=False)
    assert [h["step"] for h in info2["history"]] == [1, 2, 3, 4]
    _weights_equal(ref, resumed)
    # the inline run's model is this config's cache
    _, _, again = pt.pretrain_clip(TINY, tmp_path / "inline", progress=False)
    assert again["loaded"]


def test_clip_shard_pipeline_resumes_to_the_inline_model(tmp_path):
    """Stopped after 2 of 4 steps and resumed under the shards pipeline: the model of an uninterrupted inline
    run, bit for bit; the shards outlive the stop (for the resume) but not the finished run."""
    straight, _, _ = pt.pretrain_clip(replace(TINY, data_pipeline="inline"), tmp_path / "a", progress=False)
    _, _, part = pt.pretrain_clip(TINY, tmp_path / "b", progress=False, max_steps=2)
    assert part["path"].endswith(".state.pt") and list((tmp_path / "b").rglob("items-*.pt"))
    resumed, _, info = pt.pretrain_clip(TINY, tmp_path / "b", progress=False)
    assert [h["step"] for h in info["history"]] == [1, 2, 3, 4] and info["data_seconds"] == 0.0  # nothing re-rendered
    _weights_equal(straight, resumed)
    assert not list((tmp_path / "b").rglob("items-*.pt"))


@pytest.mark.slow
def test_vfm_pipelines_give_the_same_model(tmp_path):
    dino = pt.DinoPretrainConfig(batch_size=4, steps=2, warmup=1, n_local=2, global_size=32, local_size=16,
                                 out_dim=64, precision="fp32")
    a, _ = pt.pretrain_vfm(dino, tmp_path / "a", progress=False)
    b, _ = pt.pretrain_vfm(replace(dino, data_pipeline="inline"), tmp_path / "b", progress=False)
    _weights_equal(a, b)
    dense = replace(pt.dense_vfm_config("smoke", 0.01), steps=2, warmup=1, precision="fp32")
    c, _ = pt.pretrain_vfm(dense, tmp_path / "c", progress=False)
    d, _ = pt.pretrain_vfm(replace(dense, data_pipeline="inline"), tmp_path / "d", progress=False)
    _weights_equal(c, d)
