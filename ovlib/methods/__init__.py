"""Methods: one file per method; each exposes pure loss functions and a :class:`Distiller` for the trainer.

:data:`METHODS` maps ``--method`` names of ``python -m ovlib.train`` to their :class:`Distiller` classes.
A name appears here only once its method is implemented and tested.
"""

from ovlib.methods.base import Distiller
from ovlib.methods.clipself import CLIPSelf, rla_loss

METHODS: dict[str, type[Distiller]] = {
    CLIPSelf.name: CLIPSelf,
}


def get_method(name: str) -> type[Distiller]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; implemented: {sorted(METHODS)}") from None


__all__ = ["Distiller", "CLIPSelf", "rla_loss", "METHODS", "get_method"]
