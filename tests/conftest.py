"""Shared fixtures: one tiny checkpoint and one small synthetic benchmark per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo with shared/ beside it; MMAR_META points elsewhere when needed.
MMAR_META = Path(os.environ.get("MMAR_META", REPO.parent / "shared" / "data" / "MMAR-meta.jsonl"))

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
    if not MMAR_META.is_file():
        pytest.skip(f"benchmark metadata not found at {MMAR_META}")
    return MMAR_META
