"""The training-data cache (train/data_cache.py): built once in parallel, keyed by what decides its rows, shared by processes."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from core import qwen_omni as qo
from core.items import DataError, load_items
from core.locks import file_lock
from core.recipe import DataConfig, DatasetSpec
from train import data_cache
from train.data import build_examples, epoch_batches, mix
from train.data_cache import cached_records


def rows(table) -> list[dict]:
    return table.data.to_pylist()


@pytest.fixture
def small_ranges(monkeypatch):
    """~3 kB byte ranges: the 24-record synthetic file becomes several tasks for several workers."""
    monkeypatch.setattr(data_cache, "MIN_RANGE_BYTES", 3000)
    monkeypatch.setattr(data_cache, "MAX_RANGE_BYTES", 3000)


def build(path, processor, root, workers=1, log=None, **kwargs):
    lines = [] if log is None else log
    options = dict(audio_root=None, prompt_style="baseline", max_audio_seconds=30.0) | kwargs
    table = cached_records(path, options["audio_root"], processor, options["prompt_style"], options["max_audio_seconds"],
                           root, workers, lines.append)
    return table, lines


def test_rows_hold_what_training_needs(synthetic_dir, processor, tmp_path):
    train = synthetic_dir / "train.jsonl"
    table, _ = build(train, processor, tmp_path / "cache")
    items = load_items(train, require_thinking=True)
    got = rows(table)
    assert [r["id"] for r in got] == [i.id for i in items]
    assert [f"{train}:{r['line']}" for r in got] == [i.where for i in items]
    for row, item in zip(got, items):
        assert row["audio_path"] == str(item.audio_path) and tuple(row["choices"]) == item.choices
        assert row["thinking"] == item.thinking and row["answer"] == item.answer
        assert row["prompt"] == qo.render_prompt(processor.tokenizer, item.question, item.choices, "baseline")
        assert row["audio_samples"] == item.load_audio().size  # from the header: what decoding gives
        frames = qo.feature_frames(min(row["audio_samples"], 30 * qo.SAMPLE_RATE))
        expanded = processor.expand_audio(row["prompt"], frames)
        target = qo.render_target(row["prompt"], item.thinking, item.answer)
        tokens = processor.tokenizer([expanded, target], add_special_tokens=False)["input_ids"]
        assert row["length"] == len(tokens[0]) + len(tokens[1])


def test_parallel_build_over_ranges_equals_one_process(synthetic_dir, processor, tmp_path, small_ranges):
    train = synthetic_dir / "train.jsonl"
    _, ranges = data_cache.scan(train, 3000)
    assert len(ranges) > 3 and ranges[0][0] == 0 and ranges[-1][1] == train.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, cut after a newline
    data = train.read_bytes()
    for start, end, line in ranges:
        assert data[end - 1 : end] == b"\n" and data[:start].count(b"\n") + 1 == line
    one, _ = build(train, processor, tmp_path / "one", workers=1)
    two, lines = build(train, processor, tmp_path / "two", workers=2)
    assert rows(two) == rows(one)
    assert any(f"{len(ranges)} ranges, 2 process(es)" in line for line in lines)
    assert lines[-1].startswith(f"data cache: {train}: {len(ranges)}/{len(ranges)} ranges, 24 records")


def test_unchanged_key_loads_changed_key_rebuilds(synthetic_dir, processor, tmp_path, monkeypatch):
    train, root = tmp_path / "train.jsonl", tmp_path / "cache"
    train.write_text((synthetic_dir / "train.jsonl").read_text())
    audio = synthetic_dir  # audio_path is relative to the original file's folder
    first, lines = build(train, processor, root, audio_root=audio)
    assert any("building" in line for line in lines)
    again, lines = build(train, processor, root, audio_root=audio)
    assert lines == [] and rows(again) == rows(first)  # loaded, not built
    folders = lambda: sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(folders()) == 1

    def rebuilds(**kwargs) -> bool:
        before = set(folders())
        _, log = build(train, processor, root, **{"audio_root": audio, **kwargs})
        return any("building" in line for line in log) and len(set(folders()) - before) == 1

    assert rebuilds(prompt_style="qwen")
    assert rebuilds(max_audio_seconds=1.5)
    # the data file's contents, not its name or time
    train.write_text(train.read_text() + "\n")  # the same records, other bytes
    assert rebuilds()
    # the tokenizer's chat template
    monkeypatch.setattr(processor.tokenizer, "chat_template", processor.tokenizer.chat_template + " ")
    assert rebuilds()
    monkeypatch.undo()
    # a new audio frame rule in core.qwen_omni (no version to bump by hand)
    monkeypatch.setattr(qo, "feature_frames", lambda samples: samples // qo.HOP_LENGTH + 1)
    assert rebuilds()
    monkeypatch.undo()
    assert not rebuilds()  # back to a key seen before


def test_max_length_and_max_samples_select_rows_without_a_rebuild(synthetic_dir, processor, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    spec = DatasetSpec(path=str(synthetic_dir / "train.jsonl"))
    build_examples(DataConfig(train=[spec]), processor, "baseline", seed=0, log=lambda *_: None, cache_dir=root)

    def no_header_reads(*_):
        raise AssertionError("a warm start read an audio header")

    monkeypatch.setattr(soundfile, "info", no_header_reads)  # lengths and durations come from the cache
    every = build_examples(DataConfig(train=[spec], max_length=100_000), processor, "baseline", seed=0, log=lambda *_: None, cache_dir=root)
    limit = sorted(e.length for e in every)[len(every) // 2]  # the median: some records on each side
    short = build_examples(DataConfig(train=[spec], max_length=limit, cache=str(root)), processor, "baseline", seed=0, log=lambda *_: None)
    assert len(list(root.glob("*/info.json"))) == 1
    assert [e.item.id for e in short] == [e.item.id for e in every if e.length <= limit] and 0 < len(short) < 24
    np.testing.assert_array_equal(every.lengths, [e.length for e in every])
    monkeypatch.undo()
    assert every.audio_samples.tolist() == [e.item.audio_samples() for e in every]
    assert [e.item.id for e in every[-2:]] == [every[22].item.id, every[23].item.id]


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_records_name_file_line_and_field(synthetic_dir, processor, tmp_path, small_ranges, workers):
    records = [json.loads(line) for line in (synthetic_dir / "train.jsonl").read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"
    broken = [dict(r) for r in records]
    broken[19]["answer"] = "none of them"
    bad.write_text("".join(json.dumps(r) + "\n" for r in broken))
    with pytest.raises(DataError, match=rf"bad.jsonl:20 \(id={records[19]['id']}\): answer: 'none of them' is not one of"):
        build(bad, processor, tmp_path / "cache", workers=workers, audio_root=synthetic_dir)
    duplicate = records + [records[3]]
    bad.write_text("".join(json.dumps(r) + "\n" for r in duplicate))
    with pytest.raises(DataError, match=rf"bad.jsonl:25 \(id={records[3]['id']}\): id: duplicate of line 4"):
        build(bad, processor, tmp_path / "cache", workers=workers, audio_root=synthetic_dir)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # a failed build leaves nothing behind


def _build_in_child(path, root, checkpoint, out: Path):
    processor = qo.OmniProcessor.from_pretrained(checkpoint)

    def log(line):  # written at once: the parent watches for "waiting"
        with out.with_suffix(".log").open("a") as handle:
            handle.write(line + "\n")

    table = cached_records(path, None, processor, "baseline", 30.0, root, 1, log)
    out.write_text(json.dumps({"records": len(table), "first_id": table[0]["id"]}))


def test_processes_that_start_together_build_once(synthetic_dir, tiny_checkpoint, processor, tmp_path):
    train, root = synthetic_dir / "train.jsonl", tmp_path / "cache"
    key, _ = data_cache.cache_key(data_cache.scan(train, 1 << 20)[0], synthetic_dir.resolve(), processor, "baseline", 30.0)
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    logs = [out.with_suffix(".log") for out in outs]
    waiting = lambda: all(log.is_file() and "waiting" in log.read_text() for log in logs)
    context = multiprocessing.get_context("fork")
    root.mkdir()
    # Both start while the lock is held (as while another node builds): both wait, then one builds, one maps.
    with file_lock(root / f"{key}.lock"):
        children = [context.Process(target=_build_in_child, args=(train, root, tiny_checkpoint, out)) for out in outs]
        for child in children:
            child.start()
        deadline = time.monotonic() + 120
        while not waiting() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert waiting()
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    assert [json.loads(out.read_text())["records"] for out in outs] == [24, 24]
    assert sum("building" in log.read_text() for log in logs) == 1
    assert len(list(root.glob("*/info.json"))) == 1 and not list(root.glob("*.tmp-*"))


def test_vectorised_grouping_and_mixing_match_the_list_versions():
    """The order the earlier list-based code gave, for the same (seed, epoch): ties included."""
    lengths = np.random.default_rng(3).integers(50, 80, size=1000)  # many ties

    def reference_batches(lengths, batch_size, grad_accum, world, rank, seed, epoch):
        global_batch = batch_size * world
        usable = len(lengths) // (global_batch * grad_accum) * global_batch * grad_accum
        order = np.random.default_rng([seed, epoch]).permutation(len(lengths))[:usable]
        mega = global_batch * 32
        order = np.concatenate([sorted(order[i : i + mega], key=lambda j: -lengths[j]) for i in range(0, usable, mega)])
        return [order[s + rank * batch_size : s + (rank + 1) * batch_size].tolist() for s in range(0, usable, global_batch)]

    for args in [(4, 2, 2, 1, 7, 0), (1, 1, 1, 0, 0, 3), (3, 1, 2, 0, 5, 1)]:
        assert epoch_batches(lengths, *args) == reference_batches(lengths, *args)
        assert epoch_batches(list(lengths), *args) == reference_batches(lengths, *args)

    def reference_mix(pools, weights, seed):
        rng = np.random.default_rng(seed)
        total, mixed = sum(len(p) for p in pools), []
        for pool, weight in zip(pools, weights):
            repeats, rest = divmod(round(total * weight / sum(weights)), len(pool))
            mixed += list(pool) * repeats + [pool[i] for i in rng.permutation(len(pool))[:rest]]
        return mixed

    pools = [np.arange(0, 24), np.arange(24, 28), np.arange(28, 40)]
    assert mix(pools, [3, 1, 0.5], seed=4).tolist() == reference_mix(pools, [3, 1, 0.5], 4)


def test_render_target_search_equals_trying_every_cut():
    """render_target tries only the cuts that can match (linear); the result is the exhaustive search's."""
    def exhaustive(prompt, thinking, answer):
        full = f"<think>\n{thinking.strip()}\n</think>\n\n{answer}<|im_end|>"
        for cut in range(len(full), 0, -1):
            if prompt.endswith(full[:cut]):
                return full[cut:]
        return full

    ends = ["", "x", "<", "<think", "<think>", "<think>\n", "<think>\nwh", "<<think>\n", "assistant\n<think>\n\n</think>\n\n",
            "<think>\nwhy\n</think>\n\na<|im_end|>", "<think>\nwhy\n</think>\n\na<|im_end|>z"]
    cases = [(head + end, thinking, answer) for head in ("", "system <x> ", "<<<") for end in ends
             for thinking in ("why", " why ", "x" * 50, "") for answer in ("a", "<")]
    assert [qo.render_target(*case) for case in cases] == [exhaustive(*case) for case in cases]
    assert qo.render_target("...assistant\n<think>\n", "why", "a") == "why\n</think>\n\na<|im_end|>"
