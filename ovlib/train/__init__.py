"""Training: micro pre-training (:mod:`ovlib.train.pretrain`) and the teacher-student loop."""
