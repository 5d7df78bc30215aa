"""The reproducibility bundle of one submission: everything needed to trace, check and re-run it.

    python -m audit bundle --train-run runs/tiny --infer-output runs/tiny/submission.jsonl --out runs/tiny/audit

Layout of OUT (also packed as OUT.tar.gz):

    MANIFEST.json            sha256 and size of every other file of the bundle
    audit.json               sources, git state, seeds, decoding settings, compliance summary
    checksums.json           sha256 per file of what the bundle refers to but does not hold: the inference
                             checkpoint, adapter, training base, merged checkpoint, training data (SFT's data.train
                             or GRPO's curriculum stages; with --hash-audio its audio), GRPO's starting SFT adapter,
                             SFT's train.init_adapter, every earlier iteration's SFT data of a self-improvement loop
                             (train/rest.py), the submission and its sidecars, the data card
    commands.sh              the exact commands that re-run training and inference from recipes/
    compliance.json          the Track 1 checks (audit.compliance)
    recipes/train.yaml       the training run's resolved recipe (runs/X/recipe.yaml)
    recipes/infer.yaml       the inference run's resolved recipe (the .recipe.yaml beside the submission)
    submission/              the submission and its .raw.jsonl / .run.json sidecars, as written
    training/metrics.jsonl   the training run's per-step metrics
    training/provenance.jsonl  git commit (+ patch), packages and machine of each training session, recorded as it ran
    data/data_card.{json,md} the data card
    data/rest/iter-N.json    a loop iteration's run (LOOP/iter-N/sft): every iteration's data.json up to it (which
                             adapter sampled, which files, their sha256)
    environment/             pip-freeze.txt, system.json (Python, torch, CUDA, driver, GPUs or CPU), nvidia-smi.txt
    git/                     status.txt, and diff.patch when the tree was dirty

Recorded paths are as given (relative ones to the directory the bundle was made in, the repository
root): `audit verify` is run from there too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from audit import compliance
from core import provenance
from core.items import DataError, load_items
from core.outdir import replacing
from core.progress import progress
from core.recipe import Recipe, load_recipe
from core.redact import redact
from core.rest_files import iteration_data, iteration_manifests, loop_of
from infer.run import RunPaths

BUNDLE_FORMAT = 1
MANIFEST = "MANIFEST.json"


def sha256_file(path: Path, bar=None) -> str:
    """`bar`: a core.progress bar counting the bytes read."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def hash_group(root: Path | None, files: list[Path], desc: str) -> dict:
    """{"root", "files": [{"path", "sha256", "bytes"}]}: paths relative to `root` for a folder, as given otherwise."""
    total = sum(f.stat().st_size for f in files)
    entries = []
    with progress(total, f"sha256 {desc}", unit="B", unit_scale=True, disable=total < 1 << 28) as bar:
        for file in files:
            entries.append({"path": str(file.relative_to(root)) if root is not None else str(file),
                            "sha256": sha256_file(file, bar), "bytes": file.stat().st_size})
    return {"root": str(root) if root is not None else None, "files": entries}


def folder_group(path: str | Path, desc: str) -> dict:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: {desc}: folder not found")
    return hash_group(root, files_under(root), desc)


@dataclass
class BundleSources:
    train_run: Path  # train.output_dir of the run: recipe.yaml, metrics.jsonl, adapter/
    submission: Path  # the submission JSONL; its .recipe.yaml/.run.json/.raw.jsonl sidecars beside it
    out: Path
    data_card: Path | None = None  # default: data_prep.work_dir/data_card.json of the training recipe
    merged: Path | None = None  # merged checkpoint (train/merge.py), when one was made
    hash_audio: bool = False  # also hash every audio file the training data lists (slow on 500k clips)
    mmar_meta: Path | None = None  # for the contamination guard; default: the training recipe's data_prep.mmar_meta


def same(a: str | Path | None, b: str | Path | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def artifact_checksums(src: BundleSources, train: Recipe, infer: Recipe, card: Path | None, trainer: str) -> dict:
    """checksums.json: the files the bundle refers to, by role (each hashed once)."""
    groups = {"checkpoint": folder_group(infer.model.path, "model.path of the inference recipe")}
    if infer.infer.adapter:
        groups["adapter"] = folder_group(infer.infer.adapter, "infer.adapter")
    train_adapter = src.train_run / "adapter"
    if train_adapter.is_dir() and not same(train_adapter, infer.infer.adapter):
        groups["train_adapter"] = folder_group(train_adapter, "the training run's final adapter")
    if not same(train.model.path, infer.model.path):
        groups["base"] = folder_group(train.model.path, "model.path of the training recipe")
    if src.merged is not None and not same(src.merged, infer.model.path):
        groups["merged"] = folder_group(src.merged, "merged checkpoint")
    if trainer == "grpo" and train.grpo.init_adapter and not same(train.grpo.init_adapter, infer.infer.adapter):
        groups["init_adapter"] = folder_group(train.grpo.init_adapter, "grpo.init_adapter of the training recipe (the SFT start)")
    if train.train.init_adapter and not same(train.train.init_adapter, infer.infer.adapter):
        groups["sft_init_adapter"] = folder_group(train.train.init_adapter, "train.init_adapter of the training recipe (the SFT start)")
    if (loop := loop_of(src.train_run)) is not None:
        groups["rest_data"] = hash_group(None, iteration_data(*loop), "the SFT data of every iteration of the self-improvement "
                                         f"loop in {loop[0]} up to iteration {loop[1]} (train/rest.py)")
    data = compliance.training_data(train, trainer)
    for key, spec in data:
        if not Path(spec.path).is_file():
            raise DataError(f"{spec.path}: {key}: training file not found")
    groups["train_data"] = hash_group(None, [Path(spec.path) for _, spec in data], "training data")
    for entry, (key, spec) in zip(groups["train_data"]["files"], data):
        entry["declared_by"] = key
        entry["records"] = sum(1 for line in Path(spec.path).open(encoding="utf-8") if line.strip())
    if src.hash_audio:
        clips = sorted({item.audio_path for _, spec in data
                        for item in load_items(spec.path, spec.audio_root, check_audio=True)})
        groups["train_audio"] = hash_group(None, clips, "training audio")
    paths = RunPaths.beside(src.submission)
    groups["submission"] = hash_group(None, [p for p in (paths.submission, paths.raw, paths.run, paths.recipe) if p.is_file()],
                                      "submission")
    if card is not None:
        groups["data_card"] = hash_group(None, [p for p in (card.with_suffix(".json"), card.with_suffix(".md")) if p.is_file()],
                                         "data card")
    return groups


def redact_files(staging: Path) -> None:
    """Blank anything that looks like a credential in the bundle's text files (provenance written by an
    older version, environment, recipes); the submission files hold only what the model wrote and stay as is."""
    for path in files_under(staging):
        if path.parent.name == "submission":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if (clean := redact(text)) != text:
            path.write_text(clean, encoding="utf-8")


def training_commits(train_run: Path) -> list[dict]:
    """The commit and dirty state of each training session, as train/sft.py recorded them when it ran."""
    log = train_run / "provenance.jsonl"
    if not log.is_file():
        return []
    sessions = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [{"session": s["session"], "started": s["started"], "commit": s["git"].get("commit"),
             "dirty": s["git"].get("dirty"), "patch": s.get("patch")} for s in sessions]


def training_processes(train_run: Path) -> int:
    """Ranks of the training run: each wrote its own seen/rank{R}.jsonl (SFT) or rollouts/rank{R}.jsonl (GRPO)."""
    return max(1, len(list(train_run.glob("seen/rank*.jsonl"))) + len(list(train_run.glob("rollouts/rank*.jsonl"))))


def commands(src: BundleSources, train: Recipe, infer: Recipe, git: dict, trainer: str) -> str:
    q = shlex.quote
    ranks = training_processes(src.train_run)
    script = f"train/{trainer}.py"
    launch = (f"accelerate launch --num_processes {ranks} {script}" if ranks > 1 else f"python {script}")
    lines = [
        "#!/bin/sh",
        f"# Re-run the submission {src.submission} from the recipes of this bundle.",
        f"# From the repository root at commit {git.get('commit') or 'unknown'}"
        + (" plus the bundle's git/diff.patch (the tree was dirty)." if git.get("dirty") else "."),
        f"# Training writes to train.output_dir={train.train.output_dir} and resumes from checkpoints found there,",
        f"# inference to infer.output={infer.infer.output} (resuming too): move the originals away first, or add",
        "# overrides (train.output_dir=... infer.output=... infer.adapter=...) to every line consistently.",
        "set -e",
        f"BUNDLE=\"${{BUNDLE:-{src.out}}}\"",
        "",
    ]
    if ranks > 1:
        lines.append(f"# {ranks} training processes; pass the Accelerate/DeepSpeed config used (--config_file recipes/accelerate/...).")
    if trainer == "grpo" and train.grpo.init_adapter:
        lines.append(f"# GRPO starts from the SFT adapter at grpo.init_adapter={train.grpo.init_adapter} (checksums.json: "
                     "init_adapter): re-run or restore its SFT run first.")
    lines.append(f"{launch} \"$BUNDLE/recipes/train.yaml\"")
    if src.merged is not None:
        lines.append(f"python train/merge.py --base {q(train.model.path)} --adapter {q(str(src.train_run / 'adapter'))} "
                     f"--out {q(str(src.merged))}")
    lines += ["python -m infer run \"$BUNDLE/recipes/infer.yaml\"", "", "# Check the result against this bundle:",
              "python -m audit verify \"$BUNDLE\""]
    return "\n".join(lines) + "\n"


def seeds(train: Recipe, infer: Recipe) -> dict:
    return {"train.seed": train.train.seed, "data_prep.seed": train.data_prep.seed, "infer.seed": infer.infer.seed,
            "eval.judge.seed": infer.eval.judge.seed, "eval.bootstrap_seed": infer.eval.bootstrap_seed}


def default_card(train: Recipe) -> Path | None:
    path = Path(train.data_prep.work_dir) / "data_card.json"
    return path if path.is_file() else None


def write_manifest(folder: Path) -> dict:
    files = {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in files_under(folder) if p.name != MANIFEST or p.parent != folder}
    manifest = {"format": BUNDLE_FORMAT, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def is_bundle(folder: Path) -> bool:
    """Whether `folder` is a bundle this command wrote (so `bundle --out` may replace it): its MANIFEST.json
    parses and lists every file it holds."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(listed, dict) and all(str(p.relative_to(folder)) in listed for p in files_under(folder) if p.name != MANIFEST)


def build_bundle(src: BundleSources) -> tuple[Path, list[compliance.Check]]:
    """Write the bundle folder and its .tar.gz; returns (folder, compliance checks)."""
    paths = RunPaths.beside(src.submission)
    for required in (src.train_run / "recipe.yaml", paths.submission, paths.recipe, paths.run):
        if not required.is_file():
            raise DataError(f"{required}: not found (a finished training run and `infer run` output are bundled)")
    train, infer = load_recipe(src.train_run / "recipe.yaml"), load_recipe(paths.recipe)
    trainer = compliance.trainer_of(src.train_run)
    card = src.data_card or default_card(train)

    out = Path(src.out)
    with replacing(out, "audit bundle", made=is_bundle, marker=False) as staging:
        checks = fill_bundle(staging, src, paths, train, infer, card, trainer)
    tarball = out.with_name(out.name + ".tar.gz")
    partial = tarball.with_name(f".{tarball.name}.partial-{os.getpid()}")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    os.replace(partial, tarball)
    return out, checks


def fill_bundle(staging: Path, src: BundleSources, paths: RunPaths, train: Recipe, infer: Recipe, card: Path | None,
                trainer: str) -> list[compliance.Check]:
    """Write the bundle's files into the empty folder `staging`; returns the compliance checks."""
    for folder in ("recipes", "submission", "training", "data", "environment", "git"):
        (staging / folder).mkdir(parents=True)
    shutil.copy2(src.train_run / "recipe.yaml", staging / "recipes" / "train.yaml")
    shutil.copy2(paths.recipe, staging / "recipes" / "infer.yaml")
    for path in (paths.submission, paths.raw, paths.run):
        if path.is_file():
            shutil.copy2(path, staging / "submission" / path.name)
    if (src.train_run / "metrics.jsonl").is_file():
        shutil.copy2(src.train_run / "metrics.jsonl", staging / "training" / "metrics.jsonl")
    for name in ("provenance.jsonl", "provenance"):  # the code and machine of each training session
        if (src.train_run / name).is_file():
            shutil.copy2(src.train_run / name, staging / "training" / name)
        elif (src.train_run / name).is_dir():
            shutil.copytree(src.train_run / name, staging / "training" / name)
    if (loop := loop_of(src.train_run)) is not None:
        (staging / "data" / "rest").mkdir()
        for manifest in iteration_manifests(*loop):
            shutil.copy2(manifest, staging / "data" / "rest" / f"{manifest.parent.name}.json")
    if card is not None:
        compliance.read_card(card)  # a named card must exist
        for path in (card.with_suffix(".json"), card.with_suffix(".md")):
            if path.is_file():
                shutil.copy2(path, staging / "data" / f"data_card{path.suffix}")

    (staging / "environment" / "pip-freeze.txt").write_text(provenance.pip_freeze())
    (staging / "environment" / "system.json").write_text(json.dumps(provenance.system(), indent=2) + "\n")
    if (smi := provenance.nvidia_smi()) is not None:
        (staging / "environment" / "nvidia-smi.txt").write_text(smi)
    git, diff = provenance.git_state()
    (staging / "git" / "status.txt").write_text("\n".join(git.get("status", [])) + "\n")
    if diff is not None:
        (staging / "git" / "diff.patch").write_text(diff)

    checksums = artifact_checksums(src, train, infer, card, trainer)
    (staging / "checksums.json").write_text(json.dumps(checksums, indent=2) + "\n")
    (staging / "commands.sh").write_text(commands(src, train, infer, git, trainer))
    (staging / "commands.sh").chmod(0o755)

    checks = compliance.run_checks(compliance.Inputs(
        infer_recipe=infer, submission=paths.submission, train_recipe=train, data_card=card, mmar_meta=src.mmar_meta,
        trainer=trainer,
    ))
    (staging / "compliance.json").write_text(json.dumps([c.to_dict() for c in checks], indent=2) + "\n")
    run_info = json.loads(paths.run.read_text())
    summary = {
        "format": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cwd": os.getcwd(),
        "sources": {"train_run": str(src.train_run), "submission": str(src.submission), "data_card": str(card) if card else None,
                    "merged": str(src.merged) if src.merged else None, "hash_audio": src.hash_audio,
                    "mmar_meta": str(src.mmar_meta) if src.mmar_meta else None},
        "submission_file": paths.submission.name,
        "git": git,
        "trainer": trainer,
        "training_git": training_commits(src.train_run),
        "seeds": seeds(train, infer),
        "sampling": run_info.get("sampling"),
        "engine": run_info.get("engine"),
        "training_processes": training_processes(src.train_run),
        "compliance": {c.name: c.status for c in checks},
    }
    (staging / "audit.json").write_text(json.dumps(summary, indent=2) + "\n")
    redact_files(staging)
    write_manifest(staging)
    return checks
