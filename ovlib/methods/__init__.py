"""Methods: one file per method; each exposes pure loss functions and a :class:`Distiller` for the trainer.

:data:`METHODS` maps ``--method`` names of ``python -m ovlib.train`` to their :class:`Distiller` classes.
A name appears here only once its method is implemented and tested. :mod:`ovlib.methods.fvit` (the F-ViT
detector, a downstream model on a frozen CLIP, not a distillation) is not one of them.
"""

from ovlib.methods.base import Distiller
from ovlib.methods.clipself import CLIPSelf, rla_loss
from ovlib.methods.declip import DeCLIP
from ovlib.methods.denserc import DenseRC
from ovlib.methods.rsc import RSCE2E, RSCV, RefinerStage, RegionText, RSCCLIPSelf, SCCLIPSelf
from ovlib.methods.synclip import SynCLIP
from ovlib.methods.synseg import SynSeg

METHODS: dict[str, type[Distiller]] = {
    cls.name: cls
    for cls in (CLIPSelf, RegionText, SCCLIPSelf, RefinerStage, RSCCLIPSelf, RSCV, RSCE2E, DeCLIP, SynCLIP, DenseRC,
                SynSeg)
}


def get_method(name: str) -> type[Distiller]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; implemented: {sorted(METHODS)}") from None


__all__ = ["Distiller", "CLIPSelf", "RegionText", "SCCLIPSelf", "RefinerStage", "RSCCLIPSelf", "RSCV", "RSCE2E",
           "DeCLIP", "SynCLIP", "DenseRC", "SynSeg", "rla_loss", "METHODS", "get_method"]
