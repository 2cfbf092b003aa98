"""Named weights from local files (``weights_dir``): every tag of params/paper.yaml resolves to one file name."""

import re

import pytest
import torch

from ovlib import config
from ovlib.models import WeightsUnavailable, load_clip, load_vfm
from ovlib.models.weights import WEIGHT_SUFFIXES, local_weight_file, weight_stem
from ovlib.train.recipes import main as recipes_main
from ovlib.train.recipes import named_weights


def test_weight_stem_names():
    assert weight_stem("ViT-B-16", "openai") == "ViT-B-16.openai"
    assert weight_stem("vit_base_patch14_dinov2.lvd142m", "hub") == "vit_base_patch14_dinov2.lvd142m"
    with pytest.raises(ValueError, match="not a pretrained tag"):
        weight_stem("ViT-B-16", "../x")


def test_every_named_weight_of_the_paper_profile_resolves_in_a_directory_of_dummy_files(repo_root, tmp_path):
    params = config.resolve("paper", root=repo_root)
    named = named_weights(params)
    names = {n for n, _ in named}
    # the profile's CLIPs (both EVA02 sizes, OpenAI ViT-B/16), chapter 01's DINOv2 and the recipes' DINOv2 VFMs
    assert {"ViT-B-16", "EVA02-B-16", "EVA02-L-14-336", "vit_base_patch14_dinov2.lvd142m",
            "vit_base_patch14_reg4_dinov2.lvd142m", "vit_large_patch14_reg4_dinov2.lvd142m"} <= names
    for (name, tag), suffix in zip(named, (WEIGHT_SUFFIXES * len(named))):
        (tmp_path / (weight_stem(name, tag) + suffix)).write_bytes(b"dummy")
    for name, tag in named:
        f = local_weight_file(tmp_path, name, tag)
        assert f.parent == tmp_path and f.name.startswith(weight_stem(name, tag) + ".")
    # a dry run initialises every weight at random: it names none
    assert named_weights(config.resolve("paper", ["dry_run=true"], root=repo_root)) == []


def test_missing_file_names_the_parameter_and_the_exact_file(tmp_path):
    with pytest.raises(WeightsUnavailable) as e:
        load_clip("ViT-B-16", pretrained="openai", weights_dir=tmp_path, allow_download=False)
    assert "weights_dir=" in str(e.value) and str(tmp_path / "ViT-B-16.openai.safetensors") in str(e.value)
    missing = tmp_path / "vit_small_patch14_dinov2.lvd142m.safetensors"
    with pytest.raises(WeightsUnavailable, match=re.escape(str(missing))):
        load_vfm("vit_small_patch14_dinov2.lvd142m", pretrained="hub", weights_dir=tmp_path)


def test_vfm_is_read_from_weights_dir(tmp_path):
    """A timm state_dict saved under the expected name is what load_vfm returns (no network, no cache)."""
    from safetensors.torch import save_file

    name = "vit_small_patch14_dinov2.lvd142m"
    src = load_vfm(name, pretrained=None, seed=3)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
    got = load_vfm(name, pretrained="hub", weights_dir=tmp_path, allow_download=False)
    other = load_vfm(name, pretrained=None, seed=4)
    sd, ref = got.state_dict(), src.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert not torch.equal(other.state_dict()["pos_embed"], ref["pos_embed"])


def test_recipes_cli_lists_the_files(repo_root, capsys):
    assert recipes_main(["--profile", "paper", "--root", str(repo_root)]) == 0
    out = capsys.readouterr().out
    assert "ViT-B-16.openai.safetensors" in out and "vit_base_patch14_dinov2.lvd142m.safetensors" in out
    assert "rd64-uni.pth" in out  # SynSeg's CLIPSeg initialisation (params/paper.yaml)


def test_no_notebook_hard_codes_a_pretrained_tag(repo_root):
    """Tags live in params/*.yaml (`models`, `recipes`), so weights_dir and the dry run reach every load."""
    for nb in sorted((repo_root / "notebooks").glob("*.py")):
        hits = re.findall(r"pretrained\s*=\s*['\"][^'\"]+['\"]", nb.read_text())
        assert not hits, f"{nb.name} hard-codes {hits}"
