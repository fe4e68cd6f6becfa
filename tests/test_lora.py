"""LoRA through peft, on the stages' real entry points and the tiny model: the merged output equals base
+ adapter, only a low-rank update is learned, the reference of an online method is the policy with its
adapter off (no second model), and an adapter-only output loads wherever a model is read."""

import pytest
import torch

from stages.core import data, io, lora, models
from tests.test_methods import align_args, upstream  # noqa: F401  (the fixture)
from tests.test_modes import trained
from tests.test_stages import weights

pytestmark = [pytest.mark.smoke, pytest.mark.lora]
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
CPU = torch.device("cpu")


def some_pairs(d, n=6):
    return data.collate_pairs(io.read_jsonl(d / "pairs" / "pairs.jsonl")[:n], models.load_tokenizer(
        str(d / "models" / "sft")).pad_token_id)


def logits(model, seqs):
    with torch.no_grad():
        return model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits


def test_merged_output_equals_base_plus_adapter(upstream, monkeypatch):  # noqa: F811
    import peft

    settings = {"steps": 3, "lr": 1e-2, "lora": {**LORA, "output": "adapter"}}
    trained(upstream, monkeypatch, "adapter", "align.dpo", keep=True, **settings)
    trained_adapter = upstream / "models" / "adapter"
    assert (trained_adapter / "adapter_config.json").exists() and not (trained_adapter / "model.safetensors").exists()
    merged, _ = trained(upstream, monkeypatch, "merged", "align.dpo", **{**settings, "lora": LORA})

    seqs = some_pairs(upstream)
    base = models.load_causal_lm(str(upstream / "models" / "sft"), CPU, trainable=False)
    unmerged = peft.PeftModel.from_pretrained(base, str(trained_adapter)).eval()  # base + adapter, not folded
    want = logits(unmerged, seqs)
    monkeypatch.chdir(upstream)  # the adapter's base path is relative to the workspace, as in a stage
    from_adapter = models.load_causal_lm(str(trained_adapter), CPU, trainable=False)  # merged on load
    assert torch.allclose(logits(from_adapter, seqs), want, atol=1e-5)
    plain = models.load_causal_lm(str(upstream / "models" / "sft"), CPU, trainable=False)
    plain.load_state_dict({**plain.state_dict(), **merged})
    assert torch.allclose(logits(plain.eval(), seqs), want, atol=1e-5)
    sft_model = models.load_causal_lm(str(upstream / "models" / "sft"), CPU, trainable=False)
    assert not torch.allclose(logits(sft_model, seqs), want, atol=1e-3)  # the adapter did change the model

    sft = weights(upstream / "models" / "sft")
    for name, w in merged.items():
        delta = w - sft[name]
        if any(t in name for t in LORA["target_modules"]):
            assert 0 < torch.linalg.matrix_rank(delta).item() <= LORA["r"], name  # a rank-r update
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), name  # nothing else trained


def test_reference_is_the_policy_with_its_adapter_off(saved_model):
    from peft import LoraConfig, get_peft_model

    base = models.load_causal_lm(str(saved_model), CPU, trainable=False)
    seqs = data.collate([[1, 5]], [[6, 7]], 0)
    want = logits(base, seqs)
    policy = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for n, p in policy.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # a trained adapter (B starts at 0)
    assert not torch.allclose(logits(policy, seqs), want, atol=1e-4)
    ref = lora.AdapterOff(policy)
    assert torch.allclose(logits(ref, seqs), want, atol=1e-6)
    assert torch.allclose(logits(policy, seqs), logits(policy, seqs))  # the adapter is back on after
    assert not any(True for _ in ref.parameters())  # holds no weights of its own


@pytest.mark.parametrize("method, in_memory", [("grpo", 2), ("rloo", 2), ("ppo", 3), ("gspo", 2), ("cispo", 2),
                                               ("reinforce_pp", 2), ("simpo", 1), ("orpo", 1), ("distill", 2)])
def test_methods_train_lora_without_a_second_model(upstream, monkeypatch, method, in_memory):  # noqa: F811
    """Only the adapter's target modules move; an online method's reference is the policy with its adapter off
    (distill's teacher is another model: policy and teacher)."""
    extra = {} if method in ("ppo", "simpo", "orpo", "distill") else {"reward": {"reward_model": 1.0}, "beta": 0.04}
    w, metrics = trained(upstream, monkeypatch, f"{method}_lora", f"align.{method}", steps=2, lora=LORA,
                         gradient_checkpointing=True, **extra)
    assert metrics["cost/models_in_memory"] == in_memory  # policy(, reward model, value model): no reference
    sft = weights(upstream / "models" / "sft")
    moved = {k for k, v in w.items() if not torch.equal(v, sft[k])}
    assert moved and all(any(t in k for t in LORA["target_modules"]) for k in moved)


def test_reward_model_adapter_loads_with_its_head_and_statistics(upstream, monkeypatch):  # noqa: F811
    from stages.core.rewards import reward_model_scores

    runs = {}
    for output in ("adapter", "merged"):
        trained(upstream, monkeypatch, f"rm_{output}", "reward", keep=True, steps=4, lora={**LORA, "output": output})
        runs[output] = models.load_reward_model(str(upstream / "models" / f"rm_{output}"), CPU)
    seqs = some_pairs(upstream)
    a, b = (reward_model_scores(runs[o], seqs, 4) for o in ("adapter", "merged"))
    assert runs["adapter"].config.reward_std == runs["merged"].config.reward_std != 1.0
    assert torch.allclose(a, b, atol=1e-5)
