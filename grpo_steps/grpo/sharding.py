"""FSDP2 inside the GRPO loop: torch's `fully_shard` on the policy and the reference, each decoder layer a unit
of its own and the rest (embeddings, final norm, a tied LM head) the root's.

Every process keeps 1/N of each weight, its gradient and its AdamW moments; a forward gathers each layer's
weights as it reaches it (a collective), so every process must run every forward: the update's micro-batches
are equal in number on every process (the plan computes every row), and generation steps in lock-step
(`sample_groups(lockstep=True)`). Checkpoints are sharded too (`save_sharded`, torch.distributed.checkpoint: each
process writes its own shards, and a load reshards to whatever the processes are then). The exported policy
gathers the whole model once (`full_state_dict`, a collective that hands it to the main process).
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


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    """Weights and optimizer state into `folder`, each process writing its own shards (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer), checkpoint_id=folder)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    """What `save_sharded` wrote, resharded to this run's processes (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
