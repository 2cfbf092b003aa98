"""Every dense function of the evaluation takes images on any device and computes where its model is.

The evaluation loops (OVSS windows, k-means, affinity, region crops) build their images on the CPU; on a GPU the
dense function must move them (``ovlib.models.images.to_model``). Without a GPU here, the model is put on the
``meta`` device: a function that forgot to move its input fails with a device mismatch, one that moved it
returns a meta tensor of the right shape.
"""

from __future__ import annotations

import torch

from ovlib.eval._common import dense_fn_for_clip, dense_fn_for_vfm
from ovlib.methods.denserc import DenseConstructor, DenseRCConfig, denserc_dense_fn
from ovlib.models import load_clip, load_vfm
from ovlib.models.images import model_device, to_model


def test_model_device_and_to_model():
    lin = torch.nn.Linear(2, 2).to("meta")
    assert model_device(lin) == torch.device("meta")
    assert model_device(torch.nn.Identity()) == torch.device("cpu")  # no parameters: the CPU
    assert to_model(torch.zeros(1, 2), lin).device.type == "meta"


def test_clip_and_vfm_dense_fns_move_cpu_images_to_the_model():
    clip, _, _ = load_clip("micro-clip", seed=0)
    vfm = load_vfm("micro-vfm", seed=0)
    x = torch.rand(2, 3, 64, 64)  # on the CPU, as the evaluation loops build them
    ref = dense_fn_for_clip(clip, "sclip")(x)  # (2, C, 8, 8) on the CPU
    clip, vfm = clip.to("meta"), vfm.to("meta")
    for fn in (dense_fn_for_clip(clip, "sclip"), dense_fn_for_clip(clip, "vanilla"), dense_fn_for_vfm(vfm)):
        y = fn(x)
        assert y.device.type == "meta" and y.shape[0] == 2 and y.shape[-2:] == ref.shape[-2:]
    cons = DenseConstructor.for_model(DenseRCConfig(), clip).to("meta")  # HSG over the multi-layer values
    y = denserc_dense_fn(clip, cons)(x)
    assert y.device.type == "meta" and y.shape[-2:] == ref.shape[-2:]
