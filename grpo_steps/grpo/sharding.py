"""FSDP2 inside the GRPO loop: torch's `fully_shard` on the policy and the reference, each decoder layer a unit
of its own and the rest (embeddings, final norm, a tied LM head) the root's.

Every process keeps 1/N of each weight, its gradient and its AdamW moments; a forward gathers each layer's
weights as it reaches it (a collective), so every process must run every forward: the update's micro-batches
are equal in number on every process (the plan computes every row), and generation steps in lock-step
(`sample_groups(lockstep=True)`). What needs the whole model gathers it: `full_state_dict`, a collective that
hands the full weights to the main process (checkpoints, the exported policy).
"""

from __future__ import annotations

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module) -> nn.Module:
    """`model` sharded in place over the default process group: each decoder layer, then the whole model."""
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"model.sharding fsdp2: {type(model).__name__} has no *DecoderLayer modules to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a DTensor), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor | float) -> torch.Tensor | float:
    """A sharded tensor gathered whole (a collective), or the value itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, on the main process (empty elsewhere): call on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight once, under its first name, as save_pretrained writes a replicated model
    twins = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in whole.items() if k not in twins}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state (keyed by parameter name) on the main process: call on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict[str, torch.Tensor],
                    optimizer_state: dict | None) -> None:
    """Put whole weights (and an optimizer state of `full_optimizer_state`) into a sharded model: each process
    keeps its shard of what it read."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
