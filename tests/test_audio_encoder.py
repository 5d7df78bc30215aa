"""The audio tower behind the XARES-LLM encoder interface: shapes, masks, padding, errors, export, probe."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core import qwen_omni as qo
from encoder.audio_encoder import ENTRY_POINT, QwenOmniAudioEncoder, export

SR = qo.SAMPLE_RATE


@pytest.fixture(scope="module")
def plain_encoder(tiny_checkpoint):
    return QwenOmniAudioEncoder(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    # The tiny kit scales its audio tower's init so the output follows the input (core/tiny.py).
    return QwenOmniAudioEncoder(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder") / "audio_encoder"
    export(tiny_checkpoint, out)
    return out


def noise(*shape, seed=0):
    return 0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def encode(model, audio, mask=None):
    with torch.inference_mode():
        return model(audio, mask)


def load_entry_point(folder, name):
    """Import FOLDER/encoder.py by file path, the way a harness would, under a fresh module name."""
    spec = importlib.util.spec_from_file_location(name, folder / ENTRY_POINT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_attributes(encoder):
    assert encoder.output_dim == 128  # the tiny tower projects to the tiny thinker's hidden size
    assert encoder.sampling_rate == SR
    assert encoder.frame_rate == 13.0 == qo.audio_token_count(100)  # 1 s = 100 mel frames
    assert isinstance(encoder, torch.nn.Module) and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seconds", [0.3, 1.0, 1.7, 3.0])
def test_shapes_dtypes_and_frame_mask(encoder, batch, seconds):
    width = int(seconds * SR)
    kept = [width, int(0.6 * width), int(0.3 * SR)][:batch]  # clips of different lengths in one batch
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, count in enumerate(kept):
        mask[row, :count] = 1
    features, frame_mask = encode(encoder, noise(batch, width), mask)
    expected = [qo.audio_token_count(count // 160) for count in kept]
    assert features.shape == (batch, max(expected), encoder.output_dim)
    assert features.dtype == torch.float32 and frame_mask.dtype == torch.int64
    assert frame_mask.shape == features.shape[:2]
    assert frame_mask.sum(1).tolist() == expected == encoder.output_frames(torch.tensor(kept)).tolist()
    for row, count in enumerate(expected):
        assert frame_mask[row, :count].all() and not frame_mask[row, count:].any()
        assert not features[row, count:].any() and features[row, :count].abs().sum(-1).gt(0).all()
    # the frame rate attribute is what a clip of whole seconds gets
    if seconds == 1.0 or seconds == 3.0:
        assert expected[0] == int(seconds * encoder.frame_rate)


def test_test_encoder_follows_its_input(encoder):
    """What makes the equality and tolerance checks below meaningful."""
    clip = noise(1, SR, seed=9)
    quieter_tail = clip.clone()
    quieter_tail[0, -100:] *= 0.5  # the last 6 ms
    features, _ = encode(encoder, clip)
    assert (encode(encoder, quieter_tail)[0] - features).abs().max() > 1e-3


def test_no_mask_equals_full_mask(encoder):
    audio = noise(2, SR)
    features, frame_mask = encode(encoder, audio)
    masked, masked_frames = encode(encoder, audio, torch.ones(2, SR, dtype=torch.bool))
    assert torch.equal(features, masked) and torch.equal(frame_mask, masked_frames)


def test_matches_what_the_thinker_sees(encoder, tiny_checkpoint, processor):
    """Each clip = the thinker's processor on that clip + get_audio_features on a batch holding a
    clip of 1 s or more (the batch the wrapper always encodes in)."""
    thinker = qo.load_thinker(tiny_checkpoint, dtype="float32")
    thinker.audio_tower.load_state_dict(encoder.tower.state_dict())
    clips = [noise(int(2.3 * SR), seed=3), noise(int(0.45 * SR), seed=4)]
    mels = [processor.audio_features([clip.numpy()]) for clip in clips]  # each clip's mel on its own
    width = max(m["input_features"].shape[-1] for m in mels)
    input_features = torch.cat([F.pad(m["input_features"], (0, width - m["input_features"].shape[-1])) for m in mels])
    feature_mask = torch.cat([F.pad(m["feature_attention_mask"], (0, width - m["feature_attention_mask"].shape[-1])) for m in mels])
    with torch.inference_mode():
        reference = thinker.get_audio_features(input_features, feature_attention_mask=feature_mask).last_hidden_state
    counts = [qo.audio_token_count(int(m["feature_attention_mask"].sum())) for m in mels]
    for clip, expected in zip(clips, reference.split(counts)):
        features, frame_mask = encode(encoder, clip[None])
        assert int(frame_mask.sum()) == features.shape[1] == expected.shape[0]
        torch.testing.assert_close(features[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["tail", "middle", "head"])
def test_masked_samples_do_not_change_outputs(encoder, where):
    width = int(2.5 * SR)
    span = {"tail": slice(int(1.2 * SR), width), "middle": slice(int(0.8 * SR), int(1.9 * SR)), "head": slice(0, SR)}[where]
    mask = torch.ones(2, width, dtype=torch.long)
    mask[1, span] = 0
    audio = noise(2, width, seed=1)
    features, frame_mask = encode(encoder, audio, mask)
    changed = audio.clone()
    changed[1, span] = torch.randn(changed[1, span].shape) * 5.0  # loud, different content under mask = 0
    features_changed, frame_mask_changed = encode(encoder, changed, mask)
    assert torch.equal(features, features_changed) and torch.equal(frame_mask, frame_mask_changed)
    # and the masked clip is exactly its kept samples, encoded alone
    alone, _ = encode(encoder, audio[1][mask[1].bool()][None])
    kept_frames = int(frame_mask[1].sum())
    torch.testing.assert_close(features[1, :kept_frames], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seconds", [0.45, 1.7, 2.2])
def test_padding_does_not_change_a_clips_frames(encoder, seconds):
    clip = noise(int(seconds * SR), seed=2)
    alone, alone_mask = encode(encoder, clip[None])
    frames = int(alone_mask.sum())
    width = 4 * SR
    for filler in (torch.zeros, lambda n: noise(n, seed=4)):  # zeros or junk after the clip
        audio = torch.stack([torch.cat([clip, filler(width - clip.numel())]), noise(width, seed=5)])
        mask = torch.zeros(2, width, dtype=torch.long)
        mask[0, : clip.numel()] = 1
        mask[1] = 1
        features, frame_mask = encode(encoder, audio, mask)
        assert int(frame_mask[0].sum()) == frames
        torch.testing.assert_close(features[0, :frames], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "audio, mask, error, message",
    [
        (noise(SR), None, ValueError, r"2-D tensor \[B, T\].*1-D.*unsqueeze\(0\)"),
        (noise(2, 2, SR), None, ValueError, r"mono \[B, T\].*\(2, 2, 16000\).*multi-channel.*mean\(dim=1\)"),
        (noise(1, 1, 1, SR), None, ValueError, r"mono \[B, T\].*4-D|2-D tensor.*4-D"),
        ((noise(2, SR) * 32767).to(torch.int16), None, TypeError, r"floating-point.*torch.int16.*32768"),
        (noise(2, SR), torch.ones(2, SR - 1), ValueError, r"audio's shape \(2, 16000\), got \(2, 15999\)"),
        (noise(2, SR), torch.ones(SR), ValueError, r"audio's shape \(2, 16000\), got \(16000,\)"),
        (noise(2, SR), torch.full((2, SR), 0.5), ValueError, r"1 \(keep\) or 0 \(discard\)"),
        (noise(2, SR), torch.stack([torch.ones(SR), torch.zeros(SR)]), ValueError, r"clip 1 keeps no sample \(its mask is all 0\)"),
        (noise(1, 300), None, ValueError, r"clip 0 keeps only 300 samples; at least 400 \(25 ms"),
        (torch.zeros(0, SR), None, ValueError, r"empty batch"),
        (torch.tensor([[0.0] * 500 + [float("nan")]]), None, ValueError, r"NaN or infinite samples in clip\(s\) \[0\]"),
        (noise(2, SR), 44100, TypeError, r"sample mask \[B, T\], got the number 44100.*16000 Hz mono"),
        (noise(2, SR).numpy(), None, TypeError, r"torch.Tensor \[B, T\], got ndarray"),
    ],
    ids=["1d", "stereo", "4d", "int16", "mask-short", "mask-1d", "mask-values", "mask-empty-clip",
         "too-short", "empty-batch", "nan", "sample-rate", "numpy"],
)
def test_bad_inputs_give_clear_errors(encoder, audio, mask, error, message):
    with pytest.raises(error, match=message):
        encode(encoder, audio, mask)


def test_other_float_dtypes_are_cast_to_float32(encoder):
    audio = noise(2, SR)
    reference, _ = encode(encoder, audio)
    as_double, _ = encode(encoder, audio.double())
    torch.testing.assert_close(as_double, reference, rtol=1e-5, atol=1e-6)
    as_half, _ = encode(encoder, audio.bfloat16())
    torch.testing.assert_close(as_half, encode(encoder, audio.bfloat16().float())[0])


def test_export_is_self_contained_and_loads_fresh(exported, plain_encoder):
    encoder = plain_encoder
    assert {p.name for p in exported.iterdir()} == {
        ENTRY_POINT, "config.json", "model.safetensors", "preprocessor_config.json"
    }
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen3_omni_moe_audio_encoder"
    source = (exported / ENTRY_POINT).read_text()
    imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, flags=re.M)
    assert {name.split(".")[0] for name in imports} <= {"__future__", "argparse", "json", "shutil", "pathlib",
                                                        "numpy", "torch", "transformers", "safetensors", "peft"}
    assert not re.search(r"\b(infer|data_prep|train|eval)\.\w", source)

    module = load_entry_point(exported, "exported_encoder_fresh")
    # The XARES-LLM harness picks the one module attribute ending in "Encoder" and calls it with no arguments.
    assert [name for name in dir(module) if name.endswith("Encoder")] == ["QwenOmniAudioEncoder"]
    fresh = module.QwenOmniAudioEncoder(device="cpu", dtype="float32")
    assert type(fresh).__module__ == "exported_encoder_fresh"
    assert fresh.output_dim == encoder.output_dim and fresh.frame_rate == encoder.frame_rate
    audio = noise(3, 2 * SR, seed=6)
    mask = torch.ones(3, 2 * SR, dtype=torch.long)
    mask[1, SR:] = 0
    mask[2, int(0.4 * SR):] = 0
    ours, our_mask = encode(encoder, audio, mask)
    theirs, their_mask = encode(fresh, audio, mask)
    assert torch.equal(ours, theirs) and torch.equal(our_mask, their_mask)
    assert torch.equal(encode(module.load(exported, device="cpu"), audio, mask)[0], ours)


def test_export_with_adapter(tiny_checkpoint, plain_encoder, tmp_path):
    encoder = plain_encoder
    from peft import LoraConfig, get_peft_model

    audio = noise(2, int(1.5 * SR), seed=7)
    base, _ = encode(encoder, audio)
    for include_audio_tower in (False, True):
        thinker = qo.load_thinker(tiny_checkpoint, dtype="float32")
        targets = qo.lora_target_names(thinker, ["q_proj", "v_proj"], include_audio_tower=include_audio_tower)
        torch.manual_seed(0)
        model = get_peft_model(thinker, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        adapter = tmp_path / f"adapter-{include_audio_tower}"
        model.save_pretrained(adapter)
        exported = export(tiny_checkpoint, tmp_path / f"encoder-{include_audio_tower}", adapter=adapter)
        features, _ = encode(exported, audio)
        if not include_audio_tower:
            assert torch.equal(features, base)
            continue
        merged_tower = model.merge_and_unload().audio_tower
        assert not torch.allclose(features, base, atol=1e-3)
        reloaded = QwenOmniAudioEncoder(tmp_path / f"encoder-{include_audio_tower}", device="cpu", dtype="float32")
        reloaded_features, _ = encode(reloaded, audio)
        torch.testing.assert_close(reloaded_features, features)
        reloaded.tower = merged_tower.eval()
        torch.testing.assert_close(encode(reloaded, audio)[0], features, rtol=1e-4, atol=1e-5)


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json not found"):
        QwenOmniAudioEncoder(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(ValueError, match=r"model_type 'whisper' is neither"):
        QwenOmniAudioEncoder(tmp_path, device="cpu")


def test_ridge_probe_and_majority():
    from encoder.probe import majority, ridge_probe

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 40)) * 3
    labels = [0, 1, 2] * 10
    x = centres[labels] + rng.normal(size=(30, 40))
    predicted = ridge_probe(x[:21], labels[:21], x[21:])
    assert predicted == labels[21:]
    assert majority([1, 1, 2], [1, 2, 2, 2]) == 0.25


def test_probe_prints_accuracies(exported, synthetic_dir, tmp_path, capsys):
    from encoder.probe import PROBE_TASKS, main

    out = tmp_path / "probe.json"
    main(["--encoder", str(exported), "--data", str(synthetic_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [row["task"] for row in rows] == list(PROBE_TASKS)
    for row in rows:
        assert 0.0 <= row["majority"] <= 1.0 and 0.0 <= row["probe"] <= 1.0
        assert row["train"] == 4 and row["test"] == 2  # 24 / 12 clips over 6 tasks
        assert re.search(rf"^{row['task']}\s+{row['classes']}\s+4\s+2\s+{row['majority']:.3f}\s+{row['probe']:.3f}$", printed, re.M)
    assert rows[0]["classes"] >= 2 and "mean" in printed


@pytest.mark.gpu
def test_bfloat16_on_gpu_matches_float32(exported, plain_encoder):
    encoder = plain_encoder
    gpu = QwenOmniAudioEncoder(exported)  # defaults: CUDA, bfloat16
    assert gpu.tower.dtype == torch.bfloat16 and gpu.window.device.type == "cuda"
    audio = noise(3, 2 * SR, seed=8)
    features, frame_mask = encode(gpu, audio.cuda())
    reference, reference_mask = encode(encoder, audio)
    assert torch.equal(frame_mask.cpu(), reference_mask)
    torch.testing.assert_close(features.cpu(), reference, rtol=0.05, atol=0.05)
