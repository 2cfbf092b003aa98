"""The shared parameter contract (params/*.yaml, overrides)."""

import pytest
import yaml

from ovlib import config


def test_every_profile_file_is_valid_and_complete(repo_root):
    for profile in config.PROFILES:
        p = config.load_profile(profile, repo_root)
        assert p["profile"] == profile
        assert set(p) == set(config.PARAMS)


def test_unknown_profile_is_a_clear_error(repo_root):
    with pytest.raises(config.ParamError, match="unknown profile 'huge'"):
        config.resolve("huge", root=repo_root)


def test_unknown_override_key_names_the_key(repo_root):
    with pytest.raises(config.ParamError, match=r"unknown parameter\(s\) \['learning_rate'\]"):
        config.resolve("smoke", ["learning_rate=3"], root=repo_root)


def test_override_types_are_parsed_and_checked(repo_root):
    p = config.resolve("smoke", ["seed=7", "steps_scale=2", "data_root=/tmp/x", "allow_download=true"], root=repo_root)
    assert p["seed"] == 7 and p["steps_scale"] == 2.0 and isinstance(p["steps_scale"], float)
    assert p["data_root"] == "/tmp/x" and p["allow_download"] is True
    with pytest.raises(config.ParamError, match="'seed' must be int, got str"):
        config.resolve("smoke", ["seed=abc"], root=repo_root)
    with pytest.raises(config.ParamError, match="'seed' must be int, got bool"):
        config.resolve("smoke", ["seed=true"], root=repo_root)
    with pytest.raises(config.ParamError, match="key=value"):
        config.resolve("smoke", ["seed"], root=repo_root)


def test_profile_cannot_be_overridden_by_parameter(repo_root):
    with pytest.raises(config.ParamError, match="--profile"):
        config.resolve("smoke", ["profile=micro"], root=repo_root)


def _write_profile(tmp_path, data):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "smoke.yaml").write_text(yaml.safe_dump(data))


def test_params_file_with_wrong_type_names_file_and_key(tmp_path, repo_root):
    data = config.load_profile("smoke", repo_root)
    data["eval_images"] = "twelve"
    _write_profile(tmp_path, data)
    with pytest.raises(config.ParamError, match=r"smoke\.yaml: parameter 'eval_images' must be int"):
        config.load_profile("smoke", tmp_path)


def test_params_file_missing_and_unknown_keys(tmp_path, repo_root):
    data = config.load_profile("smoke", repo_root)
    del data["seed"]
    data["colour"] = "blue"
    _write_profile(tmp_path, data)
    with pytest.raises(config.ParamError, match=r"unknown parameter\(s\) \['colour'\]"):
        config.load_profile("smoke", tmp_path)
    data.pop("colour")
    (tmp_path / "params" / "smoke.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(config.ParamError, match=r"missing parameter\(s\) \['seed'\]"):
        config.load_profile("smoke", tmp_path)


def test_params_file_that_is_not_a_mapping(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "micro.yaml").write_text("- just\n- a list\n")
    with pytest.raises(config.ParamError, match="must be a mapping"):
        config.load_profile("micro", tmp_path)


def test_profile_field_must_match_file(tmp_path, repo_root):
    data = config.load_profile("smoke", repo_root)
    data["profile"] = "micro"
    _write_profile(tmp_path, data)
    with pytest.raises(config.ParamError, match="'profile' is 'micro' but the file is for 'smoke'"):
        config.load_profile("smoke", tmp_path)


def test_dry_run_applies_the_profiles_block_and_explicit_overrides_win(repo_root):
    base = config.resolve("paper", root=repo_root)
    dry = config.resolve("paper", ["dry_run=true", "data_root=/elsewhere"], root=repo_root)
    block = base["dry_run_settings"]
    assert dry["data_root"] == "/elsewhere"  # explicit -p beats the block
    assert dry["device"] == block["params"]["device"] and dry["eval_images"] == block["params"]["eval_images"]
    assert dry["recipes"] == base["recipes"] + block["recipes"]
    assert all(m["pretrained"] is None for m in dry["models"].values()) and base["models"]
    # applying it again (the notebook's setup after the runner) changes nothing, the override included
    assert config.apply_dry_run(dry) == dry
    assert config.dry_run_eval(dry) == block["eval"] and config.dry_run_eval(base) == {}
    # only sizes, steps, data and weights change: every recipe still names the profile's architectures
    from ovlib.train.recipes import distill_config

    for method in ("clipself", "declip", "synclip", "denserc", "refiner", "synseg"):
        a, b = distill_config(base, method), distill_config(dry, method)
        assert (a.backbone, a.vfm, a.method_args.get("num_blocks")) == (b.backbone, b.vfm, b.method_args.get("num_blocks"))
        assert b.max_steps <= 2 and b.pretrained is None and b.vfm_pretrained is None


def test_dry_run_settings_are_validated(repo_root, tmp_path):
    with pytest.raises(config.ParamError, match="has no dry_run_settings"):
        config.resolve("smoke", ["dry_run=true"], root=repo_root)
    data = config.load_profile("smoke", repo_root)
    for bad, msg in (({"sizes": {}}, r"unknown section\(s\) \['sizes'\]"),
                     ({"params": {"profile": "micro"}, "recipes": [{}]}, "may not set"),
                     ({"params": {"seed": "x"}, "recipes": [{}]}, "'seed' must be int"),
                     ({"params": {}}, "non-empty list"),
                     ({"recipes": [{}], "eval": {"colour": 1}}, "eval must be"),
                     ({"recipes": [{}], "random_init": "yes"}, "random_init")):
        data["dry_run_settings"] = bad
        _write_profile(tmp_path, data) if not (tmp_path / "params").exists() else \
            (tmp_path / "params" / "smoke.yaml").write_text(yaml.safe_dump(data))
        with pytest.raises(config.ParamError, match=msg):
            config.load_profile("smoke", tmp_path)
    data["dry_run_settings"] = {}
    data["models"] = {"clip": {"name": "ViT-B-16"}}
    (tmp_path / "params" / "smoke.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(config.ParamError, match=r"models\['clip'\] must be"):
        config.load_profile("smoke", tmp_path)
