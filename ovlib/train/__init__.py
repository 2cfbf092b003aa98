"""Training: micro pre-training (:mod:`ovlib.train.pretrain`), the teacher-student loop, and the F-ViT detector
(:mod:`ovlib.train.detect`)."""

# the MAE objective of the micro VFM registers itself with ovlib.train.pretrain (budgets.pretrain.vfm.objective)
from ovlib.train import mae as _mae  # noqa: E402,F401
