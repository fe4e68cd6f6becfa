"""compare's table as a DataFrame: its Markdown (each column in its format, n/a where nothing was measured)
and its CSV (pandas' writer; DVC's plots read it: tests/test_integration_dvc.py)."""

import pandas as pd

from stages import compare


def test_the_table_is_a_dataframe_written_by_pandas(tmp_path):
    table = [{"policy": "sft", "eval/accuracy": 0.5, "eval/pass_at_4": 0.75, "eval/kl_to_ref": 0.0, "stability": None},
             {"policy": "distill_grpo", "eval/accuracy": 0.9, "eval/pass_at_4": 1.0, "eval/kl_to_ref": 0.1234}]
    cols = compare.columns([4])
    df = compare.frame(table, cols)
    assert list(df.columns) == ["policy", *(k for k, _, _ in cols)] and len(df) == 2
    md = compare.markdown(df, cols).splitlines()
    assert md[0].startswith("| policy ") and "| pass@4 |" in md[0].replace("  ", "")
    assert [c.strip() for c in md[2].split("|")[1:4]] == ["sft", "50.0%", "75.0%"]
    assert "0.000" in md[2] and "0.123" in md[3] and md[2].count("n/a") == len(cols) - 3  # not measured: n/a
    assert md[1].startswith("|:---") and md[1].endswith("---:|")  # policies left, figures right
    df.to_csv(tmp_path / "c.csv", index=False)
    back = pd.read_csv(tmp_path / "c.csv")
    assert back["eval/accuracy"].tolist() == [0.5, 0.9] and back["policy"].tolist() == ["sft", "distill_grpo"]
