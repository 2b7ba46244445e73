"""GRPO, step by step: sample groups -> score -> group-relative advantages -> clipped surrogate + KL update.

Each step is its own small module of pure functions; `trainer.py` strings them into the training loop.
"""
