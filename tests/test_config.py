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


def test_dotted_override_sets_one_entry_of_a_mapping(repo_root):
    base = config.resolve("micro", root=repo_root)
    p = config.resolve("micro", ["budgets.02.extended=true", "budgets.04.ks=[1, 7]"], root=repo_root)
    assert base["budgets"]["02"]["extended"] is False and p["budgets"]["02"]["extended"] is True
    assert p["budgets"]["04"]["ks"] == [1, 7]
    # every other entry, and the profile's own copy, untouched
    assert p["budgets"]["02"]["taus"] == base["budgets"]["02"]["taus"] and p["budgets"]["03"] == base["budgets"]["03"]
    assert config.resolve("micro", root=repo_root)["budgets"]["02"]["extended"] is False
    with pytest.raises(config.ParamError, match="no key 'budgets.02.extnded'"):
        config.resolve("micro", ["budgets.02.extnded=true"], root=repo_root)
    with pytest.raises(config.ParamError, match="no mapping 'budgets.99'"):
        config.resolve("micro", ["budgets.99.extended=true"], root=repo_root)
    with pytest.raises(config.ParamError, match="'seed' is not a parameter holding a mapping"):
        config.resolve("micro", ["seed.x=1"], root=repo_root)


def test_extended_is_off_at_micro_and_on_at_smoke(repo_root):
    """The one-seed ablations beyond the headline claims: off in the timed micro book, on at smoke (CI runs their
    code) and at paper scale."""
    for nn in ("02", "03", "04"):
        assert config.load_profile("micro", repo_root)["budgets"][nn]["extended"] is False
        assert config.load_profile("smoke", repo_root)["budgets"][nn]["extended"] is True
        assert config.load_profile("paper", repo_root)["budgets"][nn]["extended"] is True


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
    assert config.dry_run_depth(dry) == block["depth"] >= 1 and config.dry_run_depth(base) is None
    # the block's budgets are merged per chapter / named training budget; the others stay the profile's
    assert block["budgets"] and set(dry["budgets"]) == set(base["budgets"]) | set(block["budgets"])
    for ch, entry in dry["budgets"].items():
        given = block["budgets"].get(ch, {})
        if ch == "train":
            assert entry == {**base["budgets"]["train"], **given}
        elif ch in config.SIZE_KEYS:  # pre-training / evaluation sizes: the profile's (the block gives none)
            assert entry == base["budgets"][ch] and ch not in block["budgets"]
        else:
            assert entry == {**base["budgets"].get(ch, {}), **given} and set(entry) <= set(config.BUDGET_KEYS[ch])
    # only sizes, steps, data and weights change: every recipe still names the profile's architectures
    from ovlib.train.recipes import distill_config

    for method in ("clipself", "declip", "synclip", "denserc", "refiner", "synseg"):
        a, b = distill_config(base, method), distill_config(dry, method)
        assert (a.backbone, a.vfm) == (b.backbone, b.vfm)
        # the Refiner's own blocks fit inside the towers the dry run cuts (dry_run_settings.depth)
        assert b.method_args.get("num_blocks", 0) <= config.dry_run_depth(dry)
        assert b.max_steps <= 2 and b.pretrained is None and b.vfm_pretrained is None
        assert (a.checkpoint, b.checkpoint) == ("full", "final")  # no optimiser state, no last.pt in a dry run


def test_dry_run_settings_are_validated(repo_root, tmp_path):
    with pytest.raises(config.ParamError, match="has no dry_run_settings"):
        config.resolve("smoke", ["dry_run=true"], root=repo_root)
    data = config.load_profile("smoke", repo_root)
    for bad, msg in (({"sizes": {}}, r"unknown section\(s\) \['sizes'\]"),
                     ({"params": {"profile": "micro"}, "recipes": [{}]}, "may not set"),
                     ({"params": {"seed": "x"}, "recipes": [{}]}, "'seed' must be int"),
                     ({"params": {}}, "non-empty list"),
                     ({"recipes": [{}], "eval": {"colour": 1}}, "eval must be"),
                     ({"recipes": [{}], "budgets": {"02": {"colour": 1}}}, r"unknown key\(s\) \['colour'\]"),
                     ({"recipes": [{}], "budgets": {"07": {}}}, "unknown chapter '07'"),
                     ({"recipes": [{}], "random_init": "yes"}, "random_init"),
                     ({"recipes": [{}], "random_init": True, "depth": 0}, "depth must be an int >= 1"),
                     ({"recipes": [{}], "depth": 2}, "depth cuts random initialisations only")):
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


# ------------------------------------------------------------------------------- profile sizes (budgets.*)
def _key_tree(params):
    """What a profile file must declare like every other: the contract keys, the budgets' sections, every key of
    the library's size sections and the chapters' budgets (nested mappings included), the named training budgets,
    the recipe sweep's keys. Values, recipes, the sweep's families, models and the dry-run block are the profile's
    own."""
    def tree(v):
        return {k: tree(x) for k, x in v.items()} if isinstance(v, dict) else None

    b = params["budgets"]
    return {"params": sorted(params),
            "budgets": {k: (sorted(v) if k in ("train", "recipes") else tree(v)) for k, v in b.items()}}


def test_every_profile_file_declares_the_same_keys(repo_root):
    trees = {p: _key_tree(config.load_profile(p, repo_root)) for p in config.PROFILES}
    for p in config.PROFILES[1:]:
        assert trees[p] == trees[config.PROFILES[0]], f"params/{p}.yaml declares other keys than smoke.yaml"
    assert set(config.SIZE_KEYS) <= set(trees["micro"]["budgets"])


def test_size_sections_name_file_and_key(tmp_path, repo_root):
    data = config.load_profile("smoke", repo_root)
    _write_profile(tmp_path, data)
    path = tmp_path / "params" / "smoke.yaml"
    cases = (
        (lambda d: d["budgets"]["eval"].update(colour=1), r"smoke\.yaml: budgets\.eval: unknown key\(s\) \['colour'\]"),
        (lambda d: d["budgets"]["pretrain"]["clip"].update(stepz=3),
         r"smoke\.yaml: budgets\.pretrain\.clip: unknown key\(s\) \['stepz'\]"),
        (lambda d: d["budgets"]["pretrain"]["vfm"].pop("objective"),
         r"budgets\.pretrain\.vfm: missing key\(s\) \['objective'\]"),
        (lambda d: d["budgets"]["eval"]["ovss"].update(stride="32"),
         r"budgets\.eval\.ovss\.stride must be int, got str"),
        (lambda d: d["budgets"]["eval"].update(n_boot=True), r"budgets\.eval\.n_boot must be int, got bool"),
        (lambda d: d["budgets"].pop("pretrain"), r"smoke\.yaml: budgets lacks the section\(s\) \['pretrain'\]"),
    )
    for change, msg in cases:
        d = yaml.safe_load(yaml.safe_dump(data))
        change(d)
        path.write_text(yaml.safe_dump(d))
        with pytest.raises(config.ParamError, match=msg):
            config.load_profile("smoke", tmp_path)
    d = yaml.safe_load(yaml.safe_dump(data))
    d["budgets"]["eval"]["region"]["min_size"] = 2  # an int where a float is asked for is fine
    path.write_text(yaml.safe_dump(d))
    assert config.load_profile("smoke", tmp_path)["budgets"]["eval"]["region"]["min_size"] == 2


def test_profile_sizes_read_resolved_parameters_or_the_profile_file(repo_root):
    p = config.resolve("micro", root=repo_root)
    assert config.profile_sizes(p, "eval") == config.profile_sizes("micro", "eval") == p["budgets"]["eval"]
    got = config.profile_sizes(p, "pretrain")
    got["clip"]["steps"] = -1  # a copy: the parameters are not changed through it
    assert p["budgets"]["pretrain"]["clip"]["steps"] != -1
    with pytest.raises(config.ParamError, match="unknown size section 'train'"):
        config.profile_sizes(p, "train")
    with pytest.raises(config.ParamError, match=r"no budgets\.pretrain"):
        config.profile_sizes({"profile": "micro", "budgets": {}}, "pretrain")
    with pytest.raises(config.ParamError, match="unknown profile 'huge'"):
        config.profile_sizes("huge", "eval")
    assert config.micro_world("smoke") and config.micro_world(p) and not config.micro_world("paper")


def test_size_keys_are_fields_of_the_configs_they_set():
    """A key of budgets.pretrain / budgets.eval that no config has would be dropped or fail late: each is a field."""
    from dataclasses import fields

    from ovlib.eval.profiles import DenseEvalSettings
    from ovlib.eval.region_cls import RegionClsConfig
    from ovlib.eval.segmentation import OVSSConfig
    from ovlib.train.pretrain import ClipPretrainConfig, DenseVfmPretrainConfig
    from ovlib.train.proxies import ClipSegPretrainConfig

    def names(cls):
        return {f.name for f in fields(cls)}

    from ovlib.train.mae import MaeVfmPretrainConfig

    scaled = {"min_steps", "objective"}  # read by scaled_budget / vfm_config, not fields
    for key, cls in (("clip", ClipPretrainConfig), ("vfm", DenseVfmPretrainConfig), ("vfm", MaeVfmPretrainConfig),
                     ("clipseg", ClipSegPretrainConfig)):
        assert set(config.SIZE_KEYS["pretrain"][key]) - scaled <= names(cls), key
    ev = config.SIZE_KEYS["eval"]
    assert set(ev["region"]) <= names(RegionClsConfig) and set(ev["ovss"]) <= names(OVSSConfig)
    assert set(ev) - {"region", "ovss"} <= names(DenseEvalSettings)
