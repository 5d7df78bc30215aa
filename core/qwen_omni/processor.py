"""Audio into model inputs: the waveform-to-features rule, audio token counts, and OmniProcessor, which
batches prompts, clips and SFT targets into padded tensors."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.qwen_omni.chat import AUDIO_PAD, eos_token_ids
from core.qwen_omni.checkpoint import checkpoint_source, load_tokenizer
from core.qwen_omni.model import modeling_module

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # the Whisper-style feature extractor's hop: 100 mel frames per second
IGNORE_INDEX = -100


def align_to_hop(audio: np.ndarray) -> np.ndarray:
    """The waveform zero-padded to a whole number of hops (160 samples): the one waveform-to-features rule.

    vLLM pads every clip so before extracting features (its Qwen3-Omni processor, "pad_to_hop_length");
    the stock processor gives a clip inside a padded batch the same ceil(n / 160) frames, alone only
    floor(n / 160). Training and the hf engine pad the same way, so a clip gets the same number of
    audio tokens on every path. Aligned clips come back unchanged (vLLM's padding is then a no-op).
    """
    rest = len(audio) % HOP_LENGTH
    return audio if rest == 0 else np.pad(audio, (0, HOP_LENGTH - rest))


def feature_frames(num_samples: int) -> int:
    """Mel frames of a 16 kHz clip of `num_samples` samples after `align_to_hop` (10 ms hop)."""
    return -(-num_samples // HOP_LENGTH)


@functools.lru_cache(maxsize=1 << 16)  # a pure function of an int that costs a torch call (~0.1 ms); 10^5 records ask it
def audio_token_count(feature_frames: int) -> int:
    """Number of <|audio_pad|> tokens the thinker expects for `feature_frames` mel frames."""
    return int(modeling_module()._get_feat_extract_output_lengths(torch.tensor(feature_frames)))


@dataclass
class OmniProcessor:
    """Tokenizer + Whisper-style feature extractor, expanding the audio placeholder per clip.

    The stock Qwen3OmniMoeProcessor also needs image/video processors (torchvision); audio
    reasoning needs neither, so this does the audio part with the same length rule.
    """

    tokenizer: object
    feature_extractor: object  # transformers.WhisperFeatureExtractor

    @classmethod
    def from_pretrained(cls, path: str | Path, allow_hub: bool = False) -> "OmniProcessor":
        from transformers import WhisperFeatureExtractor

        path = checkpoint_source(path, allow_hub)
        return cls(tokenizer=load_tokenizer(path), feature_extractor=WhisperFeatureExtractor.from_pretrained(str(path)))

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise KeyError(f"tokenizer has no special token {token}")
        return token_id

    @property
    def eos_token_ids(self) -> list[int]:
        return eos_token_ids(self.tokenizer)

    def clip_features(self, audio: np.ndarray) -> np.ndarray:
        """Log-mel features of one clip, `[mel_bins, feature_frames(samples)]` float32 (`align_to_hop` first).

        Each clip is extracted on its own, never inside a padded batch: Whisper's extractor on a
        padded batch gives a clip's last frames (and its frame count) that depend on the other
        clips in the batch, so the same item would look different at batch size 1 and 8. Alone,
        a clip always gets what batch-size-1 inference gives it, and the result can be cached.
        """
        feats = self.feature_extractor(
            align_to_hop(audio), sampling_rate=SAMPLE_RATE, padding=True, truncation=False, return_tensors="np"
        )
        return feats["input_features"][0]

    def audio_features(
        self, audios: Sequence[np.ndarray] | None = None, features: Sequence[np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """Padded batch of features, from waveforms or from per-clip `clip_features` computed earlier
        (e.g. by core.feature_cache); both give identical tensors."""
        if (audios is None) == (features is None):
            raise ValueError("give exactly one of audios and features")
        if features is None:
            features = [self.clip_features(audio) for audio in audios]
        return pad_features(features)

    def expand_audio(self, prompt: str, feature_frames: int) -> str:
        return prompt.replace(AUDIO_PAD, AUDIO_PAD * audio_token_count(feature_frames), 1)

    def expanded_token_count(self, prompt_tokens: int, feature_frames: int) -> int:
        """Tokens of `expand_audio(prompt, feature_frames)` from the prompt's own count, without tokenising
        hundreds of placeholders: the one <|audio_pad|> (a special token, never merged) becomes that many."""
        return prompt_tokens - 1 + audio_token_count(feature_frames)

    def __call__(
        self,
        prompts: Sequence[str],
        audios: Sequence[np.ndarray] | None = None,
        targets: Sequence[str] | None = None,
        padding_side: str = "left",
        features: Sequence[np.ndarray] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch of model inputs from waveforms (`audios`), precomputed per-clip `features`, or
        neither (a text-only batch: prompts rendered with `with_audio=False`).
        With `targets`, adds `labels` that are -100 outside the targets."""
        if audios is not None and features is not None:
            raise ValueError("give audios or features, not both")
        clips = audios if features is None else features
        if (clips is not None and len(prompts) != len(clips)) or (targets is not None and len(targets) != len(prompts)):
            raise ValueError("prompts, audios (or features) and targets must have the same length")
        batch = self.audio_features(audios, features) if clips is not None else {}
        frames = batch["feature_attention_mask"].sum(-1).tolist() if clips is not None else None
        sequences, label_rows = [], []
        for i, prompt in enumerate(prompts):
            text = self.expand_audio(prompt, frames[i]) if frames is not None else prompt
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            labels = [IGNORE_INDEX] * len(ids)
            if targets is not None:
                target_ids = self.tokenizer(targets[i], add_special_tokens=False)["input_ids"]
                ids = ids + target_ids
                labels = labels + target_ids
            sequences.append(ids)
            label_rows.append(labels)
        batch.update(pad_sequences(sequences, label_rows, self.tokenizer.pad_token_id, padding_side))
        if targets is None:
            del batch["labels"]
        return batch


def pad_features(features: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """Right-pad per-clip `[mel_bins, frames]` features into a batch with its frame mask.
    Padded frames hold 0; the thinker reads only the frames the mask keeps."""
    if not features:
        raise ValueError("no audio features to batch")
    width = max(f.shape[-1] for f in features)
    input_features = torch.zeros((len(features), features[0].shape[0], width), dtype=torch.float32)
    mask = torch.zeros((len(features), width), dtype=torch.int32)
    for row, clip in enumerate(features):
        input_features[row, :, : clip.shape[-1]] = torch.from_numpy(np.asarray(clip, dtype=np.float32))
        mask[row, : clip.shape[-1]] = 1
    return {"input_features": input_features, "feature_attention_mask": mask}


def pad_sequences(sequences: list[list[int]], labels: list[list[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(zip(sequences, labels)):
        span = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids)
        label_ids[row, span] = torch.tensor(labs)
        attention[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}
