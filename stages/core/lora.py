"""LoRA through peft (Hu et al. 2021): adapters on the model a stage trains, the reference that is the
policy with its adapter off (no second copy of the weights), and an adapter saved alone and loaded back
merged onto its base."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def wrap(model, c, task: str):
    """The model with LoRA adapters as `c` (a config.LoraConfig) says; only the adapters, and a reward or
    value model's score head (task SEQ_CLS), are trained."""
    from peft import LoraConfig, get_peft_model

    target = "all-linear" if c.target_modules == ["all-linear"] else list(c.target_modules)
    try:
        return get_peft_model(model, LoraConfig(r=c.r, lora_alpha=c.alpha or 2 * c.r, lora_dropout=c.dropout,
                                                target_modules=target, task_type=task))
    except ValueError as e:  # target modules not found in the model
        raise ConfigError(f"lora.target_modules: {str(e).splitlines()[0]}") from None


class AdapterOff(torch.nn.Module):
    """The reference model of a LoRA policy: the policy itself with its adapter disabled, so no second
    copy of the weights is held."""

    def __init__(self, policy):
        super().__init__()
        self.__dict__["policy"] = policy  # not a submodule: its weights are the policy's

    def forward(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


def unsharded(model, state: dict[str, torch.Tensor]):
    """A LoRA model whose parameters are shards (FSDP) and its gathered full state (fsdp.full_state) →
    the same LoRA model whole, on the CPU, to merge or save: built on the meta device (no second
    initialisation), then given the state's tensors."""
    import copy

    from peft import get_peft_model

    base = model.get_base_model()
    with torch.device("meta"):
        whole = get_peft_model(type(base)(base.config), copy.deepcopy(model.peft_config["default"]))
    whole.load_state_dict(state, strict=False, assign=True)
    whole.get_base_model().tie_weights()  # a tied output head is in the state once, under the embeddings
    left = [name for name, p in whole.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"the gathered LoRA state lacks {len(left)} tensors ({left[0]}, ...)")
    return whole


def save_adapter(model, tok, out: str | Path) -> None:
    """The adapter alone, with the model's config (a reward model's score statistics live there) and its
    tokenizer; adapter_config.json records the base."""
    model.save_pretrained(out)
    model.config.save_pretrained(out)
    tok.save_pretrained(out)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_merged(auto_name: str, path: str, **kwargs):
    """A directory holding an adapter alone → its base with the adapter merged in, in float32, with the
    saved config's reward_mean / reward_std restored. auto_name: AutoModelForCausalLM or
    AutoModelForSequenceClassification."""
    import peft
    from transformers import AutoConfig

    peft_auto = {"AutoModelForCausalLM": peft.AutoPeftModelForCausalLM,
                 "AutoModelForSequenceClassification": peft.AutoPeftModelForSequenceClassification}[auto_name]
    model = peft_auto.from_pretrained(path, dtype=torch.float32, **kwargs).merge_and_unload()
    saved = AutoConfig.from_pretrained(path).to_dict()  # what the trained model's config held
    for key in ("reward_mean", "reward_std"):
        if key in saved:
            setattr(model.config, key, saved[key])
    return model


def merged_state(model) -> dict[str, torch.Tensor]:
    """A LoRA model's weights with each adapter folded in (W + scaling·B·A, peft's get_delta_weight), under
    the base checkpoint's names, computed aside: the model itself is left as it is (merging in place and
    back would round its base weights)."""
    base = model.get_base_model()
    state = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    with torch.no_grad():
        for name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                for adapter in module.active_adapters:
                    key = f"{name}.weight"
                    state[key] = state[key] + module.get_delta_weight(adapter)
    return state
