"""Training loops, checkpoints and logging (above the optimizers and the meta-learner)."""
