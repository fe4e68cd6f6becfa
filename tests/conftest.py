"""Shared fixtures: a tiny tokenizer and model built in memory (no files, no network)."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("ALIGNPIPE_TRACKING", "off")  # tests that track use their own real MLflow store
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # no detached analytics daemon (and its temp file) per dvc call
# Prefect reads its settings once, at import, so they are set before anything imports it: each test
# process (each xdist worker) has its own Prefect home, removed at exit, never the user's ~/.prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="alignpipe-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ.update(PREFECT_HOME=_PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
os.environ.pop("PREFECT_API_URL", None)
# Each xdist worker gets its share of the cores for the torch processes it starts (stages inherit this): two
# workers each running torch on every core oversubscribe them, and OpenMP's threads spin waiting for threads
# the other process descheduled. Measured on 2 cores beside another 2-thread torch process: the real model's
# evaluate stage took 78.9 s with 2 threads, 23.1 s with 1; the lean DVC chain 121 s and 104 s.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


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


# The slowest files first (pytest's own order is alphabetical, which put the workers suite, the longest, last):
# `make test` hands whole files to 2 xdist workers in collection order, so a long file that starts late is a
# long tail with one core idle. Measured per-file test time on 2 cores, longest first (pytest --durations=0).
SLOW_FIRST = ["test_workers", "test_real_model", "test_distributed", "test_integration_dvc", "test_study",
              "test_engine", "test_integration_prefect", "test_stages", "test_methods", "test_sandbox", "test_modes",
              "test_recovery", "test_lora"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: within a file, pytest's order
