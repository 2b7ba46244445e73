"""grpo-pipeline: GRPO fine-tuning of language models as reproducible, tracked pipeline stages."""

__version__ = "0.1.0"
