"""Real model sizes on one node: weights stored in bfloat16 (log-probs and loss in fp32), and LoRA through peft
(only the adapter trains, the reference is the base with the adapter off, the saved policy is merged)."""

from __future__ import annotations

import copy

import pytest
import torch

from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.logprobs import completion_logps
from grpo_steps.grpo.rewards import digit_match
from grpo_steps.grpo.sampling import sample_groups
from grpo_steps.grpo.trainer import GRPOTrainer, is_adapter
from grpo_steps.platform.config import GRPOConfig, LoraConfig, ModelConfig, load_config
from grpo_steps.platform.modeling import apply_lora, build_policy, load_policy, merged

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # tests/algorithm/conftest.py

ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (13, 4), (25, 31), (7, 70)]]
SMALL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def _policy(tok, **model):
    torch.manual_seed(0)
    return build_policy(ModelConfig(**{**SMALL, **model}), tok)


def _grpo(**kw) -> GRPOConfig:
    return GRPOConfig(**{"prompts_per_step": 4, "num_generations": 4, "learning_rate": 5e-2, "beta": 0.1, **kw})


def _step_until_it_learns(trainer: GRPOTrainer, tries: int = 6) -> None:
    """Train steps until one had reward variance (a batch of equal rewards has zero advantages)."""
    for _ in range(tries):
        if trainer.train_step(ROWS)["reward_std_within_group"] > 0:
            return
    pytest.fail(f"no generation batch with mixed rewards in {tries} steps")


def test_bfloat16_weights_train_with_fp32_logprobs_and_loss():
    tok = build_tokenizer()
    policy = _policy(tok, dtype="bfloat16")
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = GRPOTrainer(policy, tok, [digit_match], [1.0], _grpo(), seed=0)
    assert {p.dtype for p in trainer.ref_model.parameters()} == {torch.bfloat16}
    rollout = sample_groups(trainer.unwrapped, tok, [r["prompt"] for r in ROWS], 2, 4)
    logps, _ = completion_logps(trainer.model, rollout.input_ids, rollout.attention_mask,
                                rollout.completion_ids.size(1))
    assert logps.dtype == torch.float32  # the log-softmax is taken in fp32, whatever the weights are
    torch.manual_seed(0)
    _step_until_it_learns(trainer)
    after = trainer.unwrapped.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in after.values())
    assert trainer.weights_finite()
    assert any(not torch.equal(start[k], after[k]) for k in start), "a bf16 step must move the weights"


def test_dtype_is_kept_on_save_and_load(tmp_path):
    tok = build_tokenizer()
    _policy(tok, dtype="bfloat16").save_pretrained(tmp_path, safe_serialization=True)
    assert {p.dtype for p in load_policy(tmp_path, dtype="auto").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_policy(tmp_path).parameters()} == {torch.float32}  # the default: float32


def test_lora_step_changes_only_the_adapter_and_the_reference_is_the_base():
    tok = build_tokenizer()
    base = _policy(tok)
    frozen = copy.deepcopy(base).eval()  # what the reference must compute
    policy = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8))
    assert is_adapter(policy)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = GRPOTrainer(policy, tok, [digit_match], [1.0], _grpo(), seed=0)
    assert trainer.ref_model is None and trainer.ref_is_base  # no second copy of the weights
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == \
        {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    torch.manual_seed(0)
    _step_until_it_learns(trainer)
    after = trainer.unwrapped.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert any("lora_B" in k for k in changed)  # the adapter now adds something

    rollout = sample_groups(trainer.unwrapped, tok, [r["prompt"] for r in ROWS], 2, 4)
    ref = trainer.reference_logps(rollout)
    with torch.no_grad():
        expected, _ = completion_logps(frozen, rollout.input_ids, rollout.attention_mask,
                                       rollout.completion_ids.size(1))
        current, _ = completion_logps(trainer.unwrapped, rollout.input_ids, rollout.attention_mask,
                                      rollout.completion_ids.size(1))
    mask = rollout.completion_mask  # the reference runs with the prompt shared: equal up to float summation order
    torch.testing.assert_close(ref * mask, expected * mask, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(current, expected), "the adapter is on outside the reference"
    assert trainer.unwrapped.training  # computing the reference leaves the policy as it was


def test_merged_lora_policy_is_a_plain_model_computing_base_plus_adapter(tmp_path):
    tok = build_tokenizer()
    policy = apply_lora(_policy(tok), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained-looking adapter
    ids = torch.tensor([tok.encode("12+34=")])
    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
    plain = merged(policy)
    assert not is_adapter(plain) and not any("lora" in k for k in plain.state_dict())
    plain.save_pretrained(tmp_path, safe_serialization=True)
    with torch.no_grad():
        reloaded = load_policy(tmp_path)(input_ids=ids).logits
    torch.testing.assert_close(reloaded, adapted, rtol=1e-4, atol=1e-4)


def test_lora_and_dtype_are_typed_settings():
    cfg = load_config(None, ["model.dtype=bfloat16", "model.lora={r: 8, alpha: 16, target_modules: [q_proj]}"])
    assert cfg.model.dtype == "bfloat16" and cfg.model.lora.r == 8 and cfg.model.lora.target_modules == ["q_proj"]
    with pytest.raises(Exception, match="model.lora.r"):
        load_config(None, ["model.lora={r: 0}"])
    with pytest.raises(Exception, match="model.dtype"):
        load_config(None, ["model.dtype=float8"])


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, alpha=8)], ids=["full", "lora"])
def test_activation_checkpointing_gives_the_same_update(lora):
    """Recomputing activations in the backward pass changes memory, not the update (LoRA included: the
    adapter still gets its gradient through checkpointed frozen layers)."""
    tok = build_tokenizer()
    base = _policy(tok)
    torch.manual_seed(3)
    rollout = sample_groups(base, tok, [r["prompt"] for r in ROWS], 4, 4)
    from grpo_steps.grpo.trainer import GenerationBatch

    advantages = torch.linspace(-1, 1, rollout.completion_ids.size(0))
    results = []
    for checkpointing in (False, True):
        policy = copy.deepcopy(base)
        if checkpointing:
            policy.activation_checkpointing_enable()
        torch.manual_seed(5)  # the same adapter initialisation both times
        policy = apply_lora(policy, lora)
        # the full pass both times (a KV cache cannot carry a prompt through checkpointed layers, so with
        # share_prompt the plain run would take the shared path: tests/algorithm/test_share_prompt.py compares those)
        trainer = GRPOTrainer(policy, tok, [digit_match], [1.0], _grpo(share_prompt=False), seed=0)
        before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
        n = rollout.completion_ids.size(0)
        trainer.update(GenerationBatch(rollout, torch.zeros(n), torch.zeros(n, 1), advantages, torch.ones(n)))
        after = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
        assert any(not torch.equal(before[k], after[k]) for k in after), "the update moved nothing"
        results.append(after)
    plain, checkpointed = results
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-6)


def test_an_accelerator_of_accelerates_fsdp_is_refused():
    """accelerate's FSDP wraps the model in ways the loop does not drive (the stage shards it itself with
    model.sharding: fsdp2): refused, naming what to use instead."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from grpo_steps.platform.config import ConfigError
    from grpo_steps.stages.grpo import refuse_sharded

    with pytest.raises(ConfigError, match="fsdp.yaml.*model.sharding=fsdp2"):
        refuse_sharded(SimpleNamespace(distributed_type=DistributedType.FSDP))
    refuse_sharded(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # DDP over gloo: fine


def test_an_fsdp_launch_shards_the_policy_in_the_loop(monkeypatch):
    """`accelerate launch --config_file infra/accelerate/fsdp.yaml` (FSDP2) sets ACCELERATE_USE_FSDP and
    FSDP_VERSION for its processes: the grpo stage takes it as model.sharding fsdp2 and builds its Accelerator as
    a DDP launch's; version 1, LoRA and fp16 are refused before any model loads."""
    from grpo_steps.platform.config import ConfigError, load_config
    from grpo_steps.stages.grpo import launch_sharding

    cfg = load_config(None)
    assert launch_sharding(cfg) is cfg  # no FSDP launch: as configured
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1"):
        launch_sharding(cfg)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="model.lora"):
        launch_sharding(load_config(None, ["model.lora={r: 4, alpha: 8}"]))
    with pytest.raises(ConfigError, match="fp16"):  # the model section's rules, as for --set model.sharding=fsdp2
        launch_sharding(load_config(None, ["model.precision=fp16"]))
    assert launch_sharding(cfg).model.sharding == "fsdp2"
    import os

    assert os.environ["ACCELERATE_USE_FSDP"] == "false"  # the stage's Accelerator is DDP's


def _length_reward(prompts, completions, **_):
    """Rewards that spread in every group (an untrained policy rarely earns digit_match), so every step has a
    gradient."""
    return [-float(len(c)) for c in completions]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_bf16_step_is_the_fp32_step_within_bf16_rounding(seed):
    """The same policy stored in bf16 and in fp32 (the bf16 one its rounding), one GRPO step each on the same
    prompts: the same samples and rewards, KL exactly 0 (one precision path for policy and reference), log-probs,
    gradient norm and update direction within bf16's rounding. Measured (seeds 0-2, 1 and 2 threads): log-probs
    differ by at most 2.3e-3 (nonzero: bf16 really ran), the gradient norm by at most 0.32% relative, and the
    updates' cosine is at least 0.956; the bounds are 1e-2, 2% and 0.85."""
    from grpo_steps.platform.modeling import begin_stage

    tok = build_tokenizer()
    torch.manual_seed(seed)
    fp32 = build_policy(ModelConfig(**SMALL), tok)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    start = {k: v.float().clone() for k, v in fp32.state_dict().items()}

    rollout = sample_groups(fp32, tok, [r["prompt"] for r in ROWS], 4, 4)
    length = rollout.completion_ids.size(1)
    with torch.no_grad():
        lp32, _ = completion_logps(fp32, rollout.input_ids, rollout.attention_mask, length)
        lp16, _ = completion_logps(bf16, rollout.input_ids, rollout.attention_mask, length)
    gap = (lp32 - lp16).abs()[rollout.completion_mask.bool()]
    assert 0 < float(gap.max()) <= 1e-2

    steps = {}
    for name, policy in (("fp32", fp32), ("bf16", bf16)):
        begin_stage(0)  # a fresh accelerator for each trainer
        trainer = GRPOTrainer(policy, tok, [_length_reward], [1.0], _grpo(learning_rate=1e-3), seed=seed)
        metrics = trainer.train_step(ROWS)
        update = torch.cat([(v.float() - start[k]).flatten() for k, v in trainer.unwrapped.state_dict().items()])
        steps[name] = (metrics, update)
    (m32, u32), (m16, u16) = steps["fp32"], steps["bf16"]
    assert m32["reward"] == m16["reward"] and m32["reward_std"] == m16["reward_std"]  # the same samples
    assert m32["kl"] == m16["kl"] == 0.0
    assert m32["grad_norm"] > 0 and abs(m16["grad_norm"] - m32["grad_norm"]) <= 0.02 * m32["grad_norm"]
    assert float(torch.nn.functional.cosine_similarity(u32, u16, dim=0)) >= 0.85
