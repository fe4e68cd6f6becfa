"""Fully sharded data parallel: torch FSDP2 (`fully_shard`) for models whose weights, gradients and
optimizer state do not fit one device. Each process holds 1/N of every parameter and gathers a
layer's full weights only while it runs; gradients are reduce-scattered after the backward pass.

Chosen by the machine, as the number of processes is (dist.fsdp): the same params give the same
artifacts. Every model a stage holds is sharded: the one it trains (models.for_training) and those it
only runs (models.frozen: a reference, a reward model). What changes for the rest of the code, and is
handled here or in dist / train / stage:
- every forward pass is a collective, so all processes run the same number of them: generation and
  scoring are split across processes as without FSDP, and a process with fewer rows repeats a pass
  (dist.lockstep); an update runs the same number of micro-batches on each process
  (train.GuardedStep pads with zero-share ones);
- FSDP averages gradients over processes where the loop sums them, so a process's loss is scaled by N;
- checkpoints and the written model are gathered into full state dicts (a collective), written by
  the main process only; a LoRA model is made whole on the main process's CPU and merged there
  (lora.unsharded);
- chunked log-probs run the output head outside the model's forward: that function is registered
  as a forward method of the model, so FSDP gathers the head's weights for it (register_fsdp_forward_method).
"""

from __future__ import annotations

import torch

from . import dist, logprobs, lora


def shard(model, task: str = "CAUSAL_LM"):
    """fully_shard each transformer block (the classes the model lists in `_no_split_modules`), then the
    rest as the root group → the same module, now sharded in place. A reward or value model (SEQ_CLS) is
    scored through its body and head separately (rewards.score_sequences), so each of those is a group of
    its own: a module called outside its group's forward would see only its shard. A LoRA model (peft)
    is sharded the same way, adapters with the layers they adapt."""
    import types

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.world(),))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    if task == "SEQ_CLS":
        fully_shard((model.get_base_model() if lora.is_lora(model) else model).base_model, mesh=mesh)
        fully_shard(model.score, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if task == "CAUSAL_LM":
        setattr(model, logprobs.CHUNKED, types.MethodType(logprobs.chunked_token_logps, model))
        register_fsdp_forward_method(model, logprobs.CHUNKED)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model, tied_once: bool = False) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on the CPU of the main process ({} elsewhere); tied_once:
    a tied weight under its first name only, as save_pretrained writes it. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    if not tied_once:
        return state
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            state.pop(name, None)
        seen.setdefault(id(p), name)
    return state


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's full state (keyed by parameter name) on the main process. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Every process loads the full states it read and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
