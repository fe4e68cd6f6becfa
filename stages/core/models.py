"""Tokenizers and models: the embedded tiny ones built offline, and loading any HF causal LM.

The embedded default is saved with `save_pretrained` and read back with the `Auto*` classes, so the
loading path that the tests exercise is the one a hub model takes.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from . import dist, fsdp, io, lora
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

def load_gguf(path: str | Path):
    """(tokenizer, float32 causal LM) from a GGUF file, ready for save_pretrained.

    transformers dequantizes GGUF weights to float on load (needs the `gguf` package) but refuses to
    save a model loaded that way ("not serializable"), so the architecture is rebuilt from its config
    without the quantization entry and the dequantized weights are loaded into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path).expanduser()
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError(f"model.name_or_path: {path} is not a GGUF file (no GGUF magic bytes)")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ConfigError("model.name_or_path: reading a .gguf file needs the `gguf` package") from None
    kw = {"gguf_file": path.name}
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, **kw)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    except Exception as e:  # gguf/transformers raise many types for a damaged or unsupported file
        raise ConfigError(f"model.name_or_path: could not read {path} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = GenerationConfig.from_model_config(config)
    model.config.name_or_path = model.name_or_path = path.name
    return tok, model


def load_tokenizer(path: str):
    """The tokenizer of a saved model, padded on the left (pad = EOS where it has no pad token), with
    `stop_token_ids`: every token that ends a completion (see stop_ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # many causal LMs ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    tok.stop_token_ids = saved_stop_ids(path, tok)
    return tok


def generation_stop_ids(tok, listed=None) -> list[int]:
    """The tokenizer's EOS plus every `eos_token_id` a generation config lists (`listed`: an id, a
    list or None): a chat model may end a turn with a token that is not its tokenizer's EOS."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids += listed if isinstance(listed, list) else [listed] if listed is not None else []
    return list(dict.fromkeys(ids))


def saved_stop_ids(path: str | Path, tok) -> list[int]:
    """generation_stop_ids of a saved model (its generation_config.json, when it has one)."""
    gen = Path(path) / "generation_config.json"
    return generation_stop_ids(tok, json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None)


def stop_ids(tok) -> list[int]:
    """Tokens that end a completion: those load_tokenizer found, else the tokenizer's EOS."""
    return list(getattr(tok, "stop_token_ids", None) or [tok.eos_token_id])


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save(model, tok, out: str | Path, dtype: torch.dtype = torch.float32, adapter_only: bool = False,
         state: dict | None = None) -> None:
    """save_pretrained of the model in `dtype` and its tokenizer. Trained models are saved in float32: a
    fine-tuning step moves a weight by less than bf16's resolution, so a bf16 copy loses the training
    (measured on SmolLM2-135M after 10 DPO steps at lr 5e-6: 2.6% of the weights change at all in bf16,
    and the bf16 delta is off from the true one by 97% of its norm). A LoRA model is merged (base +
    adapter folded into plain weights) unless adapter_only: then the adapter alone, with the model's
    config (a reward model's score statistics live there), and its base recorded in adapter_config.json.
    state: the model's full state dict when its own parameters are shards (FSDP)."""
    if state is not None and lora.is_lora(model):
        model, state = lora.unsharded(model, state), None
    if state is not None:
        model.save_pretrained(out, state_dict={k: v.to(dtype) for k, v in state.items()})
        tok.save_pretrained(out)
        return
    if lora.is_lora(model):
        if adapter_only:
            lora.save_adapter(model, tok, out)
            return
        model = model.merge_and_unload()
    model.to(dtype).save_pretrained(out)
    tok.save_pretrained(out)


def non_finite_weights(model, state: dict | None = None) -> tuple[int, list[str]]:
    """(how many weights are NaN or infinite, the names of the tensors that hold them); state: the full
    state dict of a sharded model."""
    count, names, seen = 0, [], set()
    for name, p in (model.state_dict() if state is None else state).items():
        if p.is_floating_point() and p.data_ptr() not in seen:  # tied weights once
            seen.add(p.data_ptr())
            bad = int((~torch.isfinite(p)).sum())
            if bad:
                count += bad
                names.append(name)
    return count, names


def backbone(model):
    """The transformer body (LlamaModel, …) under a *ForSequenceClassification head, LoRA-wrapped or not
    (a peft model's own `base_model` is its LoRA wrapper)."""
    return (model.get_base_model() if lora.is_lora(model) else model).base_model


def for_training(model, c, task: str = "CAUSAL_LM"):
    """The model a stage trains, as its params section `c` says: gradient checkpointing (activations
    recomputed in the backward pass) and LoRA adapters through peft (c.lora.r > 0: only the adapters,
    and a reward or value model's score head, are trained); sharded with FSDP when the machine says so
    (dist.fsdp)."""
    if c.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if c.lora.r:
        model = lora.wrap(model, c.lora, task)
    return fsdp.shard(model, task) if dist.fsdp() else model


def _from_pretrained(auto, path: str, **kwargs):
    """auto.from_pretrained in float32; a directory holding a LoRA adapter alone loads its base and merges
    it. A model that cannot be read (a truncated weights file, a broken config) is a one-line error naming
    the path."""
    from safetensors import SafetensorError

    try:
        return _load(auto, path, **kwargs)
    except ConfigError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}: could not load the model ({type(e).__name__}: {reason[:200]})") from None


def _load(auto, path: str, **kwargs):
    if lora.is_adapter_dir(path):
        return lora.load_merged(auto.__name__, path, **kwargs)
    return auto.from_pretrained(path, dtype=torch.float32, **kwargs)


def load_causal_lm(path: str, device: torch.device, trainable: bool = True):
    """A causal LM in float32 whatever its stored dtype (bf16 autocast, where on, is per operation)."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, path).to(device)
    return model.train() if trainable else frozen(model, "CAUSAL_LM")


def load_pretrained(name_or_path: str, field: str):
    """(tokenizer, model) of a model from outside the pipeline, on the CPU: a saved model directory, a .gguf
    file or a hub id in the local cache. Every problem is a ConfigError naming the params field: no
    tokenizer beside the weights, not a causal LM, NaN or infinite weights."""
    io.check_model_path(name_or_path, field)
    if name_or_path.lower().endswith(".gguf"):
        tok, model = load_gguf(name_or_path)
    else:
        try:
            tok = load_tokenizer(name_or_path)
        except (OSError, ValueError) as e:
            reason = " ".join(str(e).split())
            raise ConfigError(f"{field}: could not load a tokenizer from {name_or_path!r} ({reason[:200]}); "
                              "save the tokenizer beside the weights") from None
        try:
            model = load_causal_lm(name_or_path, "cpu")
        except ConfigError as e:
            raise ConfigError(f"{field}: {e}") from None
    bad, names = non_finite_weights(model)
    if bad:
        raise ConfigError(f"{field}: {name_or_path}: {bad} weights are NaN or infinite (in {names[0]}); "
                          "nothing can be trained from it")
    return tok, model


def frozen(model, task: str):
    """A model that is only run, never trained (a reference, a reward model, the policy evaluate
    measures): in eval mode, without gradients, and sharded like a trained one under FSDP (no process
    holds a whole copy)."""
    model.eval().requires_grad_(False)
    return fsdp.shard(model, task) if dist.fsdp() else model


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

    model = _from_pretrained(AutoModelForSequenceClassification, path, num_labels=1).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model.train() if trainable else frozen(model, "SEQ_CLS")


# ---------------------------------------------------------------------------------------------- device

def pick_device() -> torch.device:
    """ALIGNPIPE_DEVICE (cpu, cuda, cuda:1, …) or CUDA when present. Where a stage runs is not one of
    its params: the same params give the same artifact on a laptop and on a GPU worker."""
    want = os.environ.get("ALIGNPIPE_DEVICE", "auto")
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


_CPU_BF16 = False
"""bf16 autocast on the CPU for this process (set by setup_torch from the model's stored dtype)."""


def cpu_has_fast_bf16() -> bool:
    """A CPU with native bf16 matrix units (AMX or AVX512-BF16), where bf16 autocast beats fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


BF16_MIN_BYTES = 64 * 2**20
"""Models whose weight files are at least this large (~16M parameters in fp32) run under bf16 autocast on
a CPU with native bf16 units; smaller ones (the embedded tiny model) are as fast in exact fp32."""


def setup_torch(seed: int, model_dir: str | Path | None = None) -> torch.device:
    """Seed, thread count, denormals and precision for a stage whose model is `model_dir`.

    Precision follows the machine and the model, not a param: bf16 autocast on CUDA, and on a CPU
    with native bf16 units (AMX or AVX512-BF16) for a model of BF16_MIN_BYTES or more (1.66x the fp32
    fwd+bwd tokens/s of SmolLM2-135M on a 2-core AMX machine); exact fp32 otherwise (the embedded
    model). Weights are always held (and trained) in fp32. ALIGNPIPE_AUTOCAST=off|bf16 overrides.
    """
    global _CPU_BF16
    torch.manual_seed(seed)
    # Subnormal floats take a slow path on x86 CPUs: late in training, when some activations or
    # optimizer moments get tiny, steps slowed down 10x here. Flushing them to zero costs nothing.
    torch.set_flush_denormal(True)
    threads = int(os.environ.get("ALIGNPIPE_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    want = os.environ.get("ALIGNPIPE_AUTOCAST", "auto")
    large = model_dir is not None and sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) \
        >= BF16_MIN_BYTES
    _CPU_BF16 = want == "bf16" or (want == "auto" and large and cpu_has_fast_bf16())
    device = dist.local_device(pick_device())
    dist.init(device)
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA, and on the CPU when setup_torch chose it; plain fp32 otherwise."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if _CPU_BF16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def exact(device: torch.device) -> bool:
    """True where this process computes in plain fp32: log-probs of the same weights agree to ~1e-6,
    so a gap between two computations of them is an error, not rounding."""
    return device.type == "cpu" and not _CPU_BF16


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
