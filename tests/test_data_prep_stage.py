"""The stage framework: sharding, kill-and-resume without duplicates, reports; and mixture sampling."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from core.items import DataError
from core.recipe import DataPrepConfig, RecipeError, SourceSpec, load_recipe
from data_prep.collect import allocate, sample_mixture
from data_prep.stage import each, merge_stage, read_reports, run_stage, shard_of, stage_paths

REPO = Path(__file__).resolve().parents[1]


def write_input(path: Path, n: int) -> list[str]:
    ids = [f"r{i:04d}" for i in range(n)]
    path.write_text("".join(json.dumps({"id": rid, "value": i}) + "\n" for i, rid in enumerate(ids)))
    return ids


def double_or_reject(record: dict) -> list[dict] | str:
    """Two outputs per even value, a rejection for multiples of 5 that are odd."""
    if record["value"] % 2 == 0:
        return [{"id": f"{record['id']}-a", "v": record["value"]}, {"id": f"{record['id']}-b", "v": record["value"]}]
    return "odd_multiple_of_5" if record["value"] % 5 == 0 else "odd"


def read_output(work: Path, name: str = "toy") -> list[dict]:
    return [json.loads(l) for l in stage_paths(work, name)["output"].read_text().splitlines()]


def expected_output(ids: list[str]) -> list[str]:
    return [f"{rid}-{s}" for i, rid in enumerate(ids) if i % 2 == 0 for s in "ab"]


def test_single_run_writes_output_and_report(tmp_path):
    ids = write_input(tmp_path / "in.jsonl", 20)
    report = run_stage("toy", each(double_or_reject), tmp_path / "in.jsonl", tmp_path / "work", show_progress=False)
    assert [r["id"] for r in read_output(tmp_path / "work")] == expected_output(ids)
    assert report["in"] == 20 and report["out"] == 20 and report["rejected"] == {"odd": 8, "odd_multiple_of_5": 2}
    assert report["complete"] and report["seconds"] >= 0
    assert read_reports(tmp_path / "work")["toy"]["out"] == 20


def test_crash_then_resume_completes_without_duplicates(tmp_path):
    ids = write_input(tmp_path / "in.jsonl", 30)
    calls: Counter[str] = Counter()

    def crashing(record):
        if sum(calls.values()) == 11:
            raise RuntimeError("simulated crash")
        calls[record["id"]] += 1
        return double_or_reject(record)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage("toy", each(crashing), tmp_path / "in.jsonl", tmp_path / "work", batch_size=3, show_progress=False)
    paths = stage_paths(tmp_path / "work", "toy")
    assert not paths["output"].exists()
    journal = (paths["parts"] / "shard-00000-of-00001.jsonl").read_text().splitlines()
    assert len(journal) == 9  # three whole batches were flushed; the fourth died with the process
    with (paths["parts"] / "shard-00000-of-00001.jsonl").open("a") as handle:
        handle.write('{"id": "r0009", "out": [{"id": "r0009-')  # a kill mid-write leaves a torn line

    def counting(record):
        calls[record["id"]] += 1
        return double_or_reject(record)

    report = run_stage("toy", each(counting), tmp_path / "in.jsonl", tmp_path / "work", batch_size=3, show_progress=False)
    output = [r["id"] for r in read_output(tmp_path / "work")]
    assert output == expected_output(ids) and len(set(output)) == len(output)
    assert report["in"] == 30 and report["out"] == 30 and sum(report["rejected"].values()) == 15
    assert max(calls[rid] for rid in ids[:9]) == 1  # journaled records are not redone ...
    assert calls["r0009"] == 2 and all(calls[rid] >= 1 for rid in ids)  # ... the torn one is
    shard = json.loads((paths["parts"] / "shard-00000-of-00001.report.json").read_text())
    assert shard["resumed"] == 9 and shard["processed"] == 21


KILL_SCRIPT = """
import os, signal, sys
from data_prep.stage import each, run_stage
seen = []
def slow(record):
    seen.append(record["id"])
    if len(seen) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return [{"id": record["id"] + "-out"}]
run_stage("toy", each(slow), sys.argv[1], sys.argv[2], show_progress=False)
"""


def test_sigkill_then_resume(tmp_path):
    ids = write_input(tmp_path / "in.jsonl", 25)
    args = [sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "in.jsonl"), str(tmp_path / "work")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run(args + ["8"], cwd=REPO, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    part = tmp_path / "work" / "toy.parts" / "shard-00000-of-00001.jsonl"
    assert len(part.read_text().splitlines()) == 7
    resumed = subprocess.run(args + ["0"], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["id"] for r in read_output(tmp_path / "work")] == [f"{rid}-out" for rid in ids]


def test_shards_split_the_work_and_the_last_one_merges(tmp_path):
    ids = write_input(tmp_path / "in.jsonl", 40)
    calls: Counter[str] = Counter()

    def counting(record):
        calls[record["id"]] += 1
        return double_or_reject(record)

    first = run_stage("toy", each(counting), tmp_path / "in.jsonl", tmp_path / "work", shard="0/3", show_progress=False)
    assert first["complete"] is False and not stage_paths(tmp_path / "work", "toy")["output"].exists()
    assert first["in"] == sum(shard_of(rid, 3) == 0 for rid in ids) and 0 < first["in"] < 40
    run_stage("toy", each(counting), tmp_path / "in.jsonl", tmp_path / "work", shard="2/3", show_progress=False)
    last = run_stage("toy", each(counting), tmp_path / "in.jsonl", tmp_path / "work", shard="1/3", show_progress=False)
    assert last["complete"] and last["in"] == 40 and last["shards"] == ["0/3", "1/3", "2/3"]
    assert set(calls.values()) == {1} and len(calls) == 40
    assert [r["id"] for r in read_output(tmp_path / "work")] == expected_output(ids)  # input order, as unsharded


def test_a_shard_never_cuts_another_shards_journal(tmp_path):
    ids = write_input(tmp_path / "in.jsonl", 12)
    parts = stage_paths(tmp_path / "work", "toy")["parts"]
    parts.mkdir(parents=True)
    other = parts / "shard-00001-of-00002.jsonl"
    busy = '{"id": "r0001", "rejected": "odd"}\n{"id": "r00'  # shard 1 is mid-write right now
    other.write_text(busy)
    report = run_stage("toy", each(double_or_reject), tmp_path / "in.jsonl", tmp_path / "work", shard="0/2", show_progress=False)
    assert other.read_text() == busy and report["complete"] is False
    assert report["in"] == sum(shard_of(rid, 2) == 0 for rid in ids)


def test_duplicate_output_ids_are_dropped_and_counted(tmp_path):
    write_input(tmp_path / "in.jsonl", 6)
    report = run_stage("toy", each(lambda r: [{"id": f"clip-{r['value'] // 2}"}]), tmp_path / "in.jsonl", tmp_path / "work",
                       show_progress=False)
    assert [r["id"] for r in read_output(tmp_path / "work")] == ["clip-0", "clip-1", "clip-2"]
    assert report["rejected"] == {"duplicate_id": 3}


def test_batches_and_bad_inputs(tmp_path):
    write_input(tmp_path / "in.jsonl", 10)
    sizes = []

    def batch_fn(records):
        sizes.append(len(records))
        return [[dict(r, id=r["id"] + "-x")] for r in records]

    run_stage("toy", batch_fn, tmp_path / "in.jsonl", tmp_path / "work", batch_size=4, show_progress=False)
    assert sizes == [4, 4, 2]
    with pytest.raises(RuntimeError, match="outcomes"):
        run_stage("short", lambda rs: [], tmp_path / "in.jsonl", tmp_path / "work", show_progress=False)
    (tmp_path / "dup.jsonl").write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(DataError, match=r"dup\.jsonl:2 \(id=a\): id: duplicate of line 1"):
        run_stage("dup", each(lambda r: []), tmp_path / "dup.jsonl", tmp_path / "work", show_progress=False)
    with pytest.raises(ValueError, match="i/n"):
        run_stage("toy", each(lambda r: []), tmp_path / "in.jsonl", tmp_path / "work", shard="3", show_progress=False)
    assert merge_stage("never", tmp_path / "in.jsonl", tmp_path / "work") is None


# ---------------------------------------------------------------------------------------------
# Mixture sampling


def pools_of(sizes: dict[str, int]) -> dict[str, list[dict]]:
    return {name: [{"id": f"{name}-{i}"} for i in range(n)] for name, n in sizes.items()}


def test_mixture_counts_ratios_and_shortfall():
    pools = pools_of({"a": 100, "b": 50, "c": 10, "d": 7})
    specs = [SourceSpec(name="a", root="x", count=30), SourceSpec(name="b", root="x", ratio=0.5),
             SourceSpec(name="c", root="x", ratio=0.5), SourceSpec(name="d", root="x")]
    chosen, summary = sample_mixture(pools, specs, total=40, seed=1)
    by_source = Counter(r["id"].split("-")[0] for r in chosen)
    assert by_source == {"a": 30, "b": 20, "c": 10, "d": 7}
    assert summary["c"] == {"available": 10, "wanted": 20, "moved": 0, "selected": 10, "shortfall": 10}
    assert summary["d"]["wanted"] == 7 and len({r["id"] for r in chosen}) == len(chosen)


def test_ratios_that_sum_to_one_give_exactly_total():
    specs = [SourceSpec(name=n, root="x", ratio=1 / 3) for n in "abc"]
    wanted = allocate(specs, {n: 100 for n in "abc"}, total=10)
    assert sum(wanted.values()) == 10 and sorted(wanted.values()) == [3, 3, 4]


def test_mixture_is_deterministic_per_seed_and_per_source():
    pools = pools_of({"a": 200, "b": 200})
    specs = [SourceSpec(name="a", root="x", count=20), SourceSpec(name="b", root="x", count=20)]
    first, _ = sample_mixture(pools, specs, None, seed=7)
    again, _ = sample_mixture(pools, specs, None, seed=7)
    other, _ = sample_mixture(pools, specs, None, seed=8)
    assert first == again and first != other
    only_a, _ = sample_mixture(pools, specs[:1], None, seed=7)
    assert [r for r in first if r["id"].startswith("a-")] == only_a  # another source does not shift a's draw
    assert [int(r["id"].split("-")[1]) for r in only_a] == sorted(int(r["id"].split("-")[1]) for r in only_a)


def test_data_prep_config_validation():
    with pytest.raises(ValueError, match="not both"):
        SourceSpec(name="a", root="x", count=3, ratio=0.5)
    with pytest.raises(ValueError, match="needs data_prep.total"):
        DataPrepConfig(sources=[{"name": "a", "root": "x", "ratio": 0.5}])
    with pytest.raises(ValueError, match="add up to"):
        DataPrepConfig(total=10, sources=[{"name": "a", "root": "x", "ratio": 0.7}, {"name": "b", "root": "y", "ratio": 0.7}])
    with pytest.raises(RecipeError, match="shard"):
        load_recipe(REPO / "recipes" / "tiny.yaml", ["data_prep.shard=4/4"])
    recipe = load_recipe(REPO / "recipes" / "cogito_data.yaml")
    assert len(recipe.data_prep.sources) == 10 and sum(s.ratio for s in recipe.data_prep.sources) == pytest.approx(1.0)


def test_torn_tail_is_cut_back_to_the_last_complete_line(tmp_path):
    from data_prep.stage import _repair_torn_tail

    journal = tmp_path / "j.jsonl"
    for content, kept in [('{"a": 1}\n{"b": 2}\n{"c": 3', '{"a": 1}\n{"b": 2}\n'), ('{"a": 1}\n', '{"a": 1}\n'), ('{"torn', ""), ("", "")]:
        journal.write_text(content)
        _repair_torn_tail(journal, chunk=4)  # several reads back from the end
        assert journal.read_text() == kept
