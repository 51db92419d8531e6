"""Training: optimizer, pure train step, checkpoints, metrics, sampling."""
