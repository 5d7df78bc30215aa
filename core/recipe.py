"""Recipes: typed, validated configuration loaded from YAML with dotted command-line overrides.

    recipe = load_recipe("recipes/tiny.yaml", ["train.lr=2e-5", "lora.r=8"])

Unknown keys and wrong types raise `RecipeError` naming the key's dotted path. Every run writes
its resolved recipe beside its outputs (`save_recipe`), so a result can always be traced back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the file and each bad key."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping: PyYAML keeps the last without a
    word, so a section written twice would silently drop the first (epochs 6 -> 1)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may repeat what it overrides
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise RecipeError(f"{key_node.start_mark.name}: key {key!r} written twice (lines {first[key]} and "
                                      f"{line}): YAML would keep only the last; merge them into one")
                first[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML config text with UniqueKeyLoader; a syntax error or a repeated key is a RecipeError naming `source`."""
    loader = UniqueKeyLoader(text)
    loader.name = source  # the marks of every node name the file
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


class NoEffect:
    """Tags a setting that does not change what a run computes or writes, only where it writes, how fast it
    runs or how it reports: `log_every: Annotated[int, NoEffect] = Field(1, gt=0)`. Every other setting changes results,
    and a run that holds results may only be resumed with the values that made them (`result_keys`)."""


class Section(BaseModel):
    # a string literal under a field is its description: the one place a key is documented
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    path: str = "artifacts/tiny-omni"
    """local checkpoint folder (thinker-only or full Qwen3-Omni)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weights dtype; auto: the checkpoint's (bf16 for Qwen3-Omni)"""
    attn_implementation: Annotated[Literal["sdpa", "eager", "flash_attention_2"] | None, NoEffect] = None
    """attention kernel; None: transformers' default (sdpa)"""
    experts_implementation: Annotated[Literal["eager", "grouped_mm", "batched_mm"] | None, NoEffect] = None
    """MoE experts: grouped GEMM, batched GEMM or the per-expert loop; None: transformers' default (grouped_mm)"""
    prompt_style: Literal["baseline", "qwen"] = "baseline"
    """baseline: the challenge's system prompt; qwen: no system prompt, Qwen's advice"""
    allow_hub: Annotated[bool, NoEffect] = False
    """let a model.path that is no local folder be fetched from the Hugging Face hub"""


class DatasetSpec(Section):
    path: str
    """MMAR-schema or SFT JSONL"""
    audio_root: str | None = None
    """folder that `audio_path` is relative to; default: the JSONL's folder"""
    weight: float = Field(1.0, gt=0)
    """mixing ratio relative to the other datasets"""
    max_samples: int | None = Field(None, gt=0)
    """a seeded random subset of at most this many of the file's samples, in file order; None: all"""


class DataConfig(Section):
    train: list[DatasetSpec] = Field(default_factory=list)
    """training datasets: [{path, audio_root, weight, max_samples}]"""
    max_audio_seconds: float | None = Field(None, gt=0)
    """the one long-clip rule of the Cogito-Pipe and training: collect drops longer clips (too_long), qa, cot
    and training cut to it; None: whole clips everywhere (as the stock processor, truncation=False)"""
    max_length: int = Field(4096, gt=0)
    """tokens; longer samples are dropped and counted"""
    num_workers: Annotated[int, NoEffect] = Field(0, ge=0)
    """DataLoader worker processes (same batches as 0)"""
    feature_cache: Annotated[str | None, NoEffect] = None
    """folder of core.feature_cache: per-clip features computed once, read every epoch; None: from the waveforms"""
    # the same rows wherever the cache lives and however many build it: it is keyed by what they depend on and
    # keeps file order (train/data_cache.py)
    cache: Annotated[str | None, NoEffect] = None
    """folder of the training-data cache (train/data_cache.py: records rendered, tokenised and measured once,
    memory-mapped by every rank); None: `train.output_dir`/data_cache"""
    cache_workers: Annotated[int | None, NoEffect] = Field(None, gt=0)
    """processes that build it; None: every CPU this process may use"""


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    """LoRA rank"""
    alpha: int = Field(32, gt=0)
    """LoRA scaling numerator (scale = alpha / r)"""
    dropout: float = Field(0.05, ge=0, lt=1)
    """dropout on the LoRA input"""
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """module names adapted (exact text-attention names; lm_head allowed)"""
    experts: bool = False
    """also adapt the fused MoE experts (target_parameters)"""
    include_audio_tower: bool = False
    """allow targets inside the audio tower (frozen otherwise)"""

    @model_validator(mode="after")
    def _no_dropout_on_experts(self) -> "LoraConfig":
        if self.experts and self.dropout:
            raise ValueError("lora.experts=true needs lora.dropout=0: peft cannot apply dropout to fused expert parameters")
        return self


class TrainConfig(Section):
    output_dir: Annotated[str, NoEffect] = "runs/tiny"
    """recipe, metrics, checkpoints and the adapter go here"""
    seed: int = 42
    """data order, LoRA init and dropout"""
    epochs: float = Field(1.0, gt=0)
    """passes over the data (whole optimizer steps only)"""
    max_steps: int | None = Field(None, gt=0)
    """overrides epochs when set"""
    lr: float = Field(1e-5, gt=0)
    """peak learning rate (AdamW)"""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """the schedule decays to lr x this"""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warmup"""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """share of the steps with linear warmup"""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay"""
    batch_size: int = Field(1, gt=0)
    """per device"""
    grad_accum: int = Field(1, gt=0)
    """micro-batches per optimizer step"""
    max_grad_norm: float = Field(1.0, gt=0)
    """gradient clipping"""
    max_nonfinite_steps: Annotated[int, NoEffect] = Field(0, ge=0)
    """steps with a non-finite loss or gradient norm that are skipped (no update, counted) before training stops with
    an error; 0: stop at the first. Not with DeepSpeed, whose engine steps inside backward."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Accelerate mixed precision"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, ~13% slower"""
    zero_stage: Literal[0, 2, 3] | None = None
    """ZeRO stage the recipe is planned for (python -m train.memory); both trainers refuse a launch with another one.
    None: whatever the accelerate config gives."""
    # the same loss and gradients as the model's own (train/loss.py)
    loss_chunk_tokens: Annotated[int | None, NoEffect] = Field(None, gt=0)
    """Cross-entropy over this many target tokens at a time, each chunk's logits recomputed in backward
    (train/loss.py): the full-vocabulary fp32 logits of long samples never exist at once. None: the model's own loss
    over all positions."""
    group_by_length: bool = True
    """batches of similar length (less padding)"""
    save_every: Annotated[int, NoEffect] = Field(100, gt=0)
    """optimizer steps"""
    keep_last: Annotated[int, NoEffect] = Field(2, gt=0)
    """checkpoints kept (older ones deleted)"""
    resume: Annotated[bool, NoEffect] = True
    """pick up the latest checkpoint in output_dir"""
    stop_after: Annotated[int | None, NoEffect] = Field(None, gt=0)
    """stop (with a checkpoint) after this step; the schedule is unchanged"""
    init_adapter: str | None = None
    """SFT: the LoRA adapter folder to go on training (the self-improvement loop's previous iteration); None: a
    fresh one from `lora`"""
    log_every: Annotated[int, NoEffect] = Field(1, gt=0)
    """optimizer steps between metrics lines"""
    report_to: Annotated[Literal["none", "wandb", "tensorboard"], NoEffect] = "none"
    """experiment tracker besides metrics.jsonl"""
    wandb_project: Annotated[str, NoEffect] = "audio-reasoning"
    """wandb project name"""


class SelfConsistencyConfig(Section):
    """Self-consistency: n sampled chains per item, a vote on their answers, one chain submitted (docs/infer.md)."""

    n: int = Field(8, gt=1)
    """chains sampled per item, in one engine call"""
    temperature: float = Field(0.6, gt=0)
    """the chains' sampling temperature (Qwen's thinking default)"""
    top_p: float = Field(0.95, gt=0, le=1)
    """the chains' nucleus"""
    top_k: int = Field(20, ge=0)
    """the chains' top-k; 0: off"""
    selection: Literal["consensus", "first"] = "consensus"
    """which chain of the winning answer is submitted: consensus, the one whose thinking shares the most words with
    the other winning chains (mean Jaccard); first, the lowest-numbered one"""


class MataConfig(Section):
    """Audio-attention boost (MATA, arXiv 2509.18816): hf engine only (docs/infer.md)."""

    layers: list[int] = Field(min_length=1)
    """decoder layers (0-based) whose last query token is boosted; the paper takes middle layers"""
    strength: float = Field(gt=0)
    """factor on that token's attention to the clip's audio tokens, relative to every other key"""


class InferConfig(Section):
    backend: Literal["hf", "vllm"] = "hf"
    """hf: transformers; vllm: GPUs"""
    meta: str = "artifacts/synthetic/test.jsonl"
    """benchmark metadata JSONL (MMAR schema)"""
    audio_root: Annotated[str | None, NoEffect] = None
    """folder audio_path is relative to; default: the metadata's folder"""
    output: Annotated[str, NoEffect] = "runs/tiny/submission.jsonl"
    """the submission JSONL; its sidecars are written beside it"""
    adapter: str | None = None
    """LoRA adapter folder applied on top of model.path (hf backend)"""
    # greedy answers do not depend on it (tests/test_engine.py); sampled ones already depend on where a resume
    # cut the batches
    batch_size: Annotated[int, NoEffect] = Field(8, gt=0)
    """requests per generate call"""
    max_new_tokens: int = Field(16384, gt=0)
    """generation budget (thinking + answer)"""
    min_new_tokens: int = Field(0, ge=0)
    """>0 suppresses end-of-turn until then (benchmarks, tests)"""
    thinking_budget: int | None = Field(2000, gt=0)
    r"""Thinking tokens before "\n</think>\n\n" is appended and the model goes on to its answer (null: no budget). 2,000
    = the 10,000-character thinking limit / 5 characters per token, a high figure for English under Qwen's tokenizer
    (~4 on average), so a budgeted thinking ends near 8,000."""
    do_sample: bool | None = None
    """None: from the checkpoint's generation config"""
    temperature: float | None = Field(None, ge=0)
    """None: from the checkpoint's generation config"""
    top_p: float | None = Field(None, gt=0, le=1)
    """None: from the checkpoint's generation config"""
    top_k: int | None = Field(None, ge=0)
    """None: from the checkpoint's generation config; 0: off"""
    seed: int = 0
    """sampling seed"""
    limit: Annotated[int | None, NoEffect] = Field(None, gt=0)
    """first N items only"""
    fail_fast: Annotated[bool, NoEffect] = False
    """stop at the first unreadable clip or over-long prompt; false: list them, record them as failed, answer the
    rest"""
    tensor_parallel_size: Annotated[int, NoEffect] = Field(1, gt=0)
    """vllm"""
    data_parallel_size: Annotated[int, NoEffect] = Field(1, gt=0)
    """worker processes, each on its own tensor_parallel_size GPUs"""
    data_parallel_rank: Annotated[int | None, NoEffect] = Field(None, ge=0)
    """set by `infer run` for its workers, not by hand"""
    gpu_memory_utilization: Annotated[float, NoEffect] = Field(0.9, gt=0, le=1)
    """vllm"""
    # changes answers where it binds: vLLM ends a generation at the context, and a longer prompt fails
    max_model_len: int | None = Field(None, gt=0)
    """vllm; None: the checkpoint's"""
    max_audio_seconds: float | None = Field(None, gt=0)
    """Inference hears whole clips, as the stock processor and vLLM take them (MMAR has clips over 30 s); a number cuts
    every clip to that many seconds. data.max_audio_seconds applies to training only."""
    limit_mm_per_prompt: Annotated[dict[Literal["audio", "image", "video"], int], NoEffect] = Field(
        default_factory=lambda: {"audio": 1, "image": 0, "video": 0})
    """vllm: clips per prompt; image and video 0 so vLLM neither loads nor profiles the vision tower"""
    kv_cache_gib: Annotated[float | None, NoEffect] = Field(None, gt=0)
    """vllm: KV-cache size in GiB. Needed on a CPU, where vLLM otherwise takes gpu_memory_utilization of the machine's
    RAM; None on GPUs (vLLM sizes the cache from gpu_memory_utilization)."""
    enforce_eager: Annotated[bool, NoEffect] = False
    """vllm: skip torch.compile (and CUDA graphs); minutes less to load on a CPU"""
    self_consistency: SelfConsistencyConfig | None = None
    """None: one chain per item under the sampling above; set: n sampled chains and a vote. Opt-in: whether a vote
    is a "separate controller" under Track 1 is not settled, and the audit's compliance report states it was on"""
    mata: MataConfig | None = None
    """None: off; set: the audio-attention boost on the hf engine (vLLM refuses it)"""
    audio_ablation: Literal["none", "silence", "swap"] = "none"
    """audio reliance (infer/ablation.py): none: each item's own clip; silence: zeros of the same length; swap: the
    clip of another item of infer.meta (a derangement fixed by infer.seed). `python -m eval reliance` compares runs."""


class JudgeConfig(Section):
    backend: Literal["openai", "local", "none"] = "none"
    """none: Accuracy only, Rubrics not computed"""
    model: str = "gpt-4o-2024-11-20"
    """endpoint model name; for backend local, the checkpoint folder"""
    base_url: str = "https://api.openai.com/v1"
    """any OpenAI-compatible server (e.g. vLLM)"""
    # the judge's key, pacing and reply cache: not the ratings
    api_key_env: Annotated[str, NoEffect] = "OPENAI_API_KEY"
    """name of the environment variable holding the key"""
    temperature: float = 0.0
    """judge sampling temperature (official: 0)"""
    seed: int | None = 42
    """judge seed (official: 42)"""
    max_tokens: int | None = None
    """openai: not sent when None (as officially); local: default 1024"""
    ratings: int = Field(5, gt=0)
    """ratings per item; the middle 3 are averaged"""
    max_attempts: int = Field(20, gt=0)
    """requests per rating until a reply parses (official: 20)"""
    concurrency: Annotated[int, NoEffect] = Field(8, gt=0)
    """requests in flight"""
    requests_per_minute: Annotated[float | None, NoEffect] = Field(None, gt=0)
    """rate limit; None: none"""
    timeout_s: Annotated[float, NoEffect] = Field(120.0, gt=0)
    """total time for one judge request (connect, send, the whole reply), not per socket read"""
    backoff_s: Annotated[float, NoEffect] = Field(1.0, ge=0)
    """first pause after 429/5xx/timeout, doubling up to backoff_max_s"""
    backoff_max_s: Annotated[float, NoEffect] = Field(60.0, ge=0)
    """longest pause between retries"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """local backend"""
    device: str | None = None
    """local backend"""
    cache: Annotated[str, NoEffect] = "runs/judge_cache.sqlite"
    """SQLite cache of parsed replies (resume, no repeated calls)"""


class SuiteBenchmark(Section):
    """One benchmark of a suite (`python -m eval suite`; adapters in eval/benchmarks.py)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """its label and the folder of its run under suite.out_dir"""
    kind: Literal["mmar", "mmau", "mmau-pro", "mmsu"]
    """the metadata schema and scoring rule: mmau also reads the test set (answers withheld: submission file only)"""
    meta: str
    """the released metadata file (MMAU: the JSON list; MMAU-Pro: test.parquet's rows as JSONL; MMSU and MMAR: JSONL)"""
    audio_root: str | None = None
    """folder the records' audio paths are relative to; default: the metadata's folder"""
    limit: int | None = Field(None, gt=0)
    """answer only the first N items it can score"""


class SuiteConfig(Section):
    """Several benchmarks answered and scored by one command (`python -m eval suite RECIPE`)."""

    out_dir: Annotated[str, NoEffect] = "runs/tiny/suite"
    """per benchmark a folder (items.jsonl, the submission and its sidecars), and suite.json / suite.md"""
    benchmarks: list[SuiteBenchmark] = Field(default_factory=list)
    """answered in order with the recipe's model and infer settings"""
    bootstrap: int = Field(1000, ge=0)
    """resamples of each accuracy's 95% interval"""


class EvalConfig(Section):
    meta: str = "artifacts/synthetic/test.jsonl"
    """benchmark metadata JSONL with answers and rubrics"""
    submission: str = "runs/tiny/submission.jsonl"
    """the submission to score"""
    report_dir: str = "runs/tiny/eval"
    """report.md, report.json and charts go here"""
    bootstrap: int = Field(1000, ge=0)
    """resamples for the 95% confidence intervals (0: none)"""
    bootstrap_seed: int = 0
    """seed of the bootstrap resampling"""
    charts: bool = True
    """write the per-modality/category PNG charts"""
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    """the Rubrics judge"""


class SourceSpec(Section):
    """One raw dataset of the Cogito-Pipe mixture: an adapter name (data_prep.sources) and its local copy."""

    name: str
    """adapter name, e.g. clotho, audioset, synthetic"""
    root: str
    """folder holding the dataset's official release layout (see the adapter's docstring)"""
    count: int | None = Field(None, gt=0)
    """exactly this many clips (all of them if fewer exist)"""
    ratio: float | None = Field(None, gt=0, le=1)
    """this share of data_prep.total"""
    reference_samples: int | None = Field(None, gt=0)
    """The dataset's sample count in the mixture a recipe reproduces (e.g. Audio-Cogito Table 1); selects nothing, the
    data card shows it beside the achieved share."""
    options: dict[str, Any] = Field(default_factory=dict)
    """adapter keyword arguments (splits, subset, ...)"""
    licence: str | None = None
    """overrides the adapter's licence in the manifest and the data card"""

    @model_validator(mode="after")
    def _count_or_ratio(self) -> "SourceSpec":
        if self.count is not None and self.ratio is not None:
            raise ValueError(f"source {self.name}: give count or ratio, not both")
        return self


class PrepGeneration(Section):
    """How one Cogito-Pipe stage decodes; `batch_size` requests are generated and journaled together."""

    max_new_tokens: int = Field(1024, gt=0)
    """generation budget"""
    min_new_tokens: int = Field(0, ge=0)
    """>0 suppresses end-of-turn until then"""
    do_sample: bool = False
    """false: greedy"""
    temperature: float = Field(1.0, gt=0)
    """sampling temperature"""
    top_p: float = Field(1.0, gt=0, le=1)
    """nucleus sampling"""
    top_k: int = Field(0, ge=0)
    """0: off"""
    seed: int = 0
    """sampling seed"""
    batch_size: int = Field(8, gt=0)
    """requests per engine call and per journal flush"""


class PrepQAConfig(PrepGeneration):
    """Stage 2: an instruction model writes multiple-choice questions about each clip."""

    model: str = "checkpoints/Qwen3-Omni-30B-A3B-Instruct"
    """the instruction model that writes the questions"""
    prompt: str = "data_prep/prompts/qa.txt"
    """prompt template file"""
    n_shots: int = Field(20, ge=0)
    """few-shot questions drawn from data_prep.seed_questions per clip"""
    max_questions: int = Field(3, ge=1)
    """per clip; a reply with more is malformed"""
    max_attempts: int = Field(3, ge=1)
    """a malformed reply is retried with other shots and seed, then dropped"""
    shuffle_choices: bool = True
    """seeded shuffle: the answer's position carries no signal"""
    do_sample: bool = True
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(20, ge=0)


class PrepCoTConfig(PrepGeneration):
    """Stage 3: the Thinking model (model.path) answers with the inference prompt (model.prompt_style)."""

    max_new_tokens: int = Field(4096, gt=0)
    """~10,000 characters of thinking, the submission limit"""
    do_sample: bool = True
    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=0)


class PrepJudgeConfig(PrepGeneration):
    """Stage 4: a text-only judge checks each reasoning for hallucination and logic."""

    model: str = "checkpoints/Qwen3-Omni-30B-A3B-Instruct"
    """the text-only judge model"""
    prompt: str = "data_prep/prompts/judge.txt"
    """prompt template file"""
    max_new_tokens: int = Field(512, gt=0)


class DataPrepConfig(Section):
    work_dir: str = "runs/tiny/data_prep"
    """every stage's output, parts, report and the data card"""
    seed: int = 0
    """mixture sampling (and later stages' few-shot sampling)"""
    total: int | None = Field(None, gt=0)
    """clips in the mixture; sources with a ratio share it"""
    sources: list[SourceSpec] = Field(default_factory=list)
    """raw datasets of the mixture: [{name, root, count | ratio, options, licence}]"""
    shard: str = Field("0/1", pattern=r"^\d+/[1-9]\d*$")
    '''"i/n": this process handles shard i of n'''
    min_seconds: float = Field(0.5, ge=0)
    """shorter clips are rejected (too_short); the longest clip is `data.max_audio_seconds`"""
    shortfall: Literal["report", "redistribute", "error"] = "report"
    """a ratio source with fewer clips than its share: report it; redistribute the missing clips over the ratio
    sources of the same domain (the adapter's) in proportion to their ratios; or stop collect"""
    licences: list[str] | None = None
    """accepted licence ids (SPDX, or the named ids of data_prep.sources.NAMED_LICENCES); a clip whose licence
    maps to no id or to one not listed stops collect (see `unaccepted`); None: no licence gate"""
    unaccepted: Literal["error", "drop"] = "error"
    """clips failing the licence gate: stop collect with counts per source and licence, or drop and count them"""
    max_bad_rows: int = Field(100, ge=0)
    """bad metadata rows (unparsable, truncated, undecodable) counted and skipped per source; one more stops collect"""
    mmar_meta: str | None = None
    """benchmark metadata for the contamination guard"""
    mmar_audio_root: str | None = None
    """the benchmark audio, when present: enables the audio-hash guard"""
    seed_questions: str = "data_prep/seed_questions.jsonl"
    """few-shot question pool of the QA stage"""
    qa: PrepQAConfig = Field(default_factory=PrepQAConfig)
    """stage 2: the questions"""
    cot: PrepCoTConfig = Field(default_factory=PrepCoTConfig)
    """stage 3: the reasonings"""
    judge: PrepJudgeConfig = Field(default_factory=PrepJudgeConfig)
    """stage 4: the reasoning check"""

    @model_validator(mode="after")
    def _valid_mixture(self) -> "DataPrepConfig":
        index, count = (int(x) for x in self.shard.split("/"))
        if index >= count:
            raise ValueError(f"shard {self.shard}: index must be below the shard count")
        if any(s.ratio is not None for s in self.sources) and self.total is None:
            raise ValueError("a source with a ratio needs data_prep.total")
        ratios = sum(s.ratio or 0 for s in self.sources)
        if ratios > 1 + 1e-9:
            raise ValueError(f"source ratios add up to {ratios:.4g} > 1")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"a source is listed twice in {names} (ids are prefixed by the source name)")
        return self


RewardName = Literal["answer", "format", "length", "judge", "embedding"]  # train/rewards.py


class GRPOStage(Section):
    """One curriculum stage of train/grpo.py: its prompts, its length and its reward weights."""

    name: str
    """shown in the logs and metrics.jsonl"""
    data: list[DatasetSpec] = Field(min_length=1)
    """MMAR-schema JSONL; `thinking` needed by judge/embedding rewards"""
    steps: int = Field(gt=0)
    """rollout steps (each: rollouts, rewards, grpo.iterations optimizer steps)"""
    rewards: dict[RewardName, float] = Field(default_factory=lambda: {"answer": 1.0, "format": 0.2})
    """weight per reward (train/rewards.py); the weighted sum is the reward the advantages are made of"""

    @model_validator(mode="after")
    def _some_reward(self) -> "GRPOStage":
        if not any(self.rewards.values()):
            raise ValueError(f"stage {self.name}: every reward weight is 0")
        return self


class GRPORolloutVLLM(Section):
    """The vLLM engine GRPO rolls out with (grpo.rollout_engine=vllm): one per rank, beside the trainer
    (docs/grpo.md: why a memory fraction and not sleep mode)."""

    gpu_memory_utilization: Annotated[float, NoEffect] = Field(0.35, gt=0, lt=1)
    """share of each GPU vLLM takes for its weights and KV cache; the trainer lives in the rest (train/memory.py)"""
    tensor_parallel_size: Annotated[int, NoEffect] = Field(1, gt=0)
    """GPUs one rollout engine spans (train/memory.py divides its weights by it)"""
    kv_cache_gib: Annotated[float | None, NoEffect] = Field(None, gt=0)
    """KV-cache size in GiB; needed on a CPU, where vLLM otherwise takes gpu_memory_utilization of the machine's RAM"""
    # changes rollouts where it binds: vLLM ends a generation at the context
    max_model_len: int | None = Field(None, gt=0)
    """prompt + completion tokens; None: the checkpoint's context"""
    enforce_eager: Annotated[bool, NoEffect] = False
    """no torch.compile / CUDA graphs (minutes of compilation on a CPU for nothing on the tiny model)"""


class GRPOConfig(Section):
    """RL after SFT (train/grpo.py): G sampled completions per prompt, group-normalised advantages,
    clipped ratio, optional KL to the policy it starts from (the SFT adapter, or the base for a fresh one)."""

    init_adapter: str | None = None
    """LoRA adapter to start from (the SFT run's); None: a fresh one from `lora`"""
    num_generations: int = Field(8, ge=2)
    """G completions per prompt"""
    max_new_tokens: int = Field(4096, gt=0)
    """per rollout; a completion cut here scores 0 on length"""
    temperature: float = Field(1.0, gt=0)
    """rollout sampling; log-probabilities are scored at it too"""
    top_p: float = Field(1.0, gt=0, le=1)
    """rollout sampling (1: off)"""
    top_k: int = Field(0, ge=0)
    """rollout sampling (0: off)"""
    rollout_batch_size: int = Field(16, gt=0)
    """sequences per generate() call"""
    clip_low: float = Field(0.2, ge=0, lt=1)
    """ratio clipped to [1 - clip_low, 1 + clip_high]"""
    clip_high: float = Field(0.2, ge=0)
    """upper clip; above clip_low keeps exploring (DAPO's clip-higher)"""
    beta: float = Field(0.0, ge=0)
    """KL(policy || starting policy) coefficient; 0: no reference forward"""
    iterations: int = Field(1, ge=1)
    """optimizer steps on each batch of rollouts (PPO epochs)"""
    scale_rewards: Literal["group", "none"] = "group"
    """divide by the group's std, or only centre"""
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    """token losses to the batch loss (train.loss.Normalisation): dapo, the sum over every completion token of the
    global batch / its tokens; grpo, each completion's token mean, then the mean over completions; dr_grpo, the sum /
    (completions x max_new_tokens)"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """the clipped ratio per token (GRPO), or per completion (GSPO: exp of the mean token log-ratio, one clip for the
    completion), which the Qwen team found stable on MoE models without routing replay"""
    rollout_engine: Literal["hf", "vllm"] = "hf"
    """what samples the rollouts: hf generate on the policy being trained, or a vLLM engine beside the trainer whose
    weights are the policy's (the adapter merged in, pushed after every optimizer step)"""
    rollout_logprobs: Literal["recompute", "tis"] = "recompute"
    """with vLLM rollouts: recompute, the trainer's own log-probs are the old policy's and vLLM's are only compared
    (metrics: logprob_mismatch); tis, the policy term of each token is also weighted by
    min(p_trainer / p_vllm, tis_cap) (truncated importance sampling) for tokens the engine sampled off the policy"""
    tis_cap: float = Field(2.0, ge=1)
    """upper bound of the truncated importance weight (rollout_logprobs=tis)"""
    vllm: GRPORolloutVLLM = Field(default_factory=GRPORolloutVLLM)
    """the rollout engine's settings (rollout_engine=vllm)"""
    embedding_model: str | None = None
    """local sentence-embedding folder (transformers; mean pooling)"""
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    """the reasoning judge of the `judge` reward"""
    stages: list[GRPOStage] = Field(default_factory=list)
    """the curriculum, run in order"""
    reliance_every: Annotated[int | None, NoEffect] = Field(None, gt=0)
    """every N steps, greedy answers to the first `reliance_items` of infer.meta (held out) with their clips and with
    silence of the same length, logged as reliance/* in metrics.jsonl (train/reliance_probe.py); None: off"""
    reliance_items: Annotated[int, NoEffect] = Field(16, gt=0)
    """held-out items the reliance probe answers"""

    @model_validator(mode="after")
    def _rewards_have_their_models(self) -> "GRPOConfig":
        for stage in self.stages:
            if stage.rewards.get("judge") and self.judge.backend == "none":
                raise ValueError(f"stage {stage.name}: the judge reward needs grpo.judge.backend openai or local")
            if stage.rewards.get("embedding") and not self.embedding_model:
                raise ValueError(f"stage {stage.name}: the embedding reward needs grpo.embedding_model")
        return self


class RestConfig(Section):
    """The self-improvement loop (train/rest.py, ReST): per iteration, K sampled completions of every item, scored by
    the official answer rule; correct ones selected by their item's pass rate; SFT on them from the previous adapter."""

    output_dir: Annotated[str, NoEffect] = "runs/rest"
    """every iteration's samples, pass rates, histogram, selection, SFT data and adapter go here (iter-N/)"""
    items: list[DatasetSpec] = Field(default_factory=list)
    """MMAR-schema JSONL sampled each iteration; empty: data.train"""
    max_items: int | None = Field(None, gt=0)
    """a seeded random subset of at most this many items (the same every iteration); None: all"""
    init_adapter: str | None = None
    """the adapter the first iteration samples with and trains on (the SFT run's); None: the base model"""
    train_from: Literal["previous", "base"] = "previous"
    """each iteration's SFT goes on from the adapter it sampled with, or starts a fresh one on the base"""
    lrs: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [2e-5, 1e-5, 5e-6], min_length=1)
    """one SFT learning rate per iteration: the number of iterations"""
    epochs: float | None = Field(None, gt=0)
    """SFT passes over each iteration's selection; None: train.epochs"""
    samples: int = Field(8, ge=1)
    """K completions per item"""
    temperature: float = Field(0.9, gt=0)
    """sampling temperature"""
    top_p: float = Field(1.0, gt=0, le=1)
    """sampling top-p (1: off)"""
    max_new_tokens: int = Field(4096, gt=0)
    """per completion"""
    batch_size: int = Field(16, gt=0)
    """sequences per generate() call"""
    chunk_items: int = Field(64, gt=0)
    """items per sampling chunk: each chunk's samples are one file, written whole, the unit a resumed loop redoes (its
    seed is one per chunk: another size samples other completions)"""
    seed: int = 0
    """item subset, sampling seeds (one per iteration and chunk), the all-correct fraction"""
    selection: Literal["learning_zone", "all_correct", "shortest_k"] = "learning_zone"
    """learning_zone: by pass-rate band (train/rest.py); all_correct: every correct sample; shortest_k: the k shortest
    correct samples of every item with one"""
    shortest_k: int = Field(3, ge=1)
    """correct samples kept per item by shortest_k, and by the learning zone's middle band"""
    all_correct_fraction: float = Field(0.0, ge=0, le=1)
    """learning zone: the share of the top band's items (15-16 of 16, scaled) kept, one sample each at weight 0.5"""
    launch_config: Annotated[str | None, NoEffect] = None
    """Accelerate config each iteration's SFT is launched with (train/sft.py, as `make train`); None: one process"""
    final_histogram: Annotated[bool, NoEffect] = True
    """after the last iteration, sample and score once more with its adapter: its pass-rate histogram"""


class Recipe(Section):
    name: str = "unnamed"
    """the run's name (trackers, reports)"""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """the checkpoint and its prompt"""
    data: DataConfig = Field(default_factory=DataConfig)
    """SFT data"""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """the adapter trained"""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """SFT (train/sft.py), and the optimizer and run folder of GRPO"""
    infer: InferConfig = Field(default_factory=InferConfig)
    """benchmark answers (python -m infer run)"""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """scoring a submission (python -m eval score)"""
    data_prep: DataPrepConfig = Field(default_factory=DataPrepConfig)
    """the Cogito-Pipe data pipeline (python -m data_prep)"""
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    """RL after SFT (train/grpo.py)"""
    suite: SuiteConfig = Field(default_factory=SuiteConfig)
    """benchmarks beside MMAR, answered and scored by `python -m eval suite`"""
    rest: RestConfig = Field(default_factory=RestConfig)
    """the self-improvement loop (train/rest.py)"""

    @model_validator(mode="after")
    def _length_reward_has_a_budget(self) -> "Recipe":
        if any(stage.rewards.get("length") for stage in self.grpo.stages) and self.infer.thinking_budget is None:
            raise ValueError("the GRPO length reward scores against infer.thinking_budget, which is null")
        return self

    @model_validator(mode="after")
    def _precision_matches_dtype(self) -> "Recipe":
        if self.train.mixed_precision == "bf16" and self.model.dtype in ("float16",):
            raise ValueError("train.mixed_precision=bf16 needs model.dtype bfloat16, float32 or auto")
        return self


def apply_override(tree: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r} is not of the form dotted.key=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {override!r}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = load_yaml(raw, f"override {override!r}")


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid recipe"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def recipe_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(_format_errors(source, err)) from None


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe (or the defaults when `path` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise RecipeError(f"{source}: recipe file not found") from None
        tree = load_yaml(text, source) or {}
        if not isinstance(tree, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping of sections")
    for override in overrides:
        apply_override(tree, override)
    return recipe_from_dict(tree, source + (f" with overrides {list(overrides)}" if overrides else ""))


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe (defaults filled in) as YAML."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return out


def _lookup(tree: dict, key: str, default: Any = None) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every leaf of a nested dict as a dotted key (lists are leaves)."""
    keys = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        keys += dotted_keys(value, key + ".") if isinstance(value, dict) else [key]
    return keys


def changed_settings(saved: str | Path, recipe: Recipe, keys: list[str]) -> list[str]:
    """`key: saved -> now` for each of `keys` whose value in `recipe` differs from the resolved recipe saved
    at `saved` (a key the saved file lacks counts as its default: it was written by an older version)."""
    tree = load_yaml(Path(saved).read_text(), str(saved)) or {}
    defaults, now = Recipe().model_dump(mode="json"), recipe.model_dump(mode="json")
    changed = []
    for key in keys:
        old, new = _lookup(tree, key, _lookup(defaults, key)), _lookup(now, key)
        if old != new:
            changed.append(f"{key}: {old!r} -> {new!r}")
    return changed


def changes_results(recipe: Recipe, key: str) -> bool:
    """Whether the setting at dotted `key` changes results: no field on its path is tagged NoEffect."""
    node: Any = recipe
    for part in key.split("."):
        if not isinstance(node, Section):  # an entry of a mapping (infer.limit_mm_per_prompt.audio): its field's tag
            return True
        if NoEffect in type(node).model_fields[part].metadata:
            return False
        node = getattr(node, part)
    return True


def result_keys(recipe: Recipe, reads: Iterable[str]) -> list[str]:
    """The dotted keys a stage's results depend on: each key under `reads` (sections or single keys, e.g.
    ("model", "infer.thinking_budget")) that changes results, in recipe order per read. A run that holds
    results may only be resumed with these unchanged (`changed_settings`)."""
    tree = recipe.model_dump(mode="json")
    keys = []
    for read in reads:
        value = _lookup(tree, read)
        keys += [key for key in (dotted_keys(value, read + ".") if isinstance(value, dict) else [read])
                 if changes_results(recipe, key)]
    return keys


def description(section: type[Section], name: str) -> str:
    """A field's docstring on one line; a field that a subclass redefines (PrepQAConfig.do_sample) without one
    keeps its base section's (PrepGeneration)."""
    for cls in section.__mro__:
        field = getattr(cls, "model_fields", {}).get(name)
        if field is not None and field.description:
            return " ".join(field.description.split())
    return ""


def describe(recipe: Recipe) -> list[tuple[str, Any, Any, str]]:
    """(dotted key, value, default, description) for every key of a resolved recipe, in recipe order."""
    rows = []

    def dump(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        return [dump(x) for x in value] if isinstance(value, list) else value

    def walk(section: BaseModel, default: BaseModel, prefix: str) -> None:
        for name in type(section).model_fields:
            value, base = getattr(section, name), getattr(default, name)
            if isinstance(value, Section):
                walk(value, base, f"{prefix}{name}.")
                continue
            note = description(type(section), name)
            if isinstance(value, dict):  # a mapping (infer.limit_mm_per_prompt): a key per entry, as overrides address it
                rows.extend((f"{prefix}{name}.{k}", v, (base or {}).get(k), note) for k, v in value.items())
            else:
                rows.append((f"{prefix}{name}", dump(value), dump(base), note))

    walk(recipe, Recipe(), "")
    return rows


def show(recipe: Recipe) -> str:
    """The resolved recipe, one line a key: `key = value  # description [default: X when different]`."""
    rows = [(f"{key} = {json.dumps(value)}", note + ("" if value == default else f" [default: {json.dumps(default)}]"))
            for key, value, default, note in describe(recipe)]
    width = max(len(left) for left, _ in rows if len(left) <= 60)
    return "\n".join(f"{left:<{width}}  # {note}" for left, note in rows)


RECIPE_USAGE = """RECIPE.yaml [dotted.key=value ...]

  RECIPE.yaml        a recipe (recipes/tiny.yaml, recipes/cogito.yaml); without one, the defaults
  dotted.key=value   overrides, values parsed as YAML: train.lr=2e-5 "data.train=[{path: a.jsonl}]"

Every key with its value, default and meaning: python -m core.recipe show RECIPE.yaml [dotted.key=value ...]"""


def recipe_cli(argv: list[str], prog: str, description: str) -> Recipe:
    """The recipe of a command line `[RECIPE.yaml] [dotted.key=value ...]`; -h/--help prints the usage and exits 0."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"usage: {prog} {RECIPE_USAGE}\n\n{description}")
        raise SystemExit(0)
    return load_recipe(*split_cli(argv))


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "show":
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(f"usage: python -m core.recipe show {RECIPE_USAGE}", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    try:
        recipe = recipe_cli(argv[1:], "python -m core.recipe show", "Prints the fully resolved recipe: every key, "
                            "its value, its default when different, and a one-line description.")
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(show(recipe))
    return 0


def split_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """`[recipe.yaml] [a.b=c ...]` -> (recipe path, overrides)."""
    path, overrides = None, []
    for arg in argv:
        if "=" in arg:
            overrides.append(arg)
        elif path is None and not overrides:
            path = arg
        else:
            raise RecipeError(f"unexpected argument {arg!r}: expected RECIPE.yaml, then dotted.key=value overrides")
    return path, overrides


if __name__ == "__main__":
    raise SystemExit(main())
