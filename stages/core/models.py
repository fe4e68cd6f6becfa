"""Tokenizers and models: the embedded tiny ones built offline, and loading any HF causal LM.

The embedded default is saved with `save_pretrained` and read back with the `Auto*` classes, so the
loading path that the tests exercise is the one a hub model takes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .config import ConfigError

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Roles are single special tokens; an assistant turn ends with EOS, which is what generation stops on.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained with `tokenizers`, digits split one per token, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:], padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(tokenizer, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                     max_positions: int, seed: int):
    """A Llama-architecture causal LM from a transformers config, randomly initialised from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- loading

def check_model_path(name_or_path: str, field: str) -> None:
    """A local directory must hold a saved model; anything path-like that is missing is an error here,
    before any work. A hub id (`org/name`) is left to the loader, which reads the local HF cache."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ConfigError(f"{field}: {name_or_path!r} is a directory without config.json (not a saved model)")
        return
    hub_id = not name_or_path.startswith((".", "/", "~")) and name_or_path.count("/") <= 1
    if p.exists() or not hub_id:
        raise ConfigError(f"{field}: model path {name_or_path!r} does not exist")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # many causal LMs ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(path: str, device: torch.device, trainable: bool = True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def disable_dropout(model):
    """Dropout off in a model that is trained against stored or frozen log-probs (TRL's default for
    DPO, GRPO, PPO): with dropout the ratio and the reference check would see noise, not drift."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def load_reward_model(path: str, device: torch.device, trainable: bool = False, pad_token_id: int | None = None):
    """AutoModelForSequenceClassification with one label: the HF convention for a scalar reward model."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------- device

def pick_device() -> torch.device:
    """ALIGNPIPE_DEVICE (cpu, cuda, cuda:1, …) or CUDA when present. Where a stage runs is not one of
    its params: the same params give the same artifact on a laptop and on a GPU worker."""
    want = os.environ.get("ALIGNPIPE_DEVICE", "auto")
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def setup_torch(seed: int) -> torch.device:
    torch.manual_seed(seed)
    # Subnormal floats take a slow path on x86 CPUs: late in training, when some activations or
    # optimizer moments get tiny, steps slowed down 10x here. Flushing them to zero costs nothing.
    torch.set_flush_denormal(True)
    threads = int(os.environ.get("ALIGNPIPE_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    return pick_device()


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on the CPU (CPU bf16 is slower than fp32 on most machines)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
