"""Dataset loading (local files and dataset directories, the hub code path), row validation with
errors naming source and row, and tokenization with the chat template."""

import json

import pytest

from stages.core import data
from stages.core.config import ConfigError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conv(role, text):
    return [{"role": role, "content": text}]


def test_local_jsonl_parquet_and_dataset_dir(tmp_path):
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]
    f = write_jsonl(tmp_path / "sft.jsonl", rows)
    assert data.load_rows(str(f), "data.sft") == rows

    import datasets

    pq = tmp_path / "sft.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    assert data.load_rows(str(pq), "data.sft") == rows

    d = tmp_path / "saved"  # a dataset directory: the same load_dataset call a hub name takes
    d.mkdir()
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "test.jsonl", rows[:1])
    assert data.load_rows(str(d), "data.sft") == rows
    assert data.load_rows(f"{d}:test", "data.sft") == rows[:1]


def test_missing_sources_are_one_line_errors(tmp_path):
    for source in [str(tmp_path / "nope.jsonl"), "./nope", "/abs/path/nope"]:
        with pytest.raises(ConfigError, match="no such file"):
            data.load_rows(source, "data.sft")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ConfigError, match="unsupported file type"):
        data.load_rows(str(tmp_path / "x.csv"), "data.sft")
    with pytest.raises(ConfigError) as e:  # not cached, and nothing is downloaded
        data.load_rows("no-such-org/no-such-dataset", "data.sft")
    assert "\n" not in str(e.value) and "could not load" in str(e.value)


def test_a_json_object_of_columns_is_refused_and_rows_are_read(tmp_path):
    """One object of columns would be read as one row of lists: say what a .json must hold. One object of
    plain values (or of a conversation) is a one-row file, and a list or JSON Lines is rows."""
    f = tmp_path / "e.json"
    f.write_text(json.dumps({"prompt": ["1+2=", "2+2="], "answer": ["3", "4"]}))
    with pytest.raises(ConfigError, match=r"^data.eval: .*e.json: holds one JSON object of columns, which would be "
                                          r"read as one row; give a JSON list of row objects"):
        data.load_rows(str(f), "data.eval")
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}]
    for text in (json.dumps(rows), "".join(json.dumps(r) + "\n" for r in rows), json.dumps(rows[0])):
        f.write_text(text)
        assert data.load_rows(str(f), "data.eval") == (rows if text != json.dumps(rows[0]) else rows[:1])
    chat = {"prompt": [{"role": "user", "content": "1+2="}], "completion": [{"role": "assistant", "content": "3"}]}
    f.write_text(json.dumps(chat))
    assert data.load_rows(str(f), "data.sft") == [chat]


@pytest.mark.parametrize("kind, row, message", [
    ("sft", {"prompt": "1+1="}, "row 2: missing column 'completion'"),
    ("sft", {"prompt": "1+1=", "completion": "  "}, "row 2: empty completion"),
    ("sft", {"prompt": "", "completion": "2"}, "row 2: empty prompt"),
    ("preference", {"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "row 2: chosen equals rejected"),
    ("preference", {"prompt": "1+1=", "chosen": "2"}, "row 2: missing column 'rejected'"),
    ("sft", {"prompt": "1+1=", "completion": conv("assistant", "2")}, "row 2: mixes plain-text and conversational"),
    ("prompts", {"question": "1+1="}, "row 2: missing column 'prompt'"),
    ("sft", {"prompt": conv("robot", "1+1="), "completion": conv("assistant", "2")},
     "row 2: column 'prompt' message 1: role 'robot' is not one of system, user, assistant, tool, developer"),
])
def test_bad_rows_name_the_source_and_row(kind, row, message):
    good = {"sft": {"prompt": "a", "completion": "b"}, "preference": {"prompt": "a", "chosen": "b", "rejected": "c"},
            "prompts": {"prompt": "a"}}[kind]
    with pytest.raises(ConfigError) as e:
        data.normalize([good, row], kind, "data.x: f.jsonl")
    assert str(e.value) == f"data.x: f.jsonl: {message}" or str(e.value).startswith(f"data.x: f.jsonl: {message}")


def test_messages_become_prompt_and_completion():
    msgs = conv("user", "1+1=") + conv("assistant", "2")
    (row,) = data.normalize([{"messages": msgs}], "sft", "src")
    assert row == {"prompt": conv("user", "1+1="), "completion": conv("assistant", "2")}


def test_implicit_prompt_preferences_are_split():
    """Full conversations in chosen/rejected (UltraFeedback's layout): the shared turns become the prompt."""
    row = {"prompt": "1+1=", "chosen": conv("user", "1+1=") + conv("assistant", "2"),
           "rejected": conv("user", "1+1=") + conv("assistant", "3")}
    (out,) = data.normalize([row], "preference", "src")
    assert out == {"prompt": conv("user", "1+1="), "chosen": conv("assistant", "2"),
                   "rejected": conv("assistant", "3")}


def test_prompts_keep_the_answer_column():
    rows = data.normalize([{"prompt": "1+1=", "solution": 2}], "prompts", "src", answer_column="solution")
    assert rows == [{"prompt": "1+1=", "answer": "2"}]


def test_tokenize_conversational_and_plain(tok):
    rows = [{"prompt": conv("user", "12+3="), "completion": conv("assistant", "51")},
            {"prompt": "12+3=", "completion": "51"}]
    out = data.tokenize(tok, rows, "sft")
    chat, plain = out
    assert tok.decode(chat["prompt_ids"]) == "<|bos|><|user|>12+3=<|assistant|>"
    assert chat["completion_ids"][-1] == tok.eos_token_id  # the turn ends with EOS
    assert tok.decode(chat["prompt_ids"] + chat["completion_ids"]) == tok.apply_chat_template(
        rows[0]["prompt"] + rows[0]["completion"], tokenize=False)
    assert plain["completion_ids"] == tok("51", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert data.decode_completion(tok, chat["completion_ids"]) == "51"


def test_collate_layout():
    seqs = data.collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert seqs.prompt_len == 3
    assert seqs.input_ids.tolist() == [[1, 2, 3, 5, 6, 0], [0, 0, 4, 7, 8, 9]]
    assert seqs.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_over_long_rows_are_truncated_or_rejected(tok):
    rows = data.tokenize(tok, [{"prompt": [{"role": "user", "content": "12+34="}],
                                "completion": [{"role": "assistant", "content": "64"}]}], "sft")
    out, counts = data.limit_lengths(rows, "sft", 3, 2, "truncate", "data.sft")
    assert out[0]["prompt_ids"] == rows[0]["prompt_ids"][-3:]  # the prompt keeps its end
    assert out[0]["completion_ids"] == rows[0]["completion_ids"][:2]  # the completion keeps its start
    assert counts == {"prompts": 1, "completions": 1} and rows[0]["prompt_ids"] != out[0]["prompt_ids"]
    with pytest.raises(ConfigError, match=r"^data.sft: row 1: the prompt is \d+ tokens, more than "
                                          r"data.max_prompt_length 3 \(or set data.overlong: truncate\)$"):
        data.limit_lengths(rows, "sft", 3, 2, "error", "data.sft")
    assert data.limit_lengths(rows, "sft", 100, 100, "error", "data.sft") == (rows, {"prompts": 0, "completions": 0})


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty (no rows)"),
    (b'{"prompt": "\xff\xfe1+1=", "answer": "2"}\n', "not UTF-8 text (byte b'\\xff' in a value)"),
])
def test_unreadable_files_are_one_line(tmp_path, content, message):
    f = tmp_path / "eval.jsonl"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        data.load_rows(str(f), "data.eval")
    assert str(e.value) == f"data.eval: {f}: {message}"
