"""Shared fixtures: one tiny checkpoint and one small synthetic benchmark per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

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


@pytest.fixture
def recipe_file(tmp_path, tiny_checkpoint, synthetic_dir):
    """A small training recipe on the tiny kit; tests vary it with dotted overrides."""
    recipe = {
        "name": "test-sft",
        "model": {"path": str(tiny_checkpoint), "dtype": "float32"},
        "data": {"train": [{"path": str(synthetic_dir / "train.jsonl")}], "max_length": 1024},
        # lm_head too: the tiny random lm_head is too small in scale for attention LoRA alone to move the loss fast
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]},
        "train": {"output_dir": str(tmp_path / "run"), "seed": 0, "lr": 1e-2, "warmup_ratio": 0.0,
                  "batch_size": 4, "grad_accum": 1, "max_steps": 3, "save_every": 100},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def grpo_recipe(tmp_path, tiny_checkpoint, synthetic_dir):
    recipe = {
        "name": "test-grpo",
        "model": {"path": str(tiny_checkpoint), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]},
        "train": {"output_dir": str(tmp_path / "run"), "seed": 0, "lr": 1e-2, "warmup_ratio": 0.0,
                  "batch_size": 2, "grad_accum": 2, "save_every": 2},
        "grpo": {"num_generations": 2, "max_new_tokens": 12, "temperature": 1.0, "rollout_batch_size": 4,
                 "beta": 0.1, "iterations": 2, "clip_low": 0.05, "clip_high": 0.05,
                 "stages": [{"name": "one", "data": [{"path": str(synthetic_dir / "train.jsonl")}], "steps": 2,
                             "rewards": {"answer": 1.0, "length": 1.0}},
                            {"name": "two", "data": [{"path": str(synthetic_dir / "train.jsonl"), "max_samples": 6}],
                             "steps": 2, "rewards": {"format": 1.0, "length": 0.5}}]},
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
