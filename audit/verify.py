"""`audit verify BUNDLE`: is the submission what its bundle says, and does the model give it again?

1. Every file of the bundle against MANIFEST.json (missing, changed, or added files are named).
2. The bundle's copies of the submission and its sidecars against checksums.json's record of the
   originals too, and compliance.json against audit.json's summary: re-hashing MANIFEST.json after an
   edit does not hide it.
3. Every file the bundle refers to (checkpoint, adapter, base, merged, training data, GRPO's starting
   adapter, submission and sidecars, data card) against checksums.json, where it is on disk; absent ones are listed as not
   checked; files added to a recorded folder are named. A recorded path that is absolute or climbs with
   `..` is refused (named, never read or listed) unless it lies under an `allow_paths` folder
   (`--allow-path`: a checkpoint kept outside the repository).
4. The Track 1 compliance checks on the bundle's copies (audit.compliance).
5. GREEDY inference, with the bundle's inference recipe, on N ids of the submission (drawn with
   `seed`: random unless given, and printed, so a bundle's author cannot know which ids are checked),
   compared with the submitted lines: the answer must be identical, and the reasoning at least
   `min_similarity` similar (difflib ratio over words and punctuation; 1.0 = identical), reported per id.
   A submission decoded with sampling cannot be expected to match a greedy re-run: then the
   differences are reported but do not fail. An exact check needs a greedy submission.
   The re-run is skipped when the checkpoint or adapter differ from their record (it would test
   another model).

Exit status 0 when nothing differs, 1 otherwise (each difference printed, naming file, id and field).
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import secrets
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from audit import compliance
from audit.bundle import MANIFEST, files_under, sha256_file
from core.items import DataError
from core.recipe import RecipeError, load_recipe
from infer.run import RunPaths

MODEL_ROLES = ("checkpoint", "adapter")  # a mismatch here means a re-run would test another model
_TOKENS = re.compile(r"\w+|[^\w\s]")


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)  # each one fails verification
    notes: list[str] = field(default_factory=list)  # what was not checked, and expected differences
    bad_roles: set[str] = field(default_factory=set)
    compliance: list[dict] = field(default_factory=list)
    rerun: list[dict] = field(default_factory=list)  # one row per re-run id
    rerun_seed: int | None = None  # what drew the re-run ids (`--seed` repeats the draw)

    def to_dict(self) -> dict:
        return {"ok": not self.problems, "problems": self.problems, "notes": self.notes,
                "compliance": self.compliance, "rerun_seed": self.rerun_seed, "rerun": self.rerun}


@contextmanager
def opened(bundle: str | Path) -> Iterator[Path]:
    """The bundle folder; a .tar.gz is unpacked into a temporary folder first."""
    bundle = Path(bundle)
    if bundle.is_dir():
        yield bundle
        return
    if not bundle.is_file() or not bundle.name.endswith(".tar.gz"):
        raise DataError(f"{bundle}: not a bundle folder or .tar.gz")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with tarfile.open(bundle) as tar:
                for member in tar.getmembers():
                    _check_member(bundle, member)
                tar.extractall(tmp, filter="data")  # the same rules again, from the library
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(f"{bundle}: unreadable or refused archive ({type(err).__name__}: {err})") from None
        tops = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if len(tops) != 1:
            raise DataError(f"{bundle}: expected one folder inside, found {len(tops)}")
        yield tops[0]


def _check_member(bundle: Path, member: tarfile.TarInfo) -> None:
    """A DataError naming the member unless it is a plain file or folder inside the extraction folder: audit
    bundle writes nothing else, and a link, a device or a path leaving the folder could only come from elsewhere."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        why = "an absolute path"
    elif ".." in re.split(r"[/\\]", name):
        why = "a path leaving the extraction folder (..)"
    elif member.issym() or member.islnk():
        why = f"a {'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r})"
    elif not (member.isfile() or member.isdir()):
        why = "a device, FIFO or other special file"
    else:
        return
    raise DataError(f"{bundle}: member {name!r}: {why}: refused; an audit bundle holds only files and folders")


def check_manifest(folder: Path, report: Report) -> None:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        report.problems.append(f"{manifest_path}: missing: not an audit bundle")
        return
    listed = json.loads(manifest_path.read_text())["files"]
    report.notes.append(f"checked {len(listed)} bundle files against {MANIFEST}")
    for rel, record in listed.items():
        path = folder / rel
        if climbs_out(rel):
            report.problems.append(f"{MANIFEST}: {rel!r}: a path outside the bundle (absolute or '..'), not read")
        elif not path.is_file():
            report.problems.append(f"bundle file {rel}: missing")
        elif path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
            report.problems.append(f"bundle file {rel}: sha256 differs from {MANIFEST} (changed after bundling)")
    for path in files_under(folder):
        rel = str(path.relative_to(folder))
        if rel != MANIFEST and rel not in listed:
            report.problems.append(f"bundle file {rel}: not listed in {MANIFEST} (added after bundling)")


def climbs_out(path: str | Path) -> bool:
    """An absolute path, or one with a `..` part: it can name any file of the machine."""
    path = Path(path)
    return path.is_absolute() or ".." in path.parts


def outside(path: Path, allow_paths: tuple[Path, ...]) -> bool:
    """A recorded path verify may not read: absolute or climbing with `..`, and under no `allow_paths` folder."""
    if not climbs_out(path):
        return False
    resolved = Path(os.path.abspath(path))  # lexically: `..` folded, no link followed
    return not any(resolved.is_relative_to(Path(os.path.abspath(a))) for a in allow_paths)


def check_paths(groups: dict, allow_paths: tuple[Path, ...], report: Report) -> dict:
    """The groups of checksums.json whose every path may be read; each refused one is named, never read or listed."""
    readable = {}
    for role, group in groups.items():
        root = group["root"]
        refused = [root] if root is not None and outside(Path(root), allow_paths) else []
        refused += [e["path"] for e in group["files"]
                    if (climbs_out(e["path"]) if root is not None else outside(Path(e["path"]), allow_paths))]
        if refused:
            report.problems.append(f"checksums.json: {role}: {refused[0]!r} is outside the repository (absolute or '..'); "
                                   "refused, not read. A checkpoint or data kept outside it: pass --allow-path FOLDER")
            report.bad_roles.add(role)
        else:
            readable[role] = group
    return readable


def check_copies(folder: Path, groups: dict, report: Report) -> None:
    """The bundle's copies of the submission files against checksums.json (MANIFEST.json can be re-hashed by
    whoever edits a copy), and compliance.json against audit.json's summary. (The recipe and data card copies
    may differ from their originals by design: the bundle blanks anything that looks like a key in them.)"""
    summary = json.loads((folder / "audit.json").read_text())
    sub = RunPaths.beside(summary["submission_file"])
    copied = {p.name for p in (sub.submission, sub.raw, sub.run)}
    copies = [(folder / "submission" / Path(e["path"]).name, e) for e in groups.get("submission", {"files": []})["files"]
              if Path(e["path"]).name in copied]
    for path, entry in copies:
        if not path.is_file():
            report.problems.append(f"bundle file {path.relative_to(folder)}: missing (checksums.json records {entry['path']})")
        elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            report.problems.append(f"bundle file {path.relative_to(folder)}: sha256 differs from checksums.json's record of "
                                   f"{entry['path']} (changed after bundling)")
    if (folder / "compliance.json").is_file():
        statuses = {c["name"]: c["status"] for c in json.loads((folder / "compliance.json").read_text())}
        if statuses != summary.get("compliance"):
            report.problems.append(f"bundle file compliance.json: statuses {statuses} differ from audit.json's {summary.get('compliance')}")


def check_artifacts(folder: Path, report: Report, allow_paths: tuple[Path, ...] = ()) -> None:
    groups = json.loads((folder / "checksums.json").read_text())
    check_copies(folder, groups, report)
    groups = check_paths(groups, allow_paths, report)
    report.notes.append("checked referenced files: " + ", ".join(f"{role} ({len(g['files'])})" for role, g in groups.items()))
    for role, group in groups.items():
        root = Path(group["root"]) if group["root"] is not None else None
        if root is not None and not root.is_dir():
            report.notes.append(f"{root} ({role}): not on disk, not checked")
            continue
        recorded = set()
        for entry in group["files"]:
            path = root / entry["path"] if root is not None else Path(entry["path"])
            recorded.add(path)
            if not path.is_file():
                (report.problems if root is not None else report.notes).append(
                    f"{path} ({role}): "
                    + ("missing from its folder (removed after bundling)" if root is not None else "not on disk, not checked"))
                if root is not None:
                    report.bad_roles.add(role)
            elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                report.problems.append(f"{path} ({role}): sha256 differs from the bundle's record (checksums.json)")
                report.bad_roles.add(role)
        if root is not None:
            for path in files_under(root):
                if path not in recorded:
                    report.problems.append(f"{path} ({role}): not in the bundle's record (added after bundling)")
                    report.bad_roles.add(role)


def check_compliance(folder: Path, mmar_meta: Path | None, report: Report) -> None:
    summary = json.loads((folder / "audit.json").read_text())
    card = folder / "data" / "data_card.json"
    recorded_meta = summary["sources"].get("mmar_meta")
    mmar_meta = mmar_meta or (Path(recorded_meta) if recorded_meta else None)
    try:
        checks = compliance.run_checks(compliance.Inputs(
            infer_recipe=load_recipe(folder / "recipes" / "infer.yaml"),
            submission=folder / "submission" / summary["submission_file"],
            train_recipe=load_recipe(folder / "recipes" / "train.yaml"),
            data_card=card if card.is_file() else None, mmar_meta=mmar_meta,
            trainer=summary.get("trainer", "sft"),  # bundles made before GRPO runs were told apart
        ))
    except (DataError, RecipeError, OSError) as err:
        report.problems.append(f"compliance: could not run: {err}")
        return
    report.compliance = [c.to_dict() for c in checks]
    for check in compliance.failed(checks):
        report.problems += [f"compliance {check.name}: {line}" for line in check.details]


def choose_ids(ids: list[str], n: int, seed: int) -> list[str]:
    """n ids drawn with `seed`, whatever the order of `ids` (the same seed gives the same choice)."""
    return random.Random(seed).sample(sorted(set(ids)), min(n, len(set(ids))))


def similarity(a: str, b: str) -> float:
    """difflib ratio over words and punctuation (a character-level ratio is quadratic on 10k-character thoughts)."""
    if a == b:
        return 1.0
    return round(difflib.SequenceMatcher(None, _TOKENS.findall(a), _TOKENS.findall(b), autojunk=False).ratio(), 4)


def rerun(folder: Path, n_ids: int, device: str | None, backend: str | None, min_similarity: float, report: Report,
          seed: int) -> None:
    from core.items import load_items
    from infer.ablation import donors
    from infer.engine import load_engine
    from infer.run import item_request, records_for
    from infer.submission import read_records

    summary = json.loads((folder / "audit.json").read_text())
    sampled = bool((summary.get("sampling") or {}).get("do_sample"))
    overrides = ["infer.do_sample=false"] + ([f"infer.backend={backend}"] if backend else [])
    recipe = load_recipe(folder / "recipes" / "infer.yaml", overrides)
    submission = folder / "submission" / summary["submission_file"]
    submitted = {r["id"]: r for r in read_records(submission)}
    chosen = choose_ids(list(submitted), n_ids, seed)
    report.rerun_seed = seed
    items = {item.id: item for item in load_items(recipe.infer.meta, recipe.infer.audio_root, check_audio=False)}
    unknown = [rid for rid in chosen if rid not in items]
    if unknown:
        report.problems.append(f"re-run: ids {unknown} of {submission.name} are not in {recipe.infer.meta}")
        return
    if sampled:
        report.notes.append(f"the submission was decoded with sampling ({summary['sampling']}): a greedy re-run is not "
                            "expected to give the same reasoning or answers; differences are reported, not failed")
    engine = load_engine(recipe, device)
    swaps = donors(list(items.values()), recipe.infer.audio_ablation, recipe.infer.seed)  # the clips the run heard
    requests = [item_request(items[rid], engine.tokenizer, recipe.model.prompt_style, recipe.infer.max_audio_seconds,
                             recipe.infer.audio_ablation, swaps.get(rid)) for rid in chosen]
    for generation in engine.generate(requests):
        rid = generation.id
        again, _ = records_for(items[rid], generation, engine.name)
        before = submitted[rid]
        score = similarity(before["thinking_prediction"], again["thinking_prediction"])
        row = {"id": rid, "answer_match": before["answer_prediction"] == again["answer_prediction"],
               "reasoning_similarity": score,
               "first_difference_at": None if score == 1.0 else len(os.path.commonprefix([before["thinking_prediction"],
                                                                                          again["thinking_prediction"]])),
               "submitted_answer": before["answer_prediction"], "rerun_answer": again["answer_prediction"]}
        report.rerun.append(row)
        where = f"{submission.name} (id={rid})"
        differences = []
        if not row["answer_match"]:
            differences.append(f"{where}: answer_prediction: submitted {before['answer_prediction']!r}, "
                               f"greedy re-run {again['answer_prediction']!r}")
        if score < min_similarity:
            differences.append(f"{where}: thinking_prediction: similarity {score:.3f} < {min_similarity} "
                               f"(first difference at character {row['first_difference_at']})")
        (report.notes if sampled else report.problems).extend(differences)


def verify(bundle: str | Path, n_ids: int = 8, device: str | None = None, backend: str | None = None,
           min_similarity: float = 0.8, mmar_meta: Path | None = None, seed: int | None = None,
           allow_paths: tuple[str | Path, ...] = ()) -> Report:
    """`seed` draws the re-run ids (None: a random one, recorded in the report); `allow_paths`: folders
    outside the repository whose recorded files may be read."""
    report = Report()
    seed = secrets.randbelow(2**32) if seed is None else seed
    with opened(bundle) as folder:
        check_manifest(folder, report)
        if not (folder / "checksums.json").is_file():  # named by the manifest check (or MANIFEST.json is gone too)
            return report
        check_artifacts(folder, report, tuple(Path(a) for a in allow_paths))
        check_compliance(folder, mmar_meta, report)
        if n_ids <= 0:
            report.notes.append("re-run: skipped (--ids 0)")
        elif report.bad_roles & set(MODEL_ROLES):
            changed = " and ".join(sorted(report.bad_roles & set(MODEL_ROLES)))
            report.notes.append(f"re-run: skipped: {changed} changed since bundling (a re-run would test another model)")
        else:
            try:
                rerun(folder, n_ids, device, backend, min_similarity, report, seed)
            except (DataError, RecipeError, OSError, ValueError, ImportError) as err:
                report.problems.append(f"re-run: failed: {err}")
    return report


def render(report: Report) -> str:
    lines = []
    if report.rerun:
        lines.append(f"re-run ids drawn with --seed {report.rerun_seed}")
        lines.append(f"{'id':<40} {'answer':>7} {'reasoning':>9}  first difference")
        for row in report.rerun:
            lines.append(f"{row['id']:<40} {'same' if row['answer_match'] else 'DIFF':>7} {row['reasoning_similarity']:>9.3f}  "
                         f"{'-' if row['first_difference_at'] is None else 'char ' + str(row['first_difference_at'])}")
    if report.compliance:
        lines.append("compliance: " + ", ".join(f"{c['name']} {c['status']}" for c in report.compliance))
    lines += [f"note: {line}" for line in report.notes]
    lines += [f"MISMATCH: {line}" for line in report.problems]
    lines.append("verify: OK" if not report.problems else f"verify: FAILED, {len(report.problems)} difference(s)")
    return "\n".join(lines)
