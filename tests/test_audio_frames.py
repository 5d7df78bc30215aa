"""One waveform-to-features rule on every path, and no cropping at inference.

Clips whose length is not a multiple of the 160-sample hop get the same number of audio tokens in
training, in the hf engine and under vLLM's rule; inference hears whole clips; the clips training
cuts are counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

from core import qwen_omni as qo
from core.audio import write_wav
from core.items import Item
from core.recipe import DataConfig, InferConfig

# None a multiple of 160; 16_001 and 17_330 sit where floor(n / 160) and ceil(n / 160) frames give
# different token counts (100 vs 101 frames, 108 vs 109), the case that used to differ from vLLM.
LENGTHS = (16_001, 17_330, 23_999, 24_080, 31_337)


def vllm_audio_tokens(num_samples: int) -> int:
    """vLLM's rule (vllm/model_executor/models/qwen3_omni_moe_thinker.py, _call_hf_processor): pad
    the waveform to a multiple of the hop, then `length // hop` frames (one fewer only for a length
    that is not a multiple, which padding rules out); tokens by the stock processor's length rule."""
    hop = qo.HOP_LENGTH
    padded = num_samples if num_samples % hop == 0 else num_samples + hop - num_samples % hop
    frames = padded // hop if padded % hop == 0 else padded // hop - 1
    return int(_get_feat_extract_output_lengths(torch.tensor(frames)))


def clip(n: int) -> np.ndarray:
    return (0.3 * np.sin(np.arange(n) * 0.07)).astype(np.float32)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    out = []
    for n in LENGTHS:
        write_wav(folder / f"{n}.wav", clip(n))
        out.append(Item(id=f"c{n}", audio_path=folder / f"{n}.wav", question="How many beeps?",
                        choices=("one", "two"), answer="two", thinking="I hear two onsets.", where=f"{n}.wav:1"))
    return out


def test_vllm_rule_differs_from_flooring_on_these_clips():
    # the reference is not trivially met: flooring the frames (the old training rule) disagrees here
    floored = [int(_get_feat_extract_output_lengths(torch.tensor(n // qo.HOP_LENGTH))) for n in LENGTHS]
    assert floored != [vllm_audio_tokens(n) for n in LENGTHS]


def test_same_audio_tokens_in_training_hf_engine_and_vllm(items, processor):
    from infer.engine import Request, request_length, vllm_prompt
    from train.data import SFTCollator, SFTDataset, render_examples

    pad = processor.token_id(qo.AUDIO_PAD)
    expected = [vllm_audio_tokens(n) for n in LENGTHS]

    # training: the length estimate from the file header, and the collated batch
    examples = render_examples(items, processor, "baseline", 30.0, "frames")
    rows = [SFTDataset(examples, 30.0)[i] for i in range(len(examples))]
    batch = SFTCollator(processor)(rows)
    assert (batch["input_ids"] == pad).sum(-1).tolist() == expected
    target_lengths = [len(processor.tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in examples]
    assert [e.length - t for e, t in zip(examples, target_lengths)] == batch["attention_mask"].sum(-1).sub(
        torch.tensor(target_lengths)).tolist()

    # hf engine: the bucketing length and the processor's batch (left-padded, all clips together)
    prompt = qo.render_prompt(processor.tokenizer, "How many beeps?", ["one", "two"])
    requests = [Request(item.id, prompt, item.load_audio()) for item in items]
    inputs = processor([r.prompt for r in requests], [r.audio for r in requests])
    assert (inputs["input_ids"] == pad).sum(-1).tolist() == expected
    n_text = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 1
    assert [request_length(r, processor.tokenizer) - n_text for r in requests] == expected

    # vLLM gets the hop-aligned waveform: its own padding then changes nothing
    for request in requests:
        sent, _ = vllm_prompt(request, processor.tokenizer)["multi_modal_data"]["audio"]
        assert len(sent) % qo.HOP_LENGTH == 0 and len(sent) - len(request.audio) < qo.HOP_LENGTH
        np.testing.assert_array_equal(sent[: len(request.audio)], request.audio)


def test_stock_processor_batches_give_the_same_frames(processor):
    """In the stock processor's padded batch a shorter clip gets ceil(n / 160) frames: the rule here."""
    waves = [clip(n) for n in LENGTHS] + [clip(40_000)]
    stock = processor.feature_extractor(waves, sampling_rate=qo.SAMPLE_RATE, padding=True, truncation=False,
                                        return_attention_mask=True, return_tensors="np")
    assert stock["attention_mask"].sum(-1)[:-1].tolist() == [qo.feature_frames(n) for n in LENGTHS]
    ours = processor.audio_features(waves[:-1])
    assert ours["feature_attention_mask"].sum(-1).tolist() == [qo.feature_frames(n) for n in LENGTHS]


def test_omni_processor_equals_the_stock_processor_on_audio(processor):
    """The stock Qwen3OmniMoeProcessor's own __call__, given the hop-aligned clips vLLM gives it, makes the
    same token ids, masks and features as OmniProcessor. Its image/video processors need torchvision,
    which does not import beside torch+cpu; with no images or videos it reads only their merge sizes."""
    from types import SimpleNamespace

    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

    stock = Qwen3OmniMoeProcessor.__new__(Qwen3OmniMoeProcessor)
    stock.tokenizer, stock.feature_extractor = processor.tokenizer, processor.feature_extractor
    stock.image_processor = stock.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    for attribute in qo.TOKENIZER_TOKEN_ATTRIBUTES:
        setattr(stock, attribute, getattr(processor.tokenizer, attribute))  # as its __init__ does

    prompt = qo.render_prompt(processor.tokenizer, "How many beeps?", ["one", "two"])
    waves = [qo.align_to_hop(clip(n)) for n in LENGTHS]
    theirs = stock(text=[prompt] * len(waves), audio=waves, return_tensors="pt", padding=True)
    ours = processor([prompt] * len(waves), waves)
    for key in ("input_ids", "attention_mask", "feature_attention_mask"):
        torch.testing.assert_close(theirs[key].long(), ours[key].long(), rtol=0, atol=0, msg=key)
    # features: the stock extractor's depend on the rest of a padded batch (its log-mel floor is taken
    # over the padded waveform); OmniProcessor extracts each clip alone, as the stock one does at batch 1
    for row, wave in enumerate(waves):
        alone = stock(text=[prompt], audio=[wave], return_tensors="pt")["input_features"][0]
        torch.testing.assert_close(ours["input_features"][row, :, : alone.shape[-1]], alone)


def test_inference_hears_whole_clips_by_default(tmp_path, processor):
    from infer.run import item_request

    write_wav(tmp_path / "long.wav", clip(31 * qo.SAMPLE_RATE + 5))  # MMAR has clips of 31, 32 and 56 s
    item = Item(id="long", audio_path=tmp_path / "long.wav", question="Q?", choices=("a", "b"), answer="a")
    assert InferConfig().max_audio_seconds is None
    request = item_request(item, processor.tokenizer, "baseline", InferConfig().max_audio_seconds)
    assert len(request.audio) == 31 * qo.SAMPLE_RATE + 5
    assert len(item_request(item, processor.tokenizer, "baseline", 30.0).audio) == 30 * qo.SAMPLE_RATE


def test_training_counts_the_clips_it_crops(tmp_path, processor):
    from train.data import build_examples

    lines = []
    for name, seconds in (("short", 2.0), ("long", 3.5), ("longer", 4.0)):
        write_wav(tmp_path / f"{name}.wav", clip(int(seconds * qo.SAMPLE_RATE)))
        lines.append({"id": name, "audio_path": f"{name}.wav", "question": "Q?", "choices": ["a", "b"],
                      "answer": "a", "thinking": "because"})
    import json

    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    logged = []
    config = DataConfig(train=[{"path": str(tmp_path / "sft.jsonl")}], max_audio_seconds=3.0)
    examples = build_examples(config, processor, "baseline", seed=0, log=logged.append)
    assert sorted(e.item.id for e in examples if e.audio_cropped) == ["long", "longer"]
    assert "2 clips cropped to data.max_audio_seconds=3 s" in logged[0]
