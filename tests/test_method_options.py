"""One options contract for every method: a typed options dataclass per method, and an unknown method_args key is
an error naming the method and the key -- at config time (``distill_config``) and at construction."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from ovlib import config
from ovlib.methods import METHODS, CLIPSelf, DeCLIP
from ovlib.train.recipes import distill_config


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_typed_options_and_rejects_an_unknown_key(name):
    cls = METHODS[name]
    assert cls.option_types and all(dataclasses.is_dataclass(t) for t in cls.option_types), name
    assert cls.option_names()  # every method has at least one option
    with pytest.raises(ValueError, match=rf"method '{name}': unknown method_args key\(s\) \['no_such_key'\]"):
        cls.check_options({"no_such_key": 1, cls.option_names()[0]: None})
    cls.check_options({k: None for k in cls.option_names()})  # every declared key is accepted


@pytest.mark.parametrize("profile", config.PROFILES)
def test_every_recipe_uses_only_declared_options(profile, repo_root):
    params = config.resolve(profile, root=repo_root)
    for name in METHODS:
        distill_config(params, name)  # raises on an unknown method_args key of a recipe


def test_a_typo_in_method_args_is_an_error_at_config_time_and_at_construction(repo_root):
    params = config.resolve("smoke", root=repo_root)
    with pytest.raises(ValueError, match=r"method 'clipself': unknown method_args key\(s\) \['dense_mod'\]"):
        distill_config(params, "clipself", {"method_args": {"dense_mod": "v"}})
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"method 'clipself': unknown method_args key\(s\) \['dense_mod'\]"):
        CLIPSelf(student, {"teacher": teacher}, dense_mod="v")
    with pytest.raises(TypeError, match=r"method 'declip': unknown method_args key\(s\) \['mdoe'\]"):
        DeCLIP(student, {"teacher": teacher, "vfm": teacher}, mdoe="qq")
    with pytest.raises(ValueError, match="dense_mode must be one of"):  # a bad value is checked once, here
        CLIPSelf(student, {"teacher": teacher}, dense_mode="nope")
