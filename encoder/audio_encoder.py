"""Qwen3-Omni's audio tower behind the audio-encoder interface of the Audio Encoder Challenge (XARES-LLM).

    encoder = QwenOmniAudioEncoder("path/to/folder")          # or load("path/to/folder")
    features, feature_mask = encoder(audio, audio_attention_mask)

- `audio`: float waveforms `[B, T]`, 16 kHz mono. float16/bfloat16/float64 are cast to float32;
  integer PCM is refused (scale it to [-1, 1] first).
- `audio_attention_mask`: optional `[B, T]`, 1 = keep, 0 = discard (bool or 0/1 numbers). Each clip
  is encoded from its kept samples only, so what lies under a 0 never reaches any output frame.
- `features`: float32 `[B, T', D]`, `D = encoder.output_dim`, `encoder.frame_rate` frames per second
  (13 Hz for Qwen3-Omni); `feature_mask`: int64 `[B, T']`, 1 on the frames each clip really has.

The 128-bin Whisper log-mel of the folder's `preprocessor_config.json` is computed inside, batched,
in float32. `path` is a folder exported by this file (`config.json` of the audio encoder, its
weights, `preprocessor_config.json`, this file as `encoder.py`) or a thinker / full Qwen3-Omni
checkpoint, from which only the audio tower's tensors are read. Without `path` the folder holding
this file is used, so an exported `encoder.py` loads with no arguments, as the XARES-LLM harness
does (`python -m xares_llm.run FOLDER/encoder.py ...`).

This file imports only torch, numpy and transformers (and safetensors, which transformers
requires; peft only when exporting with an adapter): it is copied as is into every exported folder.
Memory: the real tower has ~0.6B parameters, ~1.3 GB in bfloat16 (the default on a GPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import WhisperFeatureExtractor
from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as omni_config
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as omni

SAMPLE_RATE = 16_000
TOWER_MODEL_TYPE = "qwen3_omni_moe_audio_encoder"
TOWER_KEY = "audio_tower."
# Where the tower's tensors live: `thinker.audio_tower.*` in the released (composite) checkpoint and in
# merged ones, `audio_tower.*` in a thinker-only checkpoint.
TOWER_PREFIXES = {"qwen3_omni_moe": "thinker." + TOWER_KEY, "qwen3_omni_moe_thinker": TOWER_KEY}
ENTRY_POINT = "encoder.py"


class QwenOmniAudioEncoder(torch.nn.Module):
    """`forward(audio [B, T], mask [B, T] | None) -> (features [B, T', D], mask [B, T'])`."""

    sampling_rate = SAMPLE_RATE

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        train: bool = False,
    ) -> None:
        """`dtype` defaults to bfloat16 on a GPU, float32 on a CPU. `train=True` leaves the tower
        trainable (the harness passes it for its trainable-encoder track); otherwise it is frozen."""
        super().__init__()
        folder = Path(path) if path is not None else Path(__file__).resolve().parent
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.tower = load_tower(folder, dtype)
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(str(folder))
        fe = self.feature_extractor
        if fe.sampling_rate != SAMPLE_RATE or fe.feature_size != self.tower.config.num_mel_bins:
            raise ValueError(
                f"{folder}/preprocessor_config.json: expected {SAMPLE_RATE} Hz and "
                f"{self.tower.config.num_mel_bins} mel bins, got {fe.sampling_rate} Hz and {fe.feature_size}"
            )
        self.n_fft, self.hop_length = fe.n_fft, fe.hop_length
        self.register_buffer("window", torch.hann_window(fe.n_fft), persistent=False)
        self.register_buffer("mel_filters", torch.from_numpy(np.asarray(fe.mel_filters, np.float32)), persistent=False)
        self.output_dim = int(self.tower.config.output_dim)
        # The tower encodes chunks of 2*n_window mel frames (1 s) into a fixed number of frames.
        chunk = 2 * self.tower.n_window
        self.frame_rate = float(self._tower_frames(torch.tensor([chunk]))[0]) * SAMPLE_RATE / self.hop_length / chunk
        self.min_samples = self.n_fft  # one STFT window; fewer cannot be framed like Whisper does
        self.tower.requires_grad_(train)
        self.train(train)
        self.to(device)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "QwenOmniAudioEncoder":
        return cls(path, **kwargs)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write a self-contained folder: tower weights + config, feature-extractor config, this file."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tower.save_pretrained(str(out))
        self.feature_extractor.save_pretrained(str(out))
        shutil.copyfile(Path(__file__).resolve(), out / ENTRY_POINT)
        return out

    def output_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Output frames for clips of `num_samples` kept samples."""
        return self._tower_frames(num_samples // self.hop_length)

    def _tower_frames(self, mel_frames: torch.Tensor) -> torch.Tensor:
        # The rule the tower itself uses to lay out its packed output.
        return omni._get_feat_extract_output_lengths(mel_frames, self.tower.n_window)

    def forward(
        self, audio: torch.Tensor, audio_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        audio, keep = self._checked(audio, audio_attention_mask)
        clips = list(audio) if keep is None else [wave[kept] for wave, kept in zip(audio, keep)]
        mel, mel_frames = self.log_mel(clips)
        # The tower takes every clip's frames concatenated, [n_mels, sum(frames)], plus their lengths.
        valid = torch.arange(mel.shape[-1], device=mel.device) < mel_frames[:, None]
        packed = mel.transpose(1, 2)[valid].T
        # It cuts clips into 1-s chunks and zero-pads each to the batch's longest chunk before its
        # convolutions, whose biases make that padding reach a chunk's last frames. A silent 1-s clip
        # appended to every batch fixes the padded length at 1 s, so a clip's features never depend
        # on the batch (and equal the thinker's for any batch holding a clip of 1 s or more).
        chunk = 2 * self.tower.n_window
        packed = torch.cat([packed, packed.new_zeros(packed.shape[0], chunk)], dim=1)
        hidden = self.tower(packed, feature_lens=F.pad(mel_frames, (0, 1), value=chunk)).last_hidden_state
        lengths = self._tower_frames(mel_frames)
        if hidden.shape[0] != int(lengths.sum()) + int(self._tower_frames(torch.tensor(chunk))):
            raise RuntimeError(f"audio tower returned {hidden.shape[0]} frames, expected {int(lengths.sum())} + 1 s")
        hidden = hidden[: int(lengths.sum())]
        frame_mask = torch.arange(int(lengths.max()), device=mel.device) < lengths[:, None]
        features = hidden.new_zeros(len(clips), frame_mask.shape[1], self.output_dim, dtype=torch.float32)
        features[frame_mask] = hidden.float()
        return features, frame_mask.long()

    def log_mel(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper log-mel `[B, n_mels, F]` and each clip's frame count, computed from each clip alone.

        Whisper reflect-pads every waveform by n_fft/2 before framing; padding each clip itself
        (not the zero-padded batch) keeps a clip's frames independent of the batch it is in.
        """
        half = self.n_fft // 2
        framed = [F.pad(clip.float()[None], (half, half), mode="reflect")[0] for clip in clips]
        batch = torch.nn.utils.rnn.pad_sequence(framed, batch_first=True)
        mel_frames = torch.tensor([clip.numel() // self.hop_length for clip in clips], device=batch.device)
        stft = torch.stft(
            batch, self.n_fft, self.hop_length, window=self.window.float(), center=False, return_complex=True
        )
        power = stft[..., : int(mel_frames.max())].abs() ** 2  # Whisper drops the last frame
        log_spec = (self.mel_filters.float().T @ power).clamp(min=1e-10).log10()
        valid = torch.arange(log_spec.shape[-1], device=batch.device) < mel_frames[:, None]
        peak = log_spec.masked_fill(~valid[:, None, :], -torch.inf).amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0, mel_frames

    def _checked(self, audio, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(audio, torch.Tensor):
            raise TypeError(f"audio must be a torch.Tensor [B, T], got {type(audio).__name__}")
        if isinstance(mask, (int, float)) and not isinstance(mask, bool):
            raise TypeError(
                f"the second argument is the sample mask [B, T], got the number {mask}; this encoder takes "
                f"{SAMPLE_RATE} Hz mono audio only (resample first)"
            )
        if audio.ndim == 3:
            raise ValueError(
                f"audio must be mono [B, T], got shape {tuple(audio.shape)}, which looks like multi-channel "
                f"[B, C, T] (stereo has C=2): downmix first, e.g. audio.mean(dim=1)"
            )
        if audio.ndim != 2:
            hint = ": add the batch dimension, audio.unsqueeze(0)" if audio.ndim == 1 else ""
            raise ValueError(f"audio must be a 2-D tensor [B, T], got a {audio.ndim}-D tensor of shape {tuple(audio.shape)}{hint}")
        if not audio.is_floating_point():
            raise TypeError(
                f"audio must be a floating-point waveform in [-1, 1], got {audio.dtype}; "
                f"scale integer PCM first, e.g. audio.float() / 32768 for int16"
            )
        if audio.shape[0] == 0:
            raise ValueError("audio holds an empty batch (B = 0)")
        audio = audio.to(self.window.device, torch.float32)
        bad = (~torch.isfinite(audio)).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"audio holds NaN or infinite samples in clip(s) {bad}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"audio_attention_mask must be a torch.Tensor [B, T] or None, got {type(mask).__name__}")
            if mask.shape != audio.shape:
                raise ValueError(
                    f"audio_attention_mask must have the audio's shape {tuple(audio.shape)}, got {tuple(mask.shape)}"
                )
            mask = mask.to(self.window.device)
            if mask.dtype != torch.bool:
                if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
                    raise ValueError("audio_attention_mask values must be 1 (keep) or 0 (discard)")
                mask = mask.bool()
        kept = mask.sum(dim=1) if mask is not None else torch.full((audio.shape[0],), audio.shape[1])
        for index, count in enumerate(kept.tolist()):
            if count < self.min_samples:
                what = "no sample (its mask is all 0)" if count == 0 else f"only {count} samples"
                raise ValueError(
                    f"clip {index} keeps {what}; at least {self.min_samples} "
                    f"({1000 * self.min_samples / SAMPLE_RATE:g} ms at {SAMPLE_RATE} Hz) are needed"
                )
        return audio, mask


def load(path: str | Path | None = None, **kwargs) -> QwenOmniAudioEncoder:
    return QwenOmniAudioEncoder(path, **kwargs)


def load_tower(path: str | Path, dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    """The audio tower from an exported folder, or only its tensors from a thinker / full checkpoint.

    dtype "auto" keeps the dtype the weights are stored in.
    """
    path = Path(path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: pass an exported encoder folder or a Qwen3-Omni checkpoint")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type == TOWER_MODEL_TYPE:
        tower, info = omni.Qwen3OmniMoeAudioEncoder.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    elif model_type in ("qwen3_omni_moe_thinker", "qwen3_omni_moe"):
        audio_config = (config.get("thinker_config") or config)["audio_config"]
        tower_config = omni_config.Qwen3OmniMoeAudioEncoderConfig(**audio_config)
        state = tower_state_dict(path, TOWER_PREFIXES[model_type])
        if dtype == "auto":
            dtype = next(iter(state.values())).dtype
        tower, info = omni.Qwen3OmniMoeAudioEncoder.from_pretrained(
            None, config=tower_config, state_dict=state, dtype=dtype, output_loading_info=True
        )
    else:
        raise ValueError(f"{config_file}: model_type {model_type!r} is neither a Qwen3-Omni checkpoint nor an audio encoder")
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ValueError(
            f"{path}: audio tower weights do not match its config "
            f"(missing {sorted(info['missing_keys'])}, unexpected {sorted(info['unexpected_keys'])})"
        )
    return tower.eval()


def tower_state_dict(checkpoint: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The audio tower's tensors (names relative to the tower): the names under `prefix`, read from
    only the shards that hold them."""
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({shard for name, shard in weight_map.items() if name.startswith(prefix)})
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        with safe_open(str(checkpoint / shard), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith(prefix):
                    state[name[len(prefix):]] = handle.get_tensor(name)
    if not state:
        raise ValueError(f"{checkpoint}: no audio tower tensors (names starting with {prefix!r})")
    return state


def adapter_touches_audio_tower(adapter: str | Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), framework="pt") as handle:
        return any(TOWER_KEY in name for name in handle.keys())


def export(checkpoint: str | Path, out_dir: str | Path, adapter: str | Path | None = None) -> QwenOmniAudioEncoder:
    """Export the audio tower of `checkpoint` (+ LoRA `adapter`) as a self-contained encoder folder.

    Weights keep the checkpoint's dtype. Only an adapter with LoRA in the audio tower changes the
    encoder: then the whole thinker is loaded on the CPU in that dtype (~62 GB of RAM for the real
    model in bfloat16), the adapter merged with peft's `merge_and_unload` and its tower kept.
    """
    # On the CPU: export copies tensors, it never runs the tower.
    encoder = QwenOmniAudioEncoder(checkpoint, device="cpu", dtype="auto")
    if adapter is not None and adapter_touches_audio_tower(adapter):
        from peft import PeftModel

        thinker = omni.Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(str(checkpoint), dtype="auto")
        encoder.tower = PeftModel.from_pretrained(thinker, str(adapter)).merge_and_unload().audio_tower.eval()
        print(f"merged the LoRA adapter {adapter} into the audio tower")
    elif adapter is not None:
        print(f"the adapter {adapter} has no LoRA in the audio tower: exporting the checkpoint's encoder")
    encoder.save_pretrained(out_dir)
    return encoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export the Qwen3-Omni audio tower as a self-contained encoder folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("export", help="write weights, configs and encoder.py to --out")
    command.add_argument("--checkpoint", required=True, help="thinker or full Qwen3-Omni checkpoint (base or merged)")
    command.add_argument("--adapter", default=None, help="LoRA adapter folder to merge first (matters only if it touches the audio tower)")
    command.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    encoder = export(args.checkpoint, args.out, args.adapter)
    out = args.out
    params = sum(p.numel() for p in encoder.tower.parameters())
    print(
        f"audio encoder written to {out}: {params / 1e6:.2f}M parameters, output_dim {encoder.output_dim}, "
        f"{encoder.frame_rate:g} frames/s; load it with QwenOmniAudioEncoder('{out}') or {out}/{ENTRY_POINT}"
    )


if __name__ == "__main__":
    main()
