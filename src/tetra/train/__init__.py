"""Training: losses, optimizer and schedules, checkpoints, metrics, and the loop.

Entry point: tetra.train.trainer.train(config).
"""
