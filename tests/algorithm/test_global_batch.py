"""The batch sizes of params.yaml are global (rows per optimizer step, all processes together) and the warm-up
settings ratios, whatever TRL's per-device, steps-or-ratio arguments call them."""

from __future__ import annotations

import pytest

from grpo_steps.platform.config import ConfigError
from grpo_steps.platform.modeling import per_process_batch, split_trl_batch, trl_warmup


def test_a_global_batch_is_split_evenly_or_refused():
    assert per_process_batch(64, 1, "sft.batch_size") == 64
    assert per_process_batch(64, 2, "sft.batch_size") == 32
    with pytest.raises(ConfigError, match=r"reward_model.batch_size=64 .* 3 processes .* multiple of 3"):
        per_process_batch(64, 3, "reward_model.batch_size")


def test_one_process_keeps_the_whole_batch_in_a_trl_config(tmp_path):
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=48, use_cpu=True, report_to=[])
    split_trl_batch(args, 48, "sft.batch_size")
    assert args.world_size == 1 and args.per_device_train_batch_size == 48 and args.train_batch_size == 48


def test_warmup_ratio_as_transformers_reads_warmup_steps(tmp_path):
    from transformers import TrainingArguments

    def warmup(ratio: float, steps: int) -> int:
        return TrainingArguments(output_dir=str(tmp_path), warmup_steps=trl_warmup(ratio),
                                 use_cpu=True, report_to=[]).get_warmup_steps(steps)

    assert trl_warmup(0.05) == 0.05  # a ratio below 1 passes unchanged
    assert warmup(0.05, 100) == 5 and warmup(0.05, 101) == 6 and warmup(0.0, 100) == 0
    for steps in (1, 7, 2000, 10**6):  # 1.0: warm up throughout, not for one step
        assert warmup(1.0, steps) == steps
