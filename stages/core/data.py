"""Datasets in TRL's column conventions: loading, row validation, tokenization, collation.

Sources: a local .jsonl/.json/.parquet file, a local dataset directory or a hub dataset name
(`name` or `name:split`, read from the local HF cache; nothing is downloaded). A hub name and a local
directory go through the same `datasets.load_dataset` call.

Formats (each "standard" = strings, or "conversational" = lists of {role, content} messages):
  sft:         prompt/completion, or messages (the last assistant turn is the completion)
  preference:  prompt/chosen/rejected
  prompts:     prompt (+ the answer column a verifier checks against)
A bad row is a one-line error naming the source and the row (1-based), raised before any training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import io
from .config import ConfigError
from .logprobs import Sequences

KIND_COLUMNS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"), "prompts": ("prompt",)}


def load_rows(source: str, field: str) -> list[dict]:
    """Rows of a local file, a local dataset directory or a cached hub dataset (`name[:split]`)."""
    import datasets

    datasets.disable_progress_bars()
    name, split, local = io.split_source(source)
    split = split or "train"
    path = Path(name).expanduser()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if not path.exists() and local:
        raise ConfigError(f"{field}: {source}: no such file or directory")
    if path.is_file() and path.suffix.lower() not in builders:
        raise ConfigError(f"{field}: {source}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")
    if path.is_file() and path.stat().st_size == 0:
        raise ConfigError(f"{field}: {source}: the file is empty (no rows)")
    if path.is_file() and path.suffix.lower() == ".json" and _columns_object(path):
        raise ConfigError(f"{field}: {source}: holds one JSON object of columns, which would be read as one row; "
                          "give a JSON list of row objects ([{...}, ...]) or JSON Lines (one row object per line)")
    try:
        if path.is_file():
            ds = datasets.load_dataset(builders[path.suffix.lower()], data_files=str(path), split="train")
        else:  # a local dataset directory or a hub name: the same call
            ds = datasets.load_dataset(str(path) if path.exists() else name, split=split)
        rows = [dict(r) for r in ds]  # text columns are decoded here
    except UnicodeDecodeError as e:
        raise ConfigError(f"{field}: {source}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} "
                          f"in a value)") from None
    except Exception as e:  # datasets raises many types; the user needs the source and the reason
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{field}: {source}: could not load ({type(e).__name__}{': ' + reason if reason else ''})") \
            from None
    if not rows:
        raise ConfigError(f"{field}: {source}: no rows")
    return rows


def _columns_object(path: Path) -> bool:
    """Whether a .json file is one JSON object holding columns (a list that is not a chat conversation),
    which the json loader would read as a single row of lists. One object of plain values is one row."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (ValueError, UnicodeDecodeError):  # JSON Lines, or not JSON: the loader says what it is
        return False
    return isinstance(obj, dict) and any(isinstance(v, list) and not _is_conversation(v) for v in obj.values())


ROLES = ("system", "user", "assistant", "tool", "developer")  # what chat templates render


def _is_conversation(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _text(x: Any) -> str:
    """The text of a completion: a string, or the content of its messages."""
    if isinstance(x, str):
        return x
    return "".join(str(m.get("content", "")) for m in x)


def normalize(rows: list[dict], kind: str, source: str, answer_column: str = "answer") -> list[dict]:
    """Validate rows of one kind and return them in explicit-prompt form. Errors name source and row."""
    if not rows:
        raise ConfigError(f"{source}: the dataset is empty")
    out = []
    for i, row in enumerate(rows, start=1):
        where = f"{source}: row {i}"
        if kind == "sft" and "messages" in row and "prompt" not in row:
            msgs = row["messages"]
            if not _is_conversation(msgs) or len(msgs) < 2 or msgs[-1]["role"] != "assistant":
                raise ConfigError(f"{where}: 'messages' must be a conversation ending with an assistant turn")
            row = {**row, "prompt": msgs[:-1], "completion": [msgs[-1]]}
            del row["messages"]
        if kind == "preference":
            row = _explicit_prompt(row)
        for col in KIND_COLUMNS[kind]:
            if col not in row or row[col] is None:
                raise ConfigError(f"{where}: missing column {col!r}")
            if not isinstance(row[col], str) and not _is_conversation(row[col]):
                raise ConfigError(f"{where}: column {col!r} must be a string or a list of {{role, content}} messages")
        for col in KIND_COLUMNS[kind]:
            for j, m in enumerate(row[col] if _is_conversation(row[col]) else [], start=1):
                if m["role"] not in ROLES:
                    raise ConfigError(f"{where}: column {col!r} message {j}: role {m['role']!r} is not one of "
                                      f"{', '.join(ROLES)}")
        if not _text(row["prompt"]).strip():
            raise ConfigError(f"{where}: empty prompt")
        for col in KIND_COLUMNS[kind][1:]:
            if not _text(row[col]).strip():
                raise ConfigError(f"{where}: empty {col}")
        if any(isinstance(row[c], str) != isinstance(row["prompt"], str) for c in KIND_COLUMNS[kind][1:]):
            raise ConfigError(f"{where}: mixes plain-text and conversational columns")
        if kind == "preference" and _text(row["chosen"]) == _text(row["rejected"]):
            raise ConfigError(f"{where}: chosen equals rejected")
        keep = {c: row[c] for c in KIND_COLUMNS[kind]}
        if kind == "prompts":  # the other plain columns stay for reward functions (TRL passes them on)
            keep.update({k: v for k, v in row.items() if k not in keep and k not in (answer_column, "answer")
                         and isinstance(v, (str, int, float, bool))})
            if row.get(answer_column) is not None:
                keep["answer"] = str(row[answer_column])
        out.append(keep)
    return out


def _explicit_prompt(row: dict) -> dict:
    """Conversational chosen/rejected that carry the prompt themselves (TRL's "implicit prompt", e.g.
    UltraFeedback's full conversations): their common leading messages become the prompt."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (_is_conversation(chosen) and _is_conversation(rejected)):
        return row
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        return row
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


# ---------------------------------------------------------------------------------------------- tokens

def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Batch-encode with the Rust tokenizer (the per-call Python path costs ~0.3 ms a string)."""
    if not texts:
        return []
    unique = list(dict.fromkeys(texts))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        ids = tokenizer(unique, add_special_tokens=add_special_tokens)["input_ids"]
    else:
        ids = [e.ids for e in backend.encode_batch(unique, add_special_tokens=add_special_tokens)]
    by_text = dict(zip(unique, ids))
    return [list(by_text[t]) for t in texts]


def _render_all(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
    """Chat-template renderings, each distinct conversation rendered once."""
    if conversations and not tokenizer.chat_template:
        raise ConfigError("the tokenizer has no chat template, but the data is conversational")
    cache: dict[str, str] = {}
    out = []
    for conv in conversations:
        key = json.dumps(conv, sort_keys=True)
        if key not in cache:
            cache[key] = tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                                       tokenize=False)
        out.append(cache[key])
    return out


def encode_prompts(tokenizer, prompts: list[str | list[dict]]) -> list[list[int]]:
    """Tokens of each prompt, ending where the assistant's answer begins.

    A conversational prompt is rendered with the chat template (which adds its own special tokens);
    a standard one gets the tokenizer's special tokens (e.g. BOS).
    """
    out: list[list[int] | None] = [None] * len(prompts)
    chat = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    plain = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    for idx, texts, special in ((chat, _render_all(tokenizer, [prompts[i] for i in chat], True), False),
                                (plain, [prompts[i] for i in plain], True)):
        for i, ids in zip(idx, _encode(tokenizer, texts, special)):
            out[i] = ids
    return out


def encode_completions(tokenizer, prompts: list[str | list[dict]], completions: list[str | list[dict]],
                       prompt_ids: list[list[int]], stop_ids: list[int] | None = None) -> list[list[int]]:
    """Tokens of each completion after its prompt, ending with the turn's end-of-turn token.

    A conversational completion is the chat rendering of prompt+completion minus the prompt, cut just
    after its first stop token: a template may append more after the end of the turn (ChatML's "\n"
    after <|im_end|>), which the sampler never produces, since it stops at the stop token. Training
    (SFT, the reward model, DPO) and generation therefore see a completion end at the same token.
    A standard (plain-text) completion gets EOS appended.
    """
    stop = set(stop_ids or [tokenizer.eos_token_id])
    out: list[list[int] | None] = [None] * len(prompts)
    chat = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    plain = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    full = _encode(tokenizer, _render_all(tokenizer, [prompts[i] + completions[i] for i in chat], False), False)
    for i, ids in zip(chat, full):
        if ids[:len(prompt_ids[i])] != prompt_ids[i]:
            raise ConfigError("the chat template does not render prompt+completion as an extension of the prompt")
        out[i] = cut_after_stop(ids[len(prompt_ids[i]):], stop)
    texts = [_text(completions[i]) for i in plain]
    for i, ids in zip(plain, _encode(tokenizer, texts, False)):
        out[i] = ids + [tokenizer.eos_token_id]
    return out


def cut_after_stop(ids: list[int], stop: set[int]) -> list[int]:
    """ids up to and including the first stop token (all of them when there is none)."""
    for j, t in enumerate(ids):
        if t in stop:
            return ids[:j + 1]
    return ids


def tokenize(tokenizer, rows: list[dict], kind: str, stop_ids: list[int] | None = None) -> list[dict]:
    """Add token ids to normalized rows: prompt_ids, and <column>_ids for each completion column."""
    prompts = [r["prompt"] for r in rows]
    p_ids = encode_prompts(tokenizer, prompts)
    out = [{**r, "prompt_ids": ids} for r, ids in zip(rows, p_ids)]
    for col in KIND_COLUMNS[kind][1:]:
        for r, ids in zip(out, encode_completions(tokenizer, prompts, [r[col] for r in rows], p_ids, stop_ids)):
            r[f"{col}_ids"] = ids
    return out


def limit_lengths(rows: list[dict], kind: str, max_prompt: int, max_completion: int, overlong: str,
                  source: str) -> tuple[list[dict], dict]:
    """Apply data.max_prompt_length / max_completion_length to tokenized rows → (rows, counts).

    A prompt over the limit keeps its last `max_prompt` tokens (the question and the generation prompt
    are at its end; TRL's keep_end); a completion keeps its first `max_completion` tokens (it then has
    no end-of-turn token). With overlong = "error" the first over-long row is a one-line error.
    """
    counts = {"prompts": 0, "completions": 0}
    out = []
    for i, row in enumerate(rows, start=1):
        row = dict(row)
        if len(row["prompt_ids"]) > max_prompt:
            if overlong == "error":
                raise ConfigError(f"{source}: row {i}: the prompt is {len(row['prompt_ids'])} tokens, more than "
                                  f"data.max_prompt_length {max_prompt} (or set data.overlong: truncate)")
            row["prompt_ids"] = row["prompt_ids"][-max_prompt:]
            counts["prompts"] += 1
        for col in KIND_COLUMNS[kind][1:]:
            ids = row[f"{col}_ids"]
            if len(ids) > max_completion:
                if overlong == "error":
                    raise ConfigError(f"{source}: row {i}: {col} is {len(ids)} tokens, more than "
                                      f"data.max_completion_length {max_completion} (or set data.overlong: truncate)")
                row[f"{col}_ids"] = ids[:max_completion]
                counts["completions"] += 1
        out.append(row)
    return out, counts


def decode_completion(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Sequences:
    """Prompt and completion token lists → one batch in the shared layout (logprobs.Sequences)."""
    p = max(len(x) for x in prompts)
    c = max(len(x) for x in completions)
    ids = torch.full((len(prompts), p + c), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (pr, co) in enumerate(zip(prompts, completions)):
        ids[i, p - len(pr):p] = torch.tensor(pr, dtype=torch.long)
        mask[i, p - len(pr):p] = 1
        ids[i, p:p + len(co)] = torch.tensor(co, dtype=torch.long)
        mask[i, p:p + len(co)] = 1
    return Sequences(ids, mask, p)


def collate_pairs(rows: list[dict], pad_id: int) -> Sequences:
    """B preference pairs → one batch of 2B sequences, the B chosen first.  → Sequences [2B, P+C]"""
    prompts = [r["prompt_ids"] for r in rows] * 2
    completions = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    return collate(prompts, completions, pad_id)
