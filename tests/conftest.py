"""Shared fixtures: the tiny test model (embedded tokenizer, random weights) and temp dirs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a 4-layer Llama with hidden size 64 and the embedded tokenizer."""
    from tactful.models import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """The tiny model saved to a directory: a model spec that training runs can name as their base."""
    from tactful.models import tiny_model

    model, tok = tiny_model(0)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model, loaded once per test session (only where the real model matters)."""
    from tactful.models import load_model

    return load_model("embedded")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    """Tests are dominated by tiny matmuls, where extra OpenMP threads only add contention.

    TACTFUL_TEST_THREADS overrides (e.g. on a quiet many-core machine).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TACTFUL_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the long tail of a matrix; runs with TACTFUL_SLOW=1 or -m slow")


def pytest_collection_modifyitems(config, items):
    # The suite's default run stays within its time budget on 2 cores: `slow` cases (the full
    # method x architecture product) are skipped unless asked for.
    if os.environ.get("TACTFUL_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: set TACTFUL_SLOW=1 (or -m slow) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
