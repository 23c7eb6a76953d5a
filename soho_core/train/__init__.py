"""Training: distributed set-up, the engine, checkpoints and tracking."""
