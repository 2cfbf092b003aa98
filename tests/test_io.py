"""Checkpoint I/O: atomic writes, weights_only loading, config hashing."""

import dataclasses
import os

import pytest
import torch

from ovlib import io


def test_atomic_save_roundtrip_and_no_temp_left(tmp_path):
    obj = {"w": torch.arange(6.0).view(2, 3), "step": 7, "rng": torch.get_rng_state()}
    p = io.atomic_save(obj, tmp_path / "sub" / "ckpt.pt")
    back = io.safe_load(p)
    assert torch.equal(back["w"], obj["w"]) and back["step"] == 7
    assert [f.name for f in p.parent.iterdir()] == ["ckpt.pt"]


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "ckpt.pt"
    io.atomic_save({"v": torch.ones(3)}, p)

    def boom(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(io.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_save({"v": torch.zeros(3)}, p)
    monkeypatch.undo()
    assert torch.equal(io.safe_load(p)["v"], torch.ones(3))
    assert [f.name for f in tmp_path.iterdir()] == ["ckpt.pt"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_checkpoint_with_pickled_callable_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "hook": _Evil()}, p)
    with pytest.raises(io.CheckpointError, match=r"refusing to load checkpoint .*evil\.pt.*weights_only=True"):
        io.safe_load(p)


def test_truncated_and_missing_checkpoints_name_the_file(tmp_path):
    p = tmp_path / "trunc.pt"
    io.atomic_save({"w": torch.randn(100)}, p)
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(io.CheckpointError, match="trunc.pt"):
        io.safe_load(p)
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        io.safe_load(tmp_path / "nothere.pt")


@dataclasses.dataclass
class Cfg:
    lr: float = 1e-3
    layers: int = 4
    name: str = "micro"


def test_config_hash_is_stable_and_sensitive():
    assert io.config_hash(Cfg()) == io.config_hash(Cfg())
    assert io.config_hash(Cfg()) != io.config_hash(Cfg(lr=2e-3))
    assert io.config_hash({"a": 1, "b": 2}) == io.config_hash({"b": 2, "a": 1})
    assert io.config_hash({"a": 1}) != io.config_hash({"a": 1.0})
    p = io.cache_path("data/cache", "micro-clip", Cfg())
    assert p.parent.name == "micro-clip" and p.name == f"micro-clip-{io.config_hash(Cfg())}.pt"


@pytest.mark.parametrize("value, disabled", [("", False), ("0", False), ("false", False), ("1", True),
                                             ("True", True), ("yes", True)])
def test_tqdm_disabled_reads_the_environment(monkeypatch, value, disabled):
    from ovlib.io import tqdm_disabled
    from ovlib.train.pretrain import _quiet

    monkeypatch.setenv("TQDM_DISABLE", value)
    assert tqdm_disabled() is disabled
    assert _quiet(True) == ({"disable": True} if disabled else {})  # explicit: tqdm.notebook ignores the env
    assert _quiet(False) == {"disable": True}
