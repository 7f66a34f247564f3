"""Pre-training: the one loop, the train step (and its distillation variant), optimizer, checkpoints,
metrics, run directories."""
