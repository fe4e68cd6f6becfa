"""Shared fixtures: a tiny tokenizer and model built in memory (no files, no network)."""

import os

import pytest

os.environ.setdefault("ALIGNPIPE_TRACKING", "off")  # tests that track use their own real MLflow store
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tok():
    from stages.core import models, task

    return models.build_tokenizer(task.corpus(20), 300)


@pytest.fixture(scope="session")
def tiny_model(tok):
    from stages.core import models

    m = models.build_tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                max_positions=32, seed=0)
    m.eval()
    return m


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, tok, tiny_model):
    """The tiny model and tokenizer saved with save_pretrained, as prepare writes them."""
    d = tmp_path_factory.mktemp("tiny")
    tiny_model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
