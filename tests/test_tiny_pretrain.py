"""The tiny base's pre-training to hear (core/tiny_pretrain.py): bad input named, the loss falls."""

from __future__ import annotations

import json

import pytest
import torch

from core import qwen_omni as qo
from core.items import DataError
from core.tiny import build_config, build_thinker, build_tokenizer, make_audio_tower_responsive, tiny_feature_extractor
from core.tiny_pretrain import CAPTION_PROMPT, caption_reply, pretrain_examples, pretrain_to_hear


@pytest.fixture(scope="module")
def processor():
    return qo.OmniProcessor(build_tokenizer(), tiny_feature_extractor())


def test_examples_describe_each_clip_and_answer_its_question(synthetic_dir, processor):
    examples = pretrain_examples(synthetic_dir / "train.jsonl", processor)
    first = json.loads((synthetic_dir / "train.jsonl").read_text().splitlines()[0])
    assert examples[0]["prompt"] == qo.render_chat(processor.tokenizer, CAPTION_PROMPT)
    assert examples[0]["target"] == caption_reply(first["caption"]) == first["caption"].capitalize() + "." + qo.IM_END
    assert examples[0]["features"].shape[0] == 128
    # the same clip's question, answered in plain words: the record's reasoning, no thinking block
    assert examples[1]["prompt"] == qo.render_prompt(processor.tokenizer, first["question"], first["choices"])
    assert examples[1]["target"] == first["thinking"] + qo.IM_END and "<think>" not in examples[1]["target"]
    assert examples[1]["features"] is examples[0]["features"]
    assert len(examples) == 2 * len((synthetic_dir / "train.jsonl").read_text().splitlines())


def test_a_record_without_caption_is_named(synthetic_dir, processor, tmp_path):
    lines = (synthetic_dir / "train.jsonl").read_text().splitlines()[:2]
    broken = json.loads(lines[1])
    del broken["caption"]
    path = synthetic_dir / "no_caption.jsonl"  # beside the audio it names
    path.write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    try:
        with pytest.raises(DataError, match=rf"no_caption.jsonl:2 \(id={broken['id']}\): caption: missing"):
            pretrain_examples(path, processor)
    finally:
        path.unlink()


def test_pretraining_trains_every_weight_and_lowers_the_loss(synthetic_dir, processor):
    torch.set_num_threads(1)
    model = build_thinker(build_config(processor.tokenizer, layers=1))
    make_audio_tower_responsive(model.audio_tower)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    logs = []
    last = pretrain_to_hear(model, processor, synthetic_dir / "train.jsonl", steps=12, batch_size=4, lr=3e-3, log=logs.append)
    first = float(logs[0].split("loss ")[1].split()[0])
    assert first > 5.0 and last < first - 2.0, logs
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {"audio_tower", "embed_tokens", "lm_head"} <= {part for name in changed for part in name.split(".")}
