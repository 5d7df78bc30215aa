"""Command line of the reproducibility audit.

    python -m audit bundle --train-run runs/tiny --infer-output runs/tiny/submission.jsonl --out runs/tiny/audit
            [--data-card DATA_CARD.json] [--merged runs/tiny/merged] [--hash-audio] [--mmar-meta MMAR-meta.jsonl]
    python -m audit verify BUNDLE [--ids 8] [--seed S] [--allow-path DIR] [--device cpu] [--backend hf] [--min-similarity 0.8]
            [--report verify.json]
    python -m audit compliance (BUNDLE | --train-run RUN --infer-output SUBMISSION) [--data-card ...] [--mmar-meta ...]

Run from the repository root: recorded paths are relative to it. Exit status: 0 when everything
checks out, 1 on a compliance failure or a mismatch, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.items import DataError
from core.recipe import RecipeError

USAGE = __doc__.split("\n\n")[1]


def _bundle(args) -> int:
    from audit import compliance
    from audit.bundle import BundleSources, build_bundle

    out, checks = build_bundle(BundleSources(
        train_run=Path(args.train_run), submission=Path(args.infer_output), out=Path(args.out),
        data_card=Path(args.data_card) if args.data_card else None, merged=Path(args.merged) if args.merged else None,
        hash_audio=args.hash_audio, mmar_meta=Path(args.mmar_meta) if args.mmar_meta else None,
    ))
    print(compliance.render(checks))
    print(f"bundle: {out}/ and {out}.tar.gz")
    return 1 if compliance.failed(checks) else 0


def _verify(args) -> int:
    from audit.verify import render, verify

    report = verify(args.bundle, args.ids, args.device, args.backend, args.min_similarity,
                    Path(args.mmar_meta) if args.mmar_meta else None, args.seed, tuple(args.allow_path))
    print(render(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 1 if report.problems else 0


def _compliance(args) -> int:
    from audit import compliance
    from audit.verify import Report, check_compliance, opened
    from core.recipe import load_recipe
    from infer.run import RunPaths

    if args.bundle:
        report = Report()
        with opened(args.bundle) as folder:
            check_compliance(folder, Path(args.mmar_meta) if args.mmar_meta else None, report)
        checks = [compliance.Check(**c) for c in report.compliance]
        if not checks:
            print("\n".join(report.problems), file=sys.stderr)
            return 2
    else:
        if not (args.train_run and args.infer_output):
            raise DataError("give a BUNDLE, or --train-run and --infer-output")
        train = load_recipe(Path(args.train_run) / "recipe.yaml")
        card = Path(args.data_card) if args.data_card else Path(train.data_prep.work_dir) / "data_card.json"
        checks = compliance.run_checks(compliance.Inputs(
            infer_recipe=load_recipe(RunPaths.beside(args.infer_output).recipe), submission=Path(args.infer_output),
            train_recipe=train, data_card=card if card.is_file() or args.data_card else None,
            mmar_meta=Path(args.mmar_meta) if args.mmar_meta else None, trainer=compliance.trainer_of(Path(args.train_run)),
        ))
    print(compliance.render(checks))
    return 1 if compliance.failed(checks) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m audit", description="Reproducibility audit bundle of a submission.",
                                     usage=USAGE)
    commands = parser.add_subparsers(dest="command", required=True)
    bundle = commands.add_parser("bundle", help="write the audit bundle of a submission (folder + .tar.gz)")
    bundle.add_argument("--train-run", required=True, help="train.output_dir of the training run (holds recipe.yaml)")
    bundle.add_argument("--infer-output", required=True, help="the submission JSONL written by `infer run`")
    bundle.add_argument("--out", required=True, help="bundle folder; OUT.tar.gz is written beside it")
    bundle.add_argument("--data-card", help="data_card.json (default: data_prep.work_dir/data_card.json of the training recipe)")
    bundle.add_argument("--merged", help="merged checkpoint folder (train/merge.py), when one was made")
    bundle.add_argument("--hash-audio", action="store_true", help="also sha256 every audio file of the training data (slow)")
    bundle.add_argument("--mmar-meta", help="MMAR-meta.jsonl for the contamination guard (default: data_prep.mmar_meta)")
    check = commands.add_parser("verify", help="check a bundle's checksums and re-run greedy inference on some ids")
    check.add_argument("bundle", help="bundle folder or .tar.gz")
    check.add_argument("--ids", type=int, default=8, help="ids to re-run (0: checksums and compliance only)")
    check.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    check.add_argument("--backend", choices=["hf", "vllm"], help="override infer.backend of the bundle's recipe")
    check.add_argument("--min-similarity", type=float, default=0.8,
                       help="least reasoning similarity (0-1) of a greedy re-run; GPU bf16 greedy drifts with batch "
                            "composition, lower it (0: report only) when hardware or batch size differ")
    check.add_argument("--mmar-meta", help="MMAR-meta.jsonl for the contamination guard")
    check.add_argument("--seed", type=int, help="draws the re-run ids (default: a random seed, printed); repeats a check")
    check.add_argument("--allow-path", action="append", default=[], metavar="FOLDER",
                       help="a folder outside the repository whose recorded files may be read (an absolute model.path); "
                            "absolute and '..' paths are refused otherwise")
    check.add_argument("--report", help="write the findings as JSON here")
    comply = commands.add_parser("compliance", help="the Track 1 rules that code can check")
    comply.add_argument("bundle", nargs="?", help="bundle folder or .tar.gz (or give --train-run and --infer-output)")
    comply.add_argument("--train-run")
    comply.add_argument("--infer-output")
    comply.add_argument("--data-card")
    comply.add_argument("--mmar-meta")
    args = parser.parse_args(argv)
    try:
        return {"bundle": _bundle, "verify": _verify, "compliance": _compliance}[args.command](args)
    except (DataError, RecipeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
