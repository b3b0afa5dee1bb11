"""Shared fixtures. Tests train on the WikiText-2 *test-articles* corpus in $LMLAB_DATA_DIR (the
real test split's articles cut into train/valid/test) and label it as that corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(os.environ.get("LMLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
ARTICLES = DATA_DIR / "wikitext-2-test-articles"

# Tests are small; one intra-op thread keeps them deterministic and leaves the other core to pytest.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not ARTICLES.is_dir():
        pytest.fail(f"test corpus missing: {ARTICLES} (set LMLAB_DATA_DIR to the shared data folder)")
    return DATA_DIR


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer/token cache for the whole session, never the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("lmlab-cache")
    os.environ["LMLAB_CACHE_DIR"] = str(cache)
    return cache


@pytest.fixture
def articles_data() -> dict:
    """DataConfig fields for the test-articles corpus."""
    return {"dataset": "local", "path": str(ARTICLES), "name": "wikitext-2-test-articles"}


