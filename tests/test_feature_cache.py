"""The feature cache returns exactly what the processor computes, never a stale entry, and
survives concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from core import qwen_omni as qo
from core.audio import load_audio, write_wav
from core.feature_cache import FeatureCache, main


def wav(path, seconds, freq, rate=qo.SAMPLE_RATE):
    t = np.arange(int(seconds * rate)) / rate
    write_wav(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


@pytest.fixture
def clip_files(tmp_path):
    return [wav(tmp_path / f"c{i}.wav", s, f) for i, (s, f) in enumerate([(1.0, 440), (2.37, 660), (0.51, 880)])]


def test_cached_features_equal_the_waveform_path(tmp_path, processor, clip_files):
    cache = FeatureCache(tmp_path / "cache", processor, max_seconds=2.0)
    cold = [cache.features_for(p) for p in clip_files]
    warm = [cache.features_for(p) for p in clip_files]
    assert (cache.misses, cache.hits) == (3, 3)
    audios = [load_audio(p, 2.0) for p in clip_files]
    expected = processor.audio_features(audios)
    for features in (cold, warm):
        got = processor.audio_features(features=features)
        assert torch.allclose(got["input_features"], expected["input_features"], atol=1e-6)
        assert torch.equal(got["feature_attention_mask"], expected["feature_attention_mask"])
    assert expected["feature_attention_mask"].sum(-1).tolist() == [100, 200, 51]  # 2.37 s cut to 2 s


def test_a_changed_file_never_hits_a_stale_entry(tmp_path, processor):
    path = wav(tmp_path / "a.wav", 1.0, 440)
    cache = FeatureCache(tmp_path / "cache", processor)
    before = cache.features_for(path)
    stat = os.stat(path)
    wav(path, 1.0, 1760)  # same size; give it the old mtime too, as cp -p or rsync -t would
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    after = cache.features_for(path)
    assert cache.misses == 2
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, processor.clip_features(load_audio(path)), atol=1e-6)


def test_settings_that_change_features_use_another_folder(tmp_path, processor):
    full = FeatureCache(tmp_path / "cache", processor, max_seconds=None)
    cut = FeatureCache(tmp_path / "cache", processor, max_seconds=0.5)
    assert full.dir != cut.dir
    path = wav(tmp_path / "a.wav", 1.0, 440)
    assert full.features_for(path).shape[-1] == 100 and cut.features_for(path).shape[-1] == 50


def test_a_torn_entry_is_recomputed(tmp_path, processor, clip_files):
    cache = FeatureCache(tmp_path / "cache", processor)
    good = cache.features_for(clip_files[0])
    entry = next(cache.dir.glob("*/*.npy"))
    entry.write_bytes(entry.read_bytes()[:100])  # a write cut short
    np.testing.assert_array_equal(cache.features_for(clip_files[0]), good)
    assert cache.misses == 2
    np.testing.assert_array_equal(np.load(entry), good)


def _fill(args):
    root, processor, paths = args
    cache = FeatureCache(root, processor)
    return [cache.features_for(p).shape[-1] for p in paths]


def test_concurrent_writers_leave_whole_entries(tmp_path, processor):
    paths = [str(wav(tmp_path / f"w{i}.wav", 0.5 + 0.1 * i, 300 + 50 * i)) for i in range(12)]
    root = str(tmp_path / "cache")
    # two forked workers racing on the same entries, one thread each, as dataloader workers run
    with mp.get_context("fork").Pool(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        frames = pool.map(_fill, [(root, processor, paths), (root, processor, paths[::-1])], chunksize=1)
    assert frames[0] == frames[1][::-1]
    cache = FeatureCache(root, processor)
    assert len(list(cache.dir.glob("*/*.npy"))) == 12
    assert not list(cache.dir.rglob("*.tmp"))
    for path in paths:
        np.testing.assert_array_equal(cache.features_for(path), processor.clip_features(load_audio(path)))
    assert cache.misses == 0


def test_build_cli_precomputes_and_resumes(synthetic_dir, tiny_checkpoint, tmp_path, capsys):
    argv = ["build", str(synthetic_dir / "test.jsonl"), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "c")]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    second = capsys.readouterr().out
    assert '"clips": 12, "already_cached": 0, "computed": 12' in first
    assert '"clips": 12, "already_cached": 12, "computed": 0' in second


def test_an_entry_appears_only_when_complete(tmp_path, processor, clip_files, monkeypatch):
    cache = FeatureCache(tmp_path / "cache", processor)
    renames = []
    real_replace = os.replace

    def checked_replace(src, dst):
        renames.append((os.path.exists(dst), np.load(src).shape))  # final name unseen, temporary file whole
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checked_replace)
    features = cache.features_for(clip_files[0])
    assert renames == [(False, features.shape)]
