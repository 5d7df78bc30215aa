"""The Track 1 rules that code can check (docs/protocol.md), on a submission and the runs behind it.

| check | rule | how |
|---|---|---|
| prompt | only the audio, the question, the choices and a prompt reach the model | known `prompt_style`; for a few items the runner's request (`infer.run.item_request`) is built twice, from the item and from the item stripped of every other field: the prompts must be equal and hold the question and choices as the baseline writes them |
| parsing | answers extracted by string matching, no second model | the run's parse policy is `infer.parse.POLICY`, and every line re-derives from its raw output by `infer.parse.parse_output` |
| submission | thinking under 10,000 characters, without <think> tags; the challenge format | `infer.submission.validate_submission` |
| data_sources | data sources declared | a data card (data_prep card) listing sources, each with a licence |
| decoding | one model, no external tools; opt-in inference-time scaling is declared | states greedy or sampled decoding, and self-consistency (a vote over sampled chains: whether it is a "separate controller" is not settled) and the audio-attention boost when on; under self-consistency every raw line must hold its n chains and the submitted one must be a winning chain, verbatim |
| contamination | no MMAR test data in training | `data_prep.guard` on every training file (SFT's data.train, GRPO's curriculum stages), when the MMAR metadata is at hand |

Each check passes, fails or is skipped (with the reason); the details name file, line, id and field.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core import qwen_omni as qo
from core.items import DataError, Item, load_items
from core.recipe import DatasetSpec, Recipe

PROMPT_FIELDS = ("id", "audio_path", "question", "choices")  # what may shape a prompt (plus the audio)
PROMPT_ITEMS = 8  # items whose prompts are rebuilt
MIN_LEAK_CHARS = 3  # shorter metadata values ("a", "en") are too common to name a leak by


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    details: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Inputs:
    """What the checks read: the inference recipe and its outputs, the training recipe and data card."""

    infer_recipe: Recipe
    submission: Path  # submission.jsonl; its .raw.jsonl and .run.json sidecars are read beside it
    train_recipe: Recipe | None = None
    data_card: Path | None = None  # data_card.json (or the .md beside it)
    mmar_meta: Path | None = None  # benchmark metadata for the contamination guard
    trainer: str = "sft"  # what made the training run (trainer_of): which of its recipe's data it trained on


def trainer_of(train_run: Path) -> str:
    """"grpo" for a train/grpo.py run folder (it writes rollouts/), else "sft"."""
    return "grpo" if (Path(train_run) / "rollouts").is_dir() else "sft"


def training_data(recipe: Recipe, trainer: str) -> list[tuple[str, DatasetSpec]]:
    """(the recipe key that declares it, dataset) of every file the run trained on: data.train for SFT,
    the curriculum stages' data for GRPO (a file two stages share, once)."""
    if trainer == "sft":
        return [("data.train", spec) for spec in recipe.data.train]
    found, seen = [], set()
    for index, stage in enumerate(recipe.grpo.stages):
        for spec in stage.data:
            if spec.path not in seen:
                seen.add(spec.path)
                found.append((f"grpo.stages.{index}.data ({stage.name})", spec))
    return found


def metadata_strings(value, path: str = ""):
    """(dotted field, string) for every string inside a record's field (lists and dicts flattened)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from metadata_strings(inner, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from metadata_strings(inner, f"{path}[{index}]")


def stripped(item: Item) -> Item:
    """The item as Track 1 lets the model see it: audio, question and choices, nothing else."""
    return dataclasses.replace(item, answer="", thinking=None, meta={k: item.meta[k] for k in PROMPT_FIELDS if k in item.meta})


def check_prompt(recipe: Recipe, items: list[Item], tokenizer) -> Check:
    from core.audio import write_wav
    from infer.run import item_request

    style = recipe.model.prompt_style
    if style not in qo.PROMPT_SYSTEMS:
        return Check("prompt", "fail", [f"model.prompt_style={style!r} is not a known prompt ({sorted(qo.PROMPT_SYSTEMS)})"])
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        # The audio plays no part in what is checked here: one second of silence stands in for every clip.
        silence = Path(tmp) / "silence.wav"
        write_wav(silence, np.zeros(qo.SAMPLE_RATE, dtype=np.float32))
        for item in items:
            label = f"{item.where} (id={item.id})"
            item = dataclasses.replace(item, audio_path=silence)
            try:
                prompt = item_request(item, tokenizer, style, recipe.infer.max_audio_seconds).prompt
                allowed = item_request(stripped(item), tokenizer, style, recipe.infer.max_audio_seconds).prompt
            except (KeyError, AttributeError, TypeError) as err:
                problems.append(f"{label}: prompt: building it without the other fields fails ({type(err).__name__}: {err}): "
                                "the prompt reads a field other than the audio, question and choices")
                continue
            if prompt != allowed:
                leaked = sorted({name for name, text in metadata_strings({k: v for k, v in item.meta.items() if k not in PROMPT_FIELDS})
                                 if len(text) >= MIN_LEAK_CHARS and prompt.count(text) > allowed.count(text)})
                problems.append(f"{label}: prompt: differs from the prompt of the audio, question and choices alone"
                                + (f"; it holds the field(s) {', '.join(leaked)}" if leaked else ""))
            elif prompt.count(qo.question_text(item.question, item.choices)) != 1:
                problems.append(f"{label}: prompt: does not hold the question and choices as the challenge baseline writes them")
    details = problems or [f"prompt_style={style}; {len(items)} prompts hold only the audio, question, choices and the fixed prompt"]
    return Check("prompt", "fail" if problems else "pass", details)


def check_parsing(submission: Path, items: dict[str, Item]) -> Check:
    from infer.parse import POLICY, parse_output
    from infer.run import RunPaths
    from infer.submission import read_records

    paths = RunPaths.beside(submission)
    problems = []
    if not paths.run.is_file():
        return Check("parsing", "fail", [f"{paths.run}: not found: the run's parse policy is unknown"])
    policy = json.loads(paths.run.read_text()).get("parse_policy")
    if policy != POLICY:
        problems.append(f"{paths.run}: parse_policy: {policy!r} is not infer.parse.POLICY {POLICY!r}")
    if not paths.raw.is_file():
        return Check("parsing", "fail" if problems else "skip", problems + [f"{paths.raw}: not found: lines not re-derived"])
    raw = {r["id"]: r for r in read_records(paths.raw)}
    checked = 0
    for lineno, record in enumerate(read_records(submission), 1):
        rid, label = record.get("id"), f"{submission}:{lineno} (id={record.get('id')})"
        if rid not in raw or rid not in items:
            problems.append(f"{label}: id: no raw output in {paths.raw.name} or not in the benchmark")
            continue
        parsed = parse_output(raw[rid]["raw_output"], items[rid].choices)
        for key, value in (("thinking_prediction", parsed.thinking), ("answer_prediction", parsed.answer)):
            if record.get(key) != value:
                problems.append(f"{label}: {key}: not what string matching extracts from the raw output")
        checked += 1
    details = problems or [f"parse policy = infer.parse.POLICY; {checked} lines re-derived from their raw outputs"]
    return Check("parsing", "fail" if problems else "pass", details)


def check_decoding(submission: Path) -> Check:
    from infer.run import RunPaths
    from infer.submission import read_records

    paths = RunPaths.beside(submission)
    if not paths.run.is_file():
        return Check("decoding", "fail", [f"{paths.run}: not found: how the answers were decoded is unknown"])
    summary = json.loads(paths.run.read_text())
    sampling, sc, mata = summary.get("sampling") or {}, summary.get("self_consistency"), summary.get("mata")
    details = [("sampled: " + ", ".join(f"{k} {sampling.get(k)}" for k in ("temperature", "top_p", "top_k", "seed")))
               if sampling.get("do_sample") else "greedy decoding"]
    problems = []
    if sc:
        details.append(f"SELF-CONSISTENCY ON: {sc['n']} sampled chains per item, a vote on their answers, the "
                       f"{sc['selection']} winning chain submitted verbatim. Opt-in: whether a vote is a \"separate "
                       "controller\" under Track 1 is not settled; declare it with the submission")
        raw = {r["id"]: r for r in read_records(paths.raw)} if paths.raw.is_file() else {}
        for record in read_records(submission):
            line = raw.get(record["id"], {})
            voted = line.get("self_consistency") or {}
            chains = voted.get("chains") or []
            chosen = voted.get("chosen", -1)
            if len(chains) != sc["n"] or not 0 <= chosen < len(chains):
                problems.append(f"{paths.raw} (id={record['id']}): self_consistency: {len(chains)} chains, expected {sc['n']}")
            elif chains[chosen]["raw_output"] != line.get("raw_output") or (
                    voted["winner"] is not None and chains[chosen]["vote"] != voted["winner"]):
                problems.append(f"{paths.raw} (id={record['id']}): self_consistency: the submitted chain is not a winning chain")
    if mata:
        details.append(f"AUDIO-ATTENTION BOOST (MATA) ON: layers {mata['layers']}, strength {mata['strength']} "
                       "(training-free, inside the one model)")
    return Check("decoding", "fail" if problems else "pass", problems + details)


def check_submission(submission: Path, meta: str, complete_expected: bool) -> Check:
    from infer.submission import read_records, validate_submission

    errors, warnings = validate_submission(submission, meta, allow_unmatched=True, require_all=complete_expected)
    details = list(errors)
    if warnings:  # answers that are not a choice verbatim: allowed (scored as written), so only counted
        details.append(f"warning: {len(warnings)} answer(s) not one of their choices, e.g. {warnings[0]}")
    if not complete_expected:
        n = len(read_records(submission))
        details.append(f"warning: a partial run (infer.limit): {n} lines, not every item of {meta}")
    return Check("submission", "fail" if errors else "pass",
                 details or ["challenge format; every thinking under 10,000 characters, no tags"])


def read_card(path: Path) -> dict:
    json_path = path if path.suffix == ".json" else path.with_suffix(".json")
    if not json_path.is_file():
        raise DataError(f"{json_path}: data card not found (python -m data_prep card RECIPE writes it)")
    return json.loads(json_path.read_text())


def check_data_sources(card_path: Path | None) -> Check:
    if card_path is None:
        return Check("data_sources", "fail", ["no data card: pass --data-card or run `python -m data_prep card RECIPE`"])
    try:
        card = read_card(card_path)
    except (DataError, ValueError) as err:
        return Check("data_sources", "fail", [str(err)])
    sources = card.get("by_source") or {}
    if not sources:
        return Check("data_sources", "fail", [f"{card_path}: by_source: no sources listed"])
    problems = [f"{card_path}: by_source.{name}: no licence declared ({list(row.get('licences') or {}) or 'none'})"
                for name, row in sources.items()
                if not row.get("licences") or any(str(l).lower().startswith("unknown") for l in row["licences"])]
    details = problems or [f"{name}: {row['records']} records, {'; '.join(row['licences'])}" for name, row in sources.items()]
    return Check("data_sources", "fail" if problems else "pass", details)


def check_contamination(train_recipe: Recipe | None, mmar_meta: Path | None, trainer: str = "sft") -> Check:
    if train_recipe is None:
        return Check("contamination", "skip", ["no training recipe"])
    meta = mmar_meta or (Path(train_recipe.data_prep.mmar_meta) if train_recipe.data_prep.mmar_meta else None)
    if meta is None or not meta.is_file():
        return Check("contamination", "skip", [f"MMAR metadata not at hand ({meta or 'pass --mmar-meta or set data_prep.mmar_meta'})"])
    from data_prep.guard import ContaminationIndex, guard_file

    index = ContaminationIndex.from_meta(meta, train_recipe.data_prep.mmar_audio_root)
    problems, details = [], []
    for _, spec in training_data(train_recipe, trainer):
        report = guard_file(spec.path, index, spec.audio_root)
        details.append(f"{spec.path}: {report['records']} records, {report['flagged']} overlap MMAR "
                       f"(checks: {', '.join(report['checks'])})")
        problems += [f"{spec.path}:{o['line']} (id={o['id']}): overlaps MMAR: {', '.join(o['overlaps'])}" for o in report["overlaps"]]
    return Check("contamination", "fail" if problems else "pass", problems + details)


def run_checks(inputs: Inputs) -> list[Check]:
    recipe = inputs.infer_recipe
    items = load_items(recipe.infer.meta, recipe.infer.audio_root, check_audio=False)
    processor = qo.OmniProcessor.from_pretrained(recipe.model.path)
    return [
        check_prompt(recipe, items[:PROMPT_ITEMS], processor.tokenizer),
        check_parsing(inputs.submission, {item.id: item for item in items}),
        check_submission(inputs.submission, recipe.infer.meta, complete_expected=recipe.infer.limit is None),
        check_decoding(inputs.submission),
        check_data_sources(inputs.data_card),
        check_contamination(inputs.train_recipe, inputs.mmar_meta, inputs.trainer),
    ]


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail"]


def render(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{check.status.upper():4} {check.name}")
        lines += [f"     {line}" for line in check.details[:20]]
        if len(check.details) > 20:
            lines.append(f"     ... and {len(check.details) - 20} more")
    return "\n".join(lines)
