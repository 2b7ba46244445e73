"""One GRPO update on a fixed generation batch, in however many processes `accelerate launch` started.

Every process samples the *same* full batch (same seed, same weights), takes its contiguous share of
whole groups, and runs `GRPOTrainer.update`; process 0 saves the updated weights. Run with 1 and with
2 processes, the saved weights must agree: that is what makes the global batch, not the split, define
the update.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

from grpo_steps.config import GRPOConfig
from grpo_steps.grpo.advantages import group_advantages
from grpo_steps.grpo.rewards import digit_match, score_completions
from grpo_steps.grpo.sampling import sample_groups
from grpo_steps.grpo.trainer import GenerationBatch, GRPOTrainer
from grpo_steps.modeling import load_policy, load_tokenizer

PROMPTS = ["12+34=", "7+8=", "55+45=", "3+9=", "60+21=", "9+90="]


def main(policy_dir: str, out: str, loss_type: str, mu: int) -> None:
    acc = Accelerator(cpu=True)
    tok = load_tokenizer(policy_dir)
    policy = load_policy(policy_dir)
    cfg = GRPOConfig(prompts_per_step=len(PROMPTS), num_generations=4, micro_batch_size=5, mu=mu, beta=0.05,
                     loss_type=loss_type, epsilon_high=0.28, learning_rate=1e-2, max_completion_length=4,
                     reward_functions=[{"name": "digit_match"}],
                     # one process would share prompts and merge rows, which DDP does not (tests/unit/
                     # test_share_prompt.py checks those against this full pass): the same computation both ways
                     share_prompt=False, merge_identical_rows=False)
    trainer = GRPOTrainer(policy, tok, [digit_match], [1.0], cfg, accelerator=acc)
    torch.manual_seed(1234)
    rollout = sample_groups(trainer.unwrapped, tok, PROMPTS, cfg.num_generations, cfg.max_completion_length)
    answers = [str(eval(p[:-1])) for p in PROMPTS for _ in range(cfg.num_generations)]  # noqa: S307 - our literals
    per_func, rewards = score_completions([digit_match], [1.0], rollout.prompts, rollout.completions,
                                          {"answer": answers})
    advantages, group_std = group_advantages(rewards, cfg.num_generations)
    per = len(PROMPTS) // acc.num_processes * cfg.num_generations
    mine = slice(acc.process_index * per, (acc.process_index + 1) * per)
    batch = GenerationBatch(rollout[mine], rewards[mine], per_func[mine], advantages[mine], group_std[mine])
    trainer.update(batch)
    if acc.is_main_process:
        torch.save({k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}, out)
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
