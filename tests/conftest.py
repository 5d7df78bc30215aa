"""Shared fixtures: one tiny checkpoint and one small synthetic benchmark per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Benchmark metadata for the tests: 40 records of the official MMAR-meta.jsonl, in its schema
# (tests/data/README.md). MMAR_META=path/to/MMAR-meta.jsonl runs the same tests on the whole file.
MMAR_SAMPLE = REPO / "tests" / "data" / "mmar_sample.jsonl"
MMAR_META = Path(os.environ.get("MMAR_META") or MMAR_SAMPLE)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: tiny matmuls gain nothing from a second thread,
    which only spin-waits (about 5x slower on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from core.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-omni"))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    from data_prep.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, train=24, test=12, seed=0)
    return out


@pytest.fixture(scope="session")
def processor(tiny_checkpoint):
    from core.qwen_omni import OmniProcessor

    return OmniProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def mmar_meta() -> Path:
    """MMAR metadata in the official schema: the checked-in sample, or the file MMAR_META names
    (an error, not a skip, when that file is missing)."""
    if not MMAR_META.is_file():
        raise FileNotFoundError(f"MMAR_META={MMAR_META}: file not found (unset it to use {MMAR_SAMPLE})")
    return MMAR_META


@pytest.fixture(scope="session")
def mmar_facts() -> dict:
    """Figures of the whole official file that the sample cannot show (tests/data/mmar_facts.json)."""
    import json

    return json.loads((REPO / "tests" / "data" / "mmar_facts.json").read_text())
