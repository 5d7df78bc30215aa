"""Build the tests' MMAR sample and facts table from the official MMAR metadata.

    python -m tools.mmar_sample data/mmar/MMAR-meta.jsonl [--out tests/data]

Writes `mmar_sample.jsonl` (whole records, copied verbatim, in the official file's order) and
`mmar_facts.json` (figures that need all 1,000 records: counts per modality, category,
sub-category and number of choices, the chance accuracy, the ids whose answer written as
"The answer is X." fails the official answer rule, and a hash of every normalised question for
the contamination tests), with the source file's sha256. The sample
holds the records the tests name, then one of each modality, sub-category and number of choices,
a few "The answer is X." failures, records whose `audio_path` is not `./audio/<id>.wav`, records
without a language, and YouTube clips cut after the start of their video. Deterministic: the
first record of the file that covers each need is taken.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

from core.answer_rule import is_correct
from data_prep.guard import normalise_question

# Records the tests refer to by id (tests/test_eval_protocol.py).
NAMED = ("qx8hrhBZJ98_00-01-32_00-02-02", "6Nd-v8lmIDc_00-00-10_00-00-30",
         "SHM5MV3oLCk_00-00-00_00-00-15", "KYGj2xHDQAg_00-00-00_00-00-17")
SOURCE = "MMAR-meta.jsonl of the MMAR benchmark (github.com/ddlBoJack/MMAR, CC-BY-NC-4.0)"


def the_answer_is_fails(record: dict) -> bool:
    return not is_correct(f"The answer is {record['answer']}.", record["answer"], record["choices"])


def question_hash(question: str) -> str:
    """The first 16 hex digits of the sha256 of the guard's normalised question: lets a test check a
    question against all of MMAR's without the questions themselves."""
    return hashlib.sha256(normalise_question(question).encode("utf-8")).hexdigest()[:16]


def youtube_cut(record: dict) -> bool:
    return "youtube.com/watch" in (record.get("url") or "") and not (record.get("timestamp") or "00:00:00").startswith("00:00:00")


def facts(records: list[dict], sha256: str) -> dict:
    def counts(key):
        return dict(sorted(Counter(r[key] for r in records).items()))

    return {
        "source": SOURCE, "sha256": sha256, "records": len(records),
        "modality": counts("modality"), "category": counts("category"), "sub-category": counts("sub-category"),
        "choices": {str(k): v for k, v in sorted(Counter(len(r["choices"]) for r in records).items())},
        "chance_accuracy_pct": round(100 * sum(1 / len(r["choices"]) for r in records) / len(records), 2),
        "the_answer_is_fails": sorted(r["id"] for r in records if the_answer_is_fails(r)),
        "question_hashes": sorted({question_hash(r["question"]) for r in records}),
    }


def sample(records: list[dict]) -> list[dict]:
    chosen: set[str] = set(NAMED)
    needs = [(f"modality={m}", lambda r, m=m: r["modality"] == m) for m in sorted({r["modality"] for r in records})]
    needs += [(f"sub-category={s}", lambda r, s=s: r["sub-category"] == s) for s in sorted({r["sub-category"] for r in records})]
    needs += [(f"choices={n}", lambda r, n=n: len(r["choices"]) == n) for n in sorted({len(r["choices"]) for r in records})]
    needs += [("the answer is fails", the_answer_is_fails)] * 4
    needs += [("audio_path off pattern", lambda r: r["audio_path"] != f"./audio/{r['id']}.wav")] * 3
    needs += [("no language", lambda r: r["language"] is None)] * 2
    needs += [("youtube cut", youtube_cut)] * 3
    for _, need in needs:
        have = sum(need(r) for r in records if r["id"] in chosen)
        wanted = sum(1 for _, n in needs if n is need)
        if have < wanted:
            chosen.add(next(r["id"] for r in records if need(r) and r["id"] not in chosen))
    # Pad to 40 with evenly spaced records, so the sample is not only edge cases.
    for r in records[::25]:
        if len(chosen) >= 40:
            break
        chosen.add(r["id"])
    return [r for r in records if r["id"] in chosen]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("meta", type=Path, help="the official MMAR-meta.jsonl (1,000 records)")
    p.add_argument("--out", type=Path, default=Path("tests/data"))
    args = p.parse_args()
    raw = args.meta.read_bytes()
    lines = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    by_id = dict(zip((r["id"] for r in records), lines))
    picked = sample(records)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mmar_sample.jsonl").write_text("".join(by_id[r["id"]] + "\n" for r in picked), encoding="utf-8")
    (args.out / "mmar_facts.json").write_text(json.dumps(facts(records, hashlib.sha256(raw).hexdigest()), indent=1) + "\n")
    print(f"{len(picked)} of {len(records)} records -> {args.out / 'mmar_sample.jsonl'}; facts -> {args.out / 'mmar_facts.json'}")


if __name__ == "__main__":
    main()
