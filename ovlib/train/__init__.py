"""Training: micro pre-training (:mod:`ovlib.train.pretrain`), the teacher-student loop, and the F-ViT detector
(:mod:`ovlib.train.detect`)."""
