"""Typed, validated params: one section per stage, every field documented.

`load(path)` reads params.yaml and validates ALL of it (so a typo anywhere fails the first stage,
before any compute); a stage then reads only its own section(s). An unknown key, a wrong type or a
value out of range raises ConfigError with one line naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A one-line, user-facing error about params.yaml or an input file."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, frozen=True)


# ---------------------------------------------------------------------------------------------- model & data

class EmbeddedModel(Section):
    vocab_size: int = Field(300, ge=262, le=65536)
    """BPE vocabulary of the embedded tokenizer (byte alphabet 256 + specials + merges)."""
    hidden_size: int = Field(128, ge=8)
    """Width of the tiny Llama."""
    num_layers: int = Field(4, ge=1)
    """Decoder layers."""
    num_heads: int = Field(4, ge=1)
    """Attention heads (and KV heads)."""
    intermediate_size: int = Field(384, ge=8)
    """MLP width."""
    max_positions: int = Field(64, ge=16)
    """Longest sequence (prompt + completion) the model accepts."""


class ModelConfig(Section):
    name_or_path: str = "embedded"
    """`embedded` (tiny Llama built from a config, no network), a local model directory, a hub id
    already in the local Hugging Face cache (e.g. Qwen/Qwen2.5-0.5B-Instruct), or a local `.gguf` file
    (dequantized and converted once to a normal checkpoint by prepare; needs the `gguf` package)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype prepare stores the base model in: auto = bfloat16 for a pretrained model (half the disk; a
    GGUF's dequantized weights lose nothing that matters), float32 for the embedded one. Trained models
    are always stored in float32 (a fine-tuning step is below bf16's resolution: models.save)."""
    chat_template: str = ""
    """A Jinja chat template (or a file holding one) for a model whose tokenizer has none; empty: the
    model's own. Conversational data needs one."""
    embedded: EmbeddedModel = EmbeddedModel()


class EmbeddedData(Section):
    task: Literal["reversed_addition", "chat_arithmetic", "python_functions"] = "reversed_addition"
    """reversed_addition: `12+34=` → `64` for the tiny model trained from scratch; chat_arithmetic:
    natural-language sums and word problems ("What is 47 + 38?") answered in a sentence, for a
    pretrained chat model (use with verifier.extract: auto); python_functions: `f(x) = x + 13` answered
    with a program, rewarded by running the row's tests in the sandbox (reward.code)."""
    max_operand: int = Field(50, ge=2, le=1000)
    """Problems are sums of operands with 0 <= each < max_operand."""
    terms: int = Field(2, ge=2, le=6)
    """Operands per problem: the difficulty knob. The answer is the chain of running sums (12+34+45= →
    "64 19": 46, then 91), each step a two-number sum that reads the step before; the demonstrator drops
    each carry with probability carry_slip and carries a wrong sum on, so every step must be right. 2 is
    the original task. A chain of n terms needs 4(n − 1) new tokens at most: raise every max_new_tokens
    (8) from 4 terms on. python_functions takes 2 only."""
    n_sft: int = Field(20000, ge=1)
    """SFT demonstrations (drawn with replacement from the training problems)."""
    carry_slip: float = Field(0.6, ge=0.0, le=1.0)
    """Chance that the SFT demonstrator drops a carry (7+5 >= 10 in the units), per carrying column: a
    systematic demonstrator error that caps SFT accuracy and that preferences and the verifier fix."""
    sft_noise: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of the other SFT demonstrations with a random plausible mistake."""
    n_preference: int = Field(4000, ge=2)
    """Preference pairs for the reward model (chosen = right, rejected = plausible mistake)."""
    carry_pairs: float = Field(0.7, ge=0.0, le=1.0)
    """Share of preference pairs whose rejected answer gets the carry wrong (dropped where due, added
    where not); the rest are other plausible mistakes."""
    n_prompts: int = Field(2000, ge=1)
    """Training prompts for sampling (pairs stage, online methods)."""
    n_eval: int = Field(300, ge=1)
    """Held-out problems for evaluation; no training set contains them. A seed's accuracy has a standard
    error of sqrt(p(1-p)/n_eval): 2.9 points at p 0.5 and n_eval 300, under 2 from 625 (the study's levels)."""

    @model_validator(mode="after")
    def _terms(self):
        if self.task == "python_functions" and self.terms != 2:
            raise ValueError(f"terms: python_functions writes f(x) = x + b, two terms only (got {self.terms})")
        return self


class DataConfig(Section):
    sft: str = "embedded"
    """SFT set: `embedded`, a local .jsonl/.json/.parquet file, a local dataset directory or a hub
    dataset name, optionally `name:split`. Columns: prompt/completion or messages (TRL conventions)."""
    preference: str = "embedded"
    """Preference pairs for the reward model: prompt/chosen/rejected."""
    prompts: str = "embedded"
    """Training prompts: prompt, plus the verifier's `answer` column where a verifier is used."""
    eval: str = "embedded"
    """Held-out prompts: prompt/answer."""
    answer_column: str = "answer"
    """Column holding the reference answer the verifier checks against."""
    max_prompt_length: int = Field(512, ge=1)
    """Longest prompt in tokens (TRL's DPO default 512). A longer one keeps its LAST tokens (the question
    and the generation prompt sit at the end), or is an error with `overlong: error`."""
    max_completion_length: int = Field(512, ge=1)
    """Longest SFT/preference completion in tokens. A longer one keeps its FIRST tokens and so loses
    its end-of-turn token (it trains as a reply that did not end), or is an error with `overlong: error`."""
    overlong: Literal["truncate", "error"] = "truncate"
    """What prepare does with a row over a limit: truncate it (counted in metrics, data/truncated_*) or
    stop with an error naming the file and row."""
    embedded: EmbeddedData = EmbeddedData()


class VerifierConfig(Section):
    """How a reply is checked against the reference answer (every stage that checks answers)."""

    extract: Literal["whole", "auto"] = "whole"
    """whole: the whole reply is the answer (the embedded reversed-digit task); auto: `<answer>…</answer>`,
    then `\\boxed{…}`, then a final `#### …` line, then the last number; replies that state several
    different answers score 0 (stages/core/answers.py)."""
    compare: Literal["math", "exact"] = "exact"
    """math: math-verify equivalence (85 = 85.0, 1/2 = 0.5); exact: string equality."""
    sandbox: "SandboxConfig" = Field(default_factory=lambda: SandboxConfig())
    """Limits of the code-execution reward (`reward.code`): each completion's program runs against its row's
    `tests` in a sandbox of its own (stages/core/sandbox.py)."""


class SandboxConfig(Section):
    """What one completion's test run may use; a run over any limit scores 0."""

    cpu_seconds: int = Field(2, ge=1)
    """CPU seconds of each process the program runs."""
    wall_seconds: float = Field(5.0, gt=0)
    """Wall-clock seconds for the whole run, after which every process of it is killed."""
    memory_mb: int = Field(512, ge=64)
    """Address space of each process."""
    file_mb: int = Field(1, ge=1)
    """Largest file (and output) the program may write."""
    processes: int = Field(32, ge=1)
    """Processes the program may run at once (the interpreter itself included)."""
    workers: int = Field(2, ge=1)
    """Completions tested at the same time (each its own sandbox)."""


class GenerationConfig(Section):
    """Which engine samples, for every stage that samples (online rollouts, pairs, evaluate, the training
    probes): a param, so the DVC cache never hands back an artifact sampled by the other engine."""

    engine: Literal["hf", "vllm"] = "hf"
    """hf: this project's KV-cache sampler (exact, reproducible per row); vllm: vLLM in its own environment
    (`make vllm`; ALIGNPIPE_VLLM_PYTHON names another), the trainer's weights pushed before each generation."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The vLLM engine's compute dtype. float32 samples what the trainer computes (log-probs within 1e-4);
    bfloat16 is faster where the hardware has it, and its sampler/trainer gap is corrected by `tis`."""
    tis: Literal["token", "sequence", "off"] = "token"
    """Truncated importance sampling for vLLM rollouts (Yao et al. 2025, TIS): each token's policy loss is
    weighted by min(π_trainer/π_sampler, tis_cap), per token or once per sequence (the product); off: none.
    RLOO's loss is per sequence, so its weight always is."""
    tis_cap: float = Field(2.0, ge=1.0)
    """Upper cap C of the importance weight (the TIS paper and verl: 2; TRL: 3)."""
    kv_cache_gb: float = Field(1.0, gt=0.0)
    """Memory the vLLM engine gives its KV cache on the CPU (GiB)."""
    gpu_memory_utilization: float = Field(0.3, gt=0.0, lt=1.0)
    """Share of the GPU's memory the vLLM engine may take (the trainer shares the GPU: colocated)."""
    max_model_len: int = Field(4096, ge=16)
    """Longest prompt + completion the engine accepts (capped by the model's max_position_embeddings)."""


# ---------------------------------------------------------------------------------------------- training

class LoraConfig(Section):
    """LoRA adapters through peft (Hu et al. 2021) instead of training every weight."""

    r: int = Field(0, ge=0)
    """Rank of the adapters; 0: no LoRA, every weight is trained."""
    alpha: float = Field(0.0, ge=0.0)
    """Scaling numerator (the update is alpha/r · BA); 0: 2·r (LLaMA-Factory's default)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input."""
    target_modules: list[str] = ["all-linear"]
    """Modules that get adapters: `all-linear` (every linear layer but the output head, as peft and
    TRL mean it) or module names such as q_proj, v_proj."""
    output: Literal["merged", "adapter"] = "merged"
    """What the stage writes for the next one: merged (base + adapter folded into plain weights, a normal
    checkpoint), or adapter (the adapter alone, with its base recorded; the reader merges it on load)."""


class OptimConfig(Section):
    lr: float = Field(1.0e-3, gt=0, le=1.0)
    """Peak learning rate (AdamW)."""
    steps: int = Field(1000, ge=1)
    """Optimizer steps."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up (to 10% of peak for cosine, 0 for linear)."""
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    log_every: int = Field(10, ge=1)
    """Steps between logged metrics."""
    checkpoint_every: int = Field(200, ge=1)
    """Steps between resumable checkpoints."""
    micro_batch_size: int = Field(0, ge=0)
    """Rows per forward and backward pass: a step's batch is split into micro-batches of this size whose
    gradients add up to the whole batch's before the update (gradient accumulation; 0: the whole batch
    at once). Rows are examples (sft, kto), pairs (reward, dpo, ipo) or sequences (grpo, rloo, ppo)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of storing them: memory for time."""
    logprob_chunk: int = Field(0, ge=0)
    """Completion positions whose vocabulary log-softmax is computed at once in training (and recomputed
    in the backward pass), so a long completion never holds [batch, length, vocab] logits; 0: all at once."""
    lora: LoraConfig = LoraConfig()
    """Train LoRA adapters instead of every weight (lora.r > 0)."""


class PolicyConfig(OptimConfig):
    """Training a policy (SFT and every alignment method): optimisation plus the accuracy probe."""

    probes: int = Field(10, ge=0)
    """Greedy verifier-accuracy probes on `probe_size` training prompts, spread over training; the
    spread of the last ones is the comparison's stability figure (0: off)."""
    probe_size: int = Field(64, ge=1)
    """Training prompts in the probe."""
    probe_max_new_tokens: int = Field(0, ge=0)
    """Longest greedy reply of the probe (0: one more than the longest training completion for SFT and the
    offline methods, max_new_tokens for the online ones). A chat model's reply may run longer than its
    demonstrations: cut short, it states no answer."""


class SFTConfig(PolicyConfig):
    """Cross-entropy on response tokens only."""

    batch_size: int = Field(64, ge=1)
    """Examples per optimizer step."""


class RewardConfig(OptimConfig):
    batch_size: int = Field(32, ge=1)
    """Preference pairs per optimizer step."""
    init_from: Literal["sft", "base"] = "sft"
    """Backbone of the reward model: the SFT model (usual, InstructGPT) or the base model."""
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of preference pairs held out to measure pairwise accuracy."""
    center_coef: float = Field(0.0, ge=0.0)
    """Reward centering coefficient c in c·mean((r_c + r_r)²) (Eisenstein et al.; TRL 0.01 when on)."""
    min_accuracy: float = Field(0.0, ge=0.0, le=1.0)
    """Fail the stage when held-out pairwise accuracy is below this."""
    stats_pairs: int = Field(0, ge=0)
    """Training pairs scored after training for the score's mean/std (standardization) and the train
    accuracy: the first this-many of the shuffled pairs (0: all; a few hundred suffice for a big model)."""


class RewardWeights(Section):
    """A weighted mix of rewards. A reward that cannot be computed for a row is excluded, not 0. A weight
    not written is 0: `reward: {verifier: 1.0}` is the verifier alone, whatever the section's default mix."""

    reward_model: float = Field(0.0, ge=0.0)
    """Weight of the reward-model score."""
    verifier: float = Field(0.0, ge=0.0)
    """Weight of the verifier (1 if the answer checks, 0 if not; None if it cannot run)."""
    format: float = Field(0.0, ge=0.0)
    """Weight of the format reward (1 if the completion ended by EOS and fully matches format_pattern)."""
    format_pattern: str = r"\d{1,3}"
    """Regular expression a well-formed completion matches (the embedded task: 1 to 3 digits)."""
    think_format: float = Field(0.0, ge=0.0)
    """Weight of the reasoning-format reward: 1 if the reply is `<think>…</think>` then a non-empty answer."""
    code: float = Field(0.0, ge=0.0)
    """Weight of the code-execution reward: 1 if the reply's program (its first ``` block, else the whole
    reply) passes the row's `tests` column in the sandbox (verifier.sandbox), 0 if not, None when the row
    has no tests or the sandbox cannot start."""
    functions: dict[str, float] = {}
    """Your own rewards, `module:function` → weight, TRL's interface: the function takes `completions`
    (texts) and keyword arguments (`prompts`, `completion_ids`, `truncated` and the dataset's columns,
    e.g. `answer`) and returns one float, or None (no reward), per completion."""

    @field_validator("functions")
    @classmethod
    def _importable_names(cls, functions: dict[str, float]) -> dict[str, float]:
        for name, weight in functions.items():
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
                raise ValueError(f"{name!r} is not `module:function`")
            if weight < 0:
                raise ValueError(f"{name}: weight must be >= 0")
        return functions

    @model_validator(mode="after")
    def _some_weight(self):
        built_in = (self.reward_model, self.verifier, self.format, self.think_format, self.code)
        if not any((*built_in, *self.functions.values())):
            raise ValueError("at least one reward weight must be > 0")
        return self


class PairsConfig(Section):
    num_samples: int = Field(8, ge=2)
    """K completions sampled per prompt from the SFT policy."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature."""
    max_new_tokens: int = Field(8, ge=1)
    """Longest completion; one without EOS is truncated (and scored by the rewards as such)."""
    max_prompts: int = Field(0, ge=0)
    """Use at most this many training prompts (0: all)."""
    batch_size: int = Field(128, ge=1)
    """Sequences per generation / scoring batch."""
    score: RewardWeights = RewardWeights(reward_model=1.0, verifier=1.0)
    """How completions are ranked: chosen = best, rejected = worst; equal best and worst is a tie (dropped)."""
    truncated: Literal["drop", "penalize"] = "drop"
    """A completion that never ended (no end-of-turn token within max_new_tokens) is never chosen: drop
    it from its group, or keep it as a rejected candidate with its score lowered by truncated_penalty."""
    truncated_penalty: float = Field(1.0, ge=0.0)
    """Subtracted from a truncated completion's score when truncated: penalize."""
    flip_fraction: float = Field(0.0, ge=0.0, le=0.5)
    """Share of the pairs whose chosen and rejected are swapped (which ones: drawn from the seed), for
    measuring how a method stands noisy preferences (the study's noise condition); KTO's rows come from
    the pairs, so their labels flip with them. 0 for real use."""


# ---------------------------------------------------------------------------------------------- align

class OfflineConfig(PolicyConfig):
    """Training on the stored pairs (reference log-probs precomputed: one model in memory)."""

    batch_size: int = Field(32, ge=1)
    """Pairs (KTO: examples) per optimizer step."""
    epochs: int = Field(0, ge=0)
    """If > 0, overrides `steps` with this many passes over the data."""


class DPOConfig(OfflineConfig):
    beta: float = Field(0.1, gt=0.0)
    """KL strength β (Rafailov et al. 2023; TRL default 0.1)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Conservative DPO ε: the assumed rate of flipped labels (0 = plain DPO)."""


class IPOConfig(OfflineConfig):
    beta: float = Field(0.1, gt=0.0)
    """Regularisation β: the log-ratio margin is regressed onto 1/(2β) (Azar et al. 2023; TRL 0.1)."""
    length_normalize: bool = True
    """Average log-ratios per completion token (TRL; the IPO authors' form) instead of summing (OpenRLHF)."""


class KTOConfig(OfflineConfig):
    beta: float = Field(0.1, gt=0.0)
    """KL strength β (Ethayarajh et al. 2024; TRL default 0.1)."""
    desirable_weight: float = Field(1.0, gt=0.0)
    """λ_D, the weight of desirable examples."""
    undesirable_weight: float = Field(1.0, gt=0.0)
    """λ_U, the weight of undesirable examples; λ_D·n_D/(λ_U·n_U) should lie in [1, 4/3] (paper eq. 8)."""

    @model_validator(mode="after")
    def _batch(self):
        if self.batch_size < 2:
            raise ValueError("batch_size must be > 1: the KL reference point z0 needs mismatched pairs")
        return self


class SimPOConfig(OfflineConfig):
    """SimPO (Meng et al. 2024): reference-free, length-normalised margin against a target γ."""

    beta: float = Field(2.0, gt=0.0)
    """Reward scale β on the per-token mean log-prob (the paper: 2.0-2.5; TRL's CPOConfig 0.1 is CPO's)."""
    gamma: float = Field(1.0, ge=0.0)
    """Target reward margin γ (γ/β = 0.5, the SimPO repository's default gamma_beta_ratio; TRL simpo_gamma 0.5)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Conservative ε, as DPO's (0: the paper's loss)."""


class ORPOConfig(OfflineConfig):
    """ORPO (Hong et al. 2024): SFT on the chosen completion plus λ times the odds-ratio term, reference-free."""

    beta: float = Field(0.1, gt=0.0)
    """λ, the weight of the odds-ratio term (the paper and TRL's ORPOConfig beta: 0.1)."""


class OnlineConfig(PolicyConfig):
    """Generating during training: sample, score, update."""

    prompts_per_step: int = Field(16, ge=1)
    """Prompts sampled per step; each gets `num_generations` completions."""
    num_generations: int = Field(8, ge=1)
    """Completions per prompt (the group)."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature; log-probs in the losses use the same temperature (as TRL)."""
    max_new_tokens: int = Field(8, ge=1)
    """Longest completion; one that reaches it without EOS is truncated."""
    num_iterations: int = Field(1, ge=1)
    """Passes over each generation batch (μ); above 1 the clipped ratio uses the stored old log-probs."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per pass (the generation batch split in this many parts)."""
    reward: RewardWeights = RewardWeights(reward_model=0.0, verifier=1.0)
    """The reward: reward model, verifier, format, or a weighted mix."""
    gen_batch_size: int = Field(256, ge=1)
    """Sequences per generation / scoring forward."""
    no_signal_steps: int = Field(3, ge=0)
    """Stop with an error when every reward of the first this-many steps is the same value (nothing to
    learn from: a wrong answer column, answer format or verifier); 0: never."""


class ClippedConfig(OnlineConfig):
    """A policy loss with PPO's clipped ratio."""

    epsilon: float = Field(0.2, gt=0.0, lt=1.0)
    """Lower clip range ε (ratio ≥ 1 − ε)."""
    epsilon_high: float = Field(0.2, gt=0.0)
    """Upper clip range (ratio ≤ 1 + ε_high; DAPO's clip-higher uses 0.28)."""


class GroupConfig(OnlineConfig):
    """Group-relative advantages over `num_generations` completions per prompt, token-aggregated loss."""

    num_generations: int = Field(8, ge=2)
    """Completions per prompt; the group advantage needs at least 2 (DeepSeekMath 64; TRL 8)."""
    beta: float = Field(0.04, ge=0.0)
    """k3 KL-to-reference coefficient (DeepSeekMath 0.04; TRL 0.0 = no reference model held)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: group std (GRPO), batch std, or none (Dr. GRPO)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Token aggregation of the loss (TRL's default dapo; see losses.aggregate_tokens)."""


class GRPOConfig(GroupConfig, ClippedConfig):
    pass


class GSPOConfig(GroupConfig, ClippedConfig):
    """GSPO (Zheng et al. 2025): GRPO with the sequence-level ratio; defaults from the paper and TRL's GSPO recipe."""

    beta: float = Field(0.0, ge=0.0)
    """k3 KL-to-reference coefficient (the paper and TRL's recipe: 0, no reference model held)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    """Token aggregation: grpo, each sequence counted once (TRL warns that the others weigh a sequence by its
    length, which is not the paper's per-sequence objective)."""
    epsilon: float = Field(3.0e-4, gt=0.0, lt=1.0)
    """Lower clip range of the sequence ratio (the paper: 3e-4)."""
    epsilon_high: float = Field(4.0e-4, gt=0.0)
    """Upper clip range of the sequence ratio (the paper: 4e-4)."""
    minibatches: int = Field(4, ge=1)
    """Optimizer steps per generation batch (the paper: 4 minibatches per rollout batch, so the ratio moves
    off 1 and the clip can bind)."""


class CISPOConfig(GroupConfig):
    """CISPO (MiniMax-M1, Chen et al. 2025): the clipped importance weight, detached, scales the log-prob."""

    beta: float = Field(0.0, ge=0.0)
    """k3 KL-to-reference coefficient (MiniMax-M1 and ScaleRL use none)."""
    epsilon_max: float = Field(5.0, gt=1.0)
    """Upper bound of the importance weight, min(r, ε_max) (ScaleRL and TRL's recommended 5.0)."""
    minibatches: int = Field(4, ge=1)
    """Optimizer steps per generation batch (MiniMax-M1 takes several off-policy updates per batch; with one
    the weight is exactly 1 and CISPO is on-policy GRPO)."""


class ReinforcePPConfig(ClippedConfig):
    """REINFORCE++ (Hu 2025): token returns with a k1 KL penalty in the reward, normalised over the batch."""

    num_generations: int = Field(8, ge=1)
    """Completions per prompt (1 is plain REINFORCE++; the baseline variant needs at least 2)."""
    baseline: Literal["group", "none"] = "group"
    """group: REINFORCE++-baseline, each prompt's mean reward subtracted first (the paper's setting for
    reasoning tasks, OpenRLHF's reinforce_baseline); none: REINFORCE++ as first published."""
    beta: float = Field(0.01, ge=0.0)
    """Per-token k1 KL coefficient folded into the reward (OpenRLHF's init_kl_coef 0.01)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Token aggregation of the loss (dapo: the token mean over the generation batch, OpenRLHF's token-level loss)."""

    @model_validator(mode="after")
    def _group(self):
        if self.baseline == "group" and self.num_generations < 2:
            raise ValueError("baseline group needs num_generations >= 2 (a group mean of one reward is itself)")
        return self


class DistillConfig(ClippedConfig):
    """On-policy distillation (Agarwal et al. 2024, GKD; the per-token reverse-KL form of Thinking Machines'
    "On-policy distillation"): the student (the SFT policy) samples, a teacher scores every sampled token,
    and the student's clipped policy gradient takes −(logp_student − logp_teacher) per token as its
    advantage. Not a member of align.methods: one stage distill@<teacher> per teacher, so each depends on
    its teacher's model and reruns when it changes."""

    teachers: list[str] = []
    """The policies to distill from, each its own stage distill@<teacher> writing models/distill_<teacher>:
    sft, a method of align.methods (the embedded default's natural teacher is grpo, the policy that knows the
    task best), or a name of `external`. Empty: no distillation."""
    external: dict[str, str] = {}
    """Teachers from outside the pipeline: name → a model directory, a .gguf file or a hub id (read from the
    local Hugging Face cache). Stage teacher@<name> copies it into models/<name>, where distill@<name> reads it
    and DVC versions it; `check` records its digest (a hub id: the cached revision) in inputs.lock.json, so a
    changed model reruns what it taught."""
    coef: float = Field(1.0, gt=0.0)
    """Scale of the per-token reverse-KL advantage (tinker-cookbook's kl_penalty_coef 1.0)."""
    num_generations: int = Field(4, ge=1)
    """Completions per prompt (no group baseline: the batch's mean reverse KL is the baseline)."""
    reward: RewardWeights = RewardWeights(reward_model=0.0, verifier=1.0)
    """Scored for the rollout metrics only (rollout/accuracy): the teacher, not the reward, is the signal."""
    no_signal_steps: int = Field(0, ge=0)
    """Rewards carry no signal here; a teacher that scores every token as the student does stops the stage."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Token aggregation of the loss (dapo: the token mean over the generation batch, as tinker-cookbook's sum
    over tokens divided by their number)."""
    divergence: Literal["reverse_kl", "jsd"] = "reverse_kl"
    """reverse_kl: the sampled token's log-ratio as its advantage, in the clipped token loss (tinker-cookbook);
    jsd: GKD's generalized Jensen-Shannon divergence between the two models' whole next-token distributions at
    each sampled position, differentiated directly (TRL's GKDTrainer loss on on-policy samples, its λ = 1)."""
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)
    """jsd's interpolation β (TRL GKDConfig 0.5): 0 the forward KL(teacher ‖ student), 1 the reverse KL."""

    @model_validator(mode="after")
    def _full_vocabulary(self):
        if self.divergence == "jsd" and self.logprob_chunk:
            raise ValueError("divergence jsd needs both models' whole next-token distributions: "
                             "logprob_chunk must be 0")
        return self

    @field_validator("teachers")
    @classmethod
    def _teachers(cls, teachers: list[str]) -> list[str]:
        if len(set(teachers)) != len(teachers):
            raise ValueError("a teacher is listed twice")
        return teachers

    @field_validator("external")
    @classmethod
    def _external(cls, external: dict[str, str]) -> dict[str, str]:
        for name in external:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"{name!r}: a name is letters, digits, '_', '.' or '-' (it names "
                                 "models/<name> and the stages teacher@<name>, distill@<name>)")
            if name in PIPELINE_MODELS or name in METHOD_CONFIGS or split_policy(name)[1] is not None:
                raise ValueError(f"{name!r} is the name of one of the pipeline's own models")
        return external


class RLOOConfig(ClippedConfig):
    num_generations: int = Field(4, ge=2)
    """Completions per prompt; the leave-one-out baseline needs at least 2 (TRL default 2)."""
    beta: float = Field(0.05, ge=0.0)
    """k1 KL coefficient folded into the reward (Ahmadian et al. 2024; TRL 0.05)."""
    normalize_advantages: bool = False
    """Standardize advantages over the batch (TRL option, off by default)."""


class PPOConfig(ClippedConfig):
    num_generations: int = Field(1, ge=1)
    """Completions per prompt (PPO needs no group: the critic is the baseline)."""
    num_iterations: int = Field(4, ge=1)
    """PPO epochs over each rollout batch (TRL 4)."""
    minibatches: int = Field(2, ge=1)
    """Minibatches per PPO epoch."""
    reward: RewardWeights = RewardWeights(reward_model=1.0)
    """The score added at the last token (RLHF: the reward model)."""
    kl_coef: float = Field(0.05, ge=0.0)
    """Per-token KL penalty coefficient (TRL 0.05; the start value when adaptive)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al. 2019; legacy TRL, LLaMA-Factory)."""
    kl_target: float = Field(6.0, gt=0.0)
    """Target sequence KL of the adaptive controller."""
    kl_horizon: float = Field(10000.0, gt=0.0)
    """Horizon of the adaptive controller (in samples)."""
    vf_coef: float = Field(0.1, ge=0.0)
    """Value-loss coefficient (TRL 0.1)."""
    cliprange_value: float = Field(0.2, gt=0.0)
    """Value clip range ε_v (TRL 0.2)."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount γ."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE λ (TRL 0.95)."""
    whiten_rewards: bool = False
    """Whiten per-token rewards before GAE."""
    missing_eos_penalty: float = Field(1.0, ge=0.0)
    """Subtracted from the score of a completion that never ended (no EOS)."""


class AlignConfig(Section):
    methods: list[str] = ["dpo", "grpo"]
    """Methods run as align@<method> stages, each with its own params section below."""
    ppo: PPOConfig = PPOConfig()
    dpo: DPOConfig = DPOConfig()
    ipo: IPOConfig = IPOConfig()
    kto: KTOConfig = KTOConfig()
    simpo: SimPOConfig = SimPOConfig()
    orpo: ORPOConfig = ORPOConfig()
    grpo: GRPOConfig = GRPOConfig()
    rloo: RLOOConfig = RLOOConfig()
    gspo: GSPOConfig = GSPOConfig()
    cispo: CISPOConfig = CISPOConfig()
    reinforce_pp: ReinforcePPConfig = ReinforcePPConfig()
    distill: DistillConfig = DistillConfig()

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: list[str]) -> list[str]:
        for m in methods:
            if m in PER_TEACHER:
                raise ValueError(f"{m} runs once per teacher: list its teachers in align.{m}.teachers, not {m} here")
            if m not in METHOD_CONFIGS:
                raise ValueError(f"unknown method {m!r} (known: {', '.join(METHOD_CONFIGS)})")
        if len(set(methods)) != len(methods):
            raise ValueError("a method is listed twice")
        if not methods:
            raise ValueError("list at least one method")
        return methods

    @model_validator(mode="after")
    def _teachers_are_policies(self):
        for t in self.distill.teachers:
            if t != "sft" and t not in self.methods and t not in self.distill.external:
                raise ValueError(f"distill.teachers: {t!r} is not a policy of this pipeline (sft or one of "
                                 f"align.methods: {', '.join(self.methods)}) nor a name of distill.external")
        return self

    def method(self, name: str) -> Section:
        return getattr(self, name)

    def running(self) -> list[str]:
        """The methods whose stages run: align.methods, and distill when it has a teacher."""
        return [*self.methods, *(m for m in PER_TEACHER if self.method(m).teachers)]

    def policies(self) -> list[str]:
        """Every aligned policy the pipeline trains: align.methods, then distill_<teacher> for each teacher."""
        return [*self.methods, *(f"distill_{t}" for t in self.distill.teachers)]

    def section(self, policy: str) -> Section:
        """A policy's params section: its method's, or distill's for distill_<teacher>."""
        return self.method(split_policy(policy)[0])


def policy_params(policies: list[str]) -> dict:
    """Aligned policies (as AlignConfig.policies names them) → the align params that train them:
    {"methods": [...], "distill": {"teachers": [...]}}."""
    split = [split_policy(p) for p in policies]
    return {"methods": [m for m, teacher in split if teacher is None],
            "distill": {"teachers": [teacher for _, teacher in split if teacher is not None]}}


def split_policy(policy: str) -> tuple[str, str | None]:
    """An aligned policy's (method, teacher): `dpo` → ("dpo", None), `distill_grpo` → ("distill", "grpo")."""
    for m in PER_TEACHER:
        if policy.startswith(f"{m}_"):
            return m, policy.removeprefix(f"{m}_")
    return policy, None


def every_policy() -> list[str]:
    """Every method, and GRPO's policy distilled into the SFT policy (`alignpipe compare`, `study --methods all`)."""
    return [m for m in METHOD_CONFIGS if m not in PER_TEACHER] + ["distill_grpo"]


PIPELINE_MODELS = {"base", "sft", "reward"}
"""The models/ directories the pipeline's own stages write, besides the aligned policies."""
PER_TEACHER = {"distill"}
"""Methods run once per teacher (their own DVC stage family, not the align matrix)."""
METHOD_CONFIGS: dict[str, type[Section]] = {
    name: field.annotation for name, field in AlignConfig.model_fields.items() if name != "methods"}
"""Known alignment methods and their params sections: AlignConfig's fields (stages/methods/registry.py holds
the rest of each method)."""


class EvaluateConfig(Section):
    max_new_tokens: int = Field(8, ge=1)
    """Longest completion generated at evaluation."""
    max_prompts: int = Field(0, ge=0)
    """Evaluate at most this many held-out prompts (0: all)."""
    kl_samples: int = Field(4, ge=1)
    """Sampled completions per prompt for the KL-to-reference estimate."""
    batch_size: int = Field(128, ge=1)
    """Sequences per generation / scoring batch."""
    pass_n: int = Field(16, ge=0)
    """Samples per prompt for pass@k (0: off); eval/accuracy stays the greedy pass@1."""
    pass_k: list[int] = [1, 4, 16]
    """The k of each eval/pass_at_<k> (the unbiased estimator of Chen et al. 2021 from pass_n samples; k ≤ pass_n).
    pass@1 here is the mean accuracy of the samples, not the greedy answer's."""
    pass_temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of the pass@k samples (evaluation only; training keeps its own)."""

    @model_validator(mode="after")
    def _pass_k(self):
        if self.pass_n and any(k < 1 or k > self.pass_n for k in self.pass_k):
            raise ValueError(f"pass_k: every k must be in 1..pass_n ({self.pass_n}), got {self.pass_k}")
        return self


class StudyConfig(Section):
    """`make study` (flows/study.py): the comparison over several seeds. No stage reads it."""

    seeds: list[int] = Field([0, 1, 2, 3], min_length=1)
    """Seeds, each a replicate of the whole chain. With 3, t(0.975, 2) = 4.3 makes intervals wide (on the
    embedded task no gain over SFT survived Holm at 3 seeds, every one did at 4); each seed more costs
    one more chain and narrows them."""
    methods: list[str] = ["ppo", "dpo", "ipo", "kto", "grpo", "rloo"]
    """Policies of the main condition: methods of align.methods, and distill_<teacher> for a distilled one
    (align.distill.teachers); [all] is every method and distill_grpo. A study of every method at 4 seeds takes
    longer than an hour on a 2-core CPU, so the default stays the seeds' six)."""
    noise: list[float] = [0.4]
    """Shares of flipped pairs (pairs.flip_fraction) of the noisy-preference condition, run on the offline
    methods; [] leaves it out. (0.2 cost DPO 2.4 points, not separated from 0 over 5 seeds; 0.4 cost 17.)"""
    hacking: bool = True
    """Run GRPO rewarded by the reward model alone next to the main GRPO (rewarded by the verifier)."""
    levels: dict[str, dict[str, Any]] = {"terms-2": {},
                                         "terms-3": {"data.embedded.terms": 3, "data.embedded.n_eval": 640}}
    """Task difficulty levels: name → param overrides (dotted keys) for every run of that level. The whole
    study runs on each; the report gives each level's tables and tests the articles' claims per level.
    Default: the original task (two terms, SFT near 60%, 300 held-out problems: all 2,500 sums of two
    numbers under 50 are used, and 640 held out left seed 0's SFT on its plateau) and three terms (a chain
    of two sums, SFT near 30%, 640 held out: one seed's standard error under 2 points)."""

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: list[str]) -> list[str]:
        if methods == ["all"]:
            return every_policy()
        return AlignConfig.model_validate(policy_params(methods)).policies()

    @field_validator("levels")
    @classmethod
    def _levels(cls, levels: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not levels:
            raise ValueError("name at least one level ({name: {}} runs the params as they are)")
        bad = [name for name in levels if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)]
        if bad:
            raise ValueError(f"level name {bad[0]!r}: letters, digits, '_', '.' and '-' only (it names a directory)")
        return levels

    @field_validator("noise")
    @classmethod
    def _shares(cls, noise: list[float]) -> list[float]:
        if any(not 0 < f <= 0.5 for f in noise):
            raise ValueError("each share must be in (0, 0.5]")
        return noise


class Params(Section):
    seed: int = 0
    """Seed of everything random: data, initialisation, sampling, data order."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    pairs: PairsConfig = PairsConfig()
    align: AlignConfig = AlignConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    verifier: VerifierConfig = VerifierConfig()
    generation: GenerationConfig = GenerationConfig()
    study: StudyConfig = StudyConfig()


# ---------------------------------------------------------------------------------------------- loading

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.1 wants 1.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.\d*|\.\d+|\d[\d_]*)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _format_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in e and not isinstance(e["input"], (dict, list)):
        msg += f" (got {e['input']!r})"
    return f"{source}: {key}: {msg}" if key else f"{source}: {msg}"


def parse(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def loads(text: str, source: str = "params.yaml") -> Params:
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    return parse(raw, source)


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    return loads(path.read_text(), str(path))
