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


# ------------------------------------------------------------------------------------------ crash safety
def _flip_tensor_byte(path, t: torch.Tensor) -> None:
    """Flip one byte inside the stored bytes of tensor ``t`` (a disk error torch.load does not notice)."""
    blob = bytearray(path.read_bytes())
    i = blob.find(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert i >= 0
    blob[i + 3] ^= 0x10
    path.write_bytes(bytes(blob))


def test_digest_catches_a_flipped_byte_that_torch_load_reads_silently(tmp_path):
    w = torch.arange(4096, dtype=torch.float32)
    p = io.atomic_save({"model": {"w": w, "h": torch.ones(2, dtype=torch.bfloat16)}, "step": 3, "b": (0.9, 0.98)},
                       tmp_path / "ck.pt")
    back = io.safe_load(p)
    assert io.DIGEST_KEY not in back and back["b"] == (0.9, 0.98) and torch.equal(back["model"]["w"], w)
    _flip_tensor_byte(p, w)
    raw = torch.load(p, weights_only=True)  # torch itself loads a wrong tensor
    assert not torch.equal(raw["model"]["w"], w)
    with pytest.raises(io.CheckpointError, match=r"ck\.pt.*SHA-256"):
        io.safe_load(p)


def test_load_cache_sets_aside_counts_and_logs_bad_files(tmp_path, caplog):
    assert io.load_cache(tmp_path / "none.pt") is None
    good = tmp_path / "good.pt"
    io.atomic_save({"model": {"w": torch.ones(3)}, "cfg": "a"}, good)
    assert io.load_cache(good)["cfg"] == "a"
    # truncated, flipped, and valid-but-wrong (validate raises): each set aside as .corrupt-<k> and counted
    before = io.rebuild_counts().get("bad.pt", 0)
    for k, damage in enumerate(["truncate", "flip", "config"], start=1):
        bad = tmp_path / "bad.pt"
        io.atomic_save({"model": {"w": torch.arange(64.0)}, "cfg": "a"}, bad)
        if damage == "truncate":
            bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
        elif damage == "flip":
            _flip_tensor_byte(bad, torch.arange(64.0))

        def validate(ck):
            if ck["cfg"] != "b":
                raise ValueError("written for another config")

        with caplog.at_level("WARNING", logger="ovlib.io"):
            assert io.load_cache(bad, validate if damage == "config" else None, what="test cache") is None
        assert not bad.exists() and (tmp_path / f"bad.pt.corrupt-{k}").is_file()
        assert io.rebuild_counts()["bad.pt"] == before + k
        assert f"test cache file {bad}" in caplog.text
    io.atomic_save({"model": {}}, tmp_path / "bad.pt")
    (tmp_path / "bad.pt").write_bytes(b"\0" * 10)
    with pytest.raises(io.CheckpointError, match=r"test cache file .*bad\.pt is unusable"):
        io.load_cache(tmp_path / "bad.pt", what="test cache", on_bad="error")
    assert (tmp_path / "bad.pt").is_file()  # an error leaves the file where it is


def test_jsonl_torn_last_line_is_dropped_and_counted_bad_middle_line_is_an_error(tmp_path, caplog):
    p = tmp_path / "m.jsonl"
    assert io.read_jsonl(p) == ([], 0)
    for s in (1, 2, 3):
        io.append_jsonl(p, {"step": s})
    assert io.read_jsonl(p) == ([{"step": 1}, {"step": 2}, {"step": 3}], 0)
    p.write_bytes(p.read_bytes() + b'{"step": 4, "lo')
    with caplog.at_level("WARNING", logger="ovlib.io"):
        recs, torn = io.read_jsonl(p)
    assert [r["step"] for r in recs] == [1, 2, 3] and torn == 1 and "torn last record" in caplog.text
    p.write_bytes(p.read_bytes()[: -len(b'{"step": 4, "lo')] + b'{"step": 4}')  # complete JSON, newline missing
    assert io.read_jsonl(p)[1] == 1
    io.rewrite_jsonl(p, recs)
    assert io.read_jsonl(p) == (recs, 0)
    p.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2"):
        io.read_jsonl(p)


def test_set_aside_keeps_old_files_under_a_numbered_named_folder(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "results.json").write_text("{}")
    d1 = io.set_aside([tmp_path / "metrics.jsonl", tmp_path / "results.json", tmp_path / "absent"],
                      tmp_path / "stale-no-checkpoint", "test")
    assert d1.name == "stale-no-checkpoint-1" and sorted(p.name for p in d1.iterdir()) == ["metrics.jsonl",
                                                                                          "results.json"]
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert io.set_aside([tmp_path / "metrics.jsonl"], tmp_path / "stale-no-checkpoint", "t").name.endswith("-2")
    assert io.set_aside([tmp_path / "absent"], tmp_path / "stale-no-checkpoint", "t") is None


def test_run_once_marks_done_last_and_redoes_unfinished_runs(tmp_path):
    calls = []

    def produce():
        calls.append(1)
        (tmp_path / "r" / "out.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "r" / "out.txt").write_text("x")
        return {"n": len(calls)}

    def failing():
        (tmp_path / "r").mkdir(exist_ok=True)
        raise RuntimeError("killed while evaluating")

    with pytest.raises(RuntimeError):
        io.run_once(tmp_path / "r", failing)
    assert io.read_done(tmp_path / "r") is None
    assert io.run_once(tmp_path / "r", produce, requires=("out.txt",)) == ({"n": 1}, True)
    assert io.run_once(tmp_path / "r", produce, requires=("out.txt",)) == ({"n": 1}, False)
    (tmp_path / "r" / "out.txt").unlink()  # a finished run whose product is gone is redone
    assert io.run_once(tmp_path / "r", produce, requires=("out.txt",)) == ({"n": 2}, True)
    (tmp_path / "r" / io.DONE).write_text('{"n": ')
    with pytest.raises(ValueError, match="done.json"):
        io.read_done(tmp_path / "r")


@pytest.mark.parametrize("spec, killed", [("", False), ("other", False), ("here", True), ("here@2", True),
                                          ("here@4", False)])
def test_fault_point_kills_at_the_named_hit(tmp_path, spec, killed):
    import signal
    import subprocess
    import sys

    code = ("from ovlib.io import fault_point\n"
            "for i in range(3):\n"
            "    fault_point('here', lambda: open('hit', 'w').write(str(i)))\n")
    env = {**os.environ, "OVLIB_FAULT": spec}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, timeout=120, check=False)
    assert proc.returncode == (-signal.SIGKILL if killed else 0)
    if killed:
        assert (tmp_path / "hit").read_text() == str(int((spec.split("@") + ["1"])[1]) - 1)
