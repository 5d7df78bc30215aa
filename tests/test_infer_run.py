import json
from pathlib import Path

import pytest

from core.answer_rule import THINKING_LENGTH_LIMIT
from core.items import load_items
from core.recipe import load_recipe
from infer.cli import main
from infer.engine import load_engine
from infer.run import RunPaths, run
from infer.submission import SUBMISSION_KEYS, read_records, validate_submission


class Interrupted(Exception):
    pass


def recipe_for(tiny_checkpoint, synthetic_dir, output, *extra):
    return load_recipe("recipes/tiny.yaml", [
        f"model.path={tiny_checkpoint}", f"infer.meta={synthetic_dir / 'test.jsonl'}", "infer.adapter=null",
        f"infer.output={output}", "infer.batch_size=4", "infer.max_new_tokens=6", "infer.min_new_tokens=6", *extra,
    ])


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, synthetic_dir, tmp_path_factory):
    return load_engine(recipe_for(tiny_checkpoint, synthetic_dir, tmp_path_factory.mktemp("e") / "s.jsonl"), device="cpu")


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_interruption_writes_each_id_once(tiny_checkpoint, synthetic_dir, tmp_path, engine):
    recipe = recipe_for(tiny_checkpoint, synthetic_dir, tmp_path / "submission.jsonl")
    paths = RunPaths.beside(recipe.infer.output)
    ids = [item.id for item in load_items(recipe.infer.meta)]

    def kill_after_first_batch(written):
        raise Interrupted(written)

    with pytest.raises(Interrupted):
        run(recipe, engine, on_batch=kill_after_first_batch)
    first = lines(paths.submission)
    assert len(first) == 4 and len(lines(paths.raw)) == 4  # the finished batch is on disk
    # a kill in the middle of the next write leaves a torn line; the raw file is one record ahead
    with paths.raw.open("a") as handle:
        handle.write(json.dumps({**lines(paths.raw)[0], "id": ids[-1]}) + "\n")
    with paths.submission.open("a") as handle:
        handle.write('{"id": "' + ids[-1] + '", "thinking_predic')

    seen = []
    summary = run(recipe, engine, on_batch=seen.append)
    pending = len(ids) - 4
    assert seen == list(range(4, pending, 4)) + [pending]  # only the missing items were answered
    final = lines(paths.submission)
    assert [r["id"] for r in final] == ids  # each id exactly once, in metadata order
    assert {r["id"]: r for r in final}[first[0]["id"]] == first[0]  # kept, not redone
    raw = lines(paths.raw)
    assert [r["id"] for r in raw] == ids
    assert all(r["n_generated_tokens"] == 6 and not r["finished"] for r in raw)
    assert summary["complete"] and summary["totals"]["done"] == len(ids)
    assert summary["totals"]["generated_tokens"] == len(ids) * 6
    assert summary["sampling"]["do_sample"] is False and summary["this_invocation"]["answered"] == pending
    assert json.loads(paths.run.read_text())["totals"] == summary["totals"]
    assert load_recipe(paths.recipe).infer.output == recipe.infer.output
    # a third run has nothing to do and changes nothing
    before = paths.submission.read_text()
    assert run(recipe, engine)["this_invocation"]["answered"] == 0
    assert paths.submission.read_text() == before
    limited = recipe.model_copy(update={"infer": recipe.infer.model_copy(update={"limit": 3})})
    assert run(limited, engine)["complete"] and paths.submission.read_text() == before
    errors, _ = validate_submission(paths.submission, recipe.infer.meta, allow_unmatched=True)
    assert errors == []


def test_submission_records_follow_the_parser(tiny_checkpoint, synthetic_dir, tmp_path, engine):
    recipe = recipe_for(tiny_checkpoint, synthetic_dir, tmp_path / "s.jsonl", "infer.limit=5")
    run(recipe, engine)
    subs, raws = lines(tmp_path / "s.jsonl"), lines(tmp_path / "s.raw.jsonl")
    assert len(subs) == 5
    # The random model mostly runs out of tokens before </think>; on an item where it writes </think>
    # first, the thinking is what precedes it.
    assert sum(raw["truncated"] for raw in raws) >= 3
    for sub, raw in zip(subs, raws):
        assert tuple(sub) == SUBMISSION_KEYS
        if raw["truncated"]:
            assert raw["rule"] in ("empty", "truncated:contains_choice", "truncated:tokens")
            assert sub["thinking_prediction"] == raw["raw_output"].replace("<think>", "").replace("</think>", "").strip()
        else:
            assert sub["thinking_prediction"] == raw["raw_output"].split("</think>")[0].replace("<think>", "").strip()


def test_output_from_another_benchmark_is_refused(tiny_checkpoint, synthetic_dir, tmp_path, engine):
    output = tmp_path / "s.jsonl"
    output.write_text('{"id": "not-here", "thinking_prediction": "", "answer_prediction": ""}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:1 \(id=not-here\): id: not in the metadata"):
        run(recipe_for(tiny_checkpoint, synthetic_dir, output), engine)


def test_read_records_repairs_only_a_torn_tail(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "tru')
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\nbroken\n{"id": "c"}\n')
    with pytest.raises(ValueError, match="x.jsonl:2"):
        read_records(path)


@pytest.fixture
def good_submission(synthetic_dir, tmp_path):
    items = load_items(synthetic_dir / "test.jsonl", check_audio=False)
    records = [{"id": i.id, "thinking_prediction": "I listened.", "answer_prediction": i.choices[-1]} for i in items]
    return items, records, tmp_path / "sub.jsonl"


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda rs, items: rs.pop(3), "id: 1 of {n} items of {meta} missing: {id3}"),
        (lambda rs, items: rs.append(dict(rs[3])), "(id={id3}): id: duplicate of line 4"),
        (lambda rs, items: rs[3].pop("answer_prediction"), "(id={id3}): answer_prediction: missing"),
        (lambda rs, items: rs[3].update(answer="x"), "(id={id3}): answer: unexpected key"),
        (lambda rs, items: rs[3].update(thinking_prediction="x" * THINKING_LENGTH_LIMIT),
         f"(id={{id3}}): thinking_prediction: {THINKING_LENGTH_LIMIT} characters, must be under"),
        (lambda rs, items: rs[3].update(thinking_prediction="<think>why</think>"),
         "(id={id3}): thinking_prediction: contains the tag <think>"),
        (lambda rs, items: rs[3].update(answer_prediction="B"), "(id={id3}): answer_prediction: 'B' is not one of its choices"),
        (lambda rs, items: rs[3].update(thinking_prediction=None), "(id={id3}): thinking_prediction: expected a string"),
        (lambda rs, items: rs[3].update(id="stranger"), "(id=stranger): id: not in"),
        (lambda rs, items: rs.insert(3, "not json"), "sub.jsonl:4: not valid JSON"),
    ],
)
def test_validator_rejects_each_kind_of_bad_submission(good_submission, synthetic_dir, capsys, corrupt, message):
    items, records, path = good_submission
    meta = synthetic_dir / "test.jsonl"
    write(path, records)
    assert validate_submission(path, meta) == ([], [])
    assert main(["validate", str(path), "--meta", str(meta)]) == 0
    corrupt(records, items)
    write(path, records)
    errors, _ = validate_submission(path, meta)
    expected = message.format(meta=meta, id3=items[3].id, n=len(items))
    assert any(expected in e for e in errors), errors
    assert main(["validate", str(path), "--meta", str(meta)]) == 1
    assert expected in capsys.readouterr().err


def test_validator_can_accept_free_answers(good_submission, synthetic_dir):
    items, records, path = good_submission
    records[0]["answer_prediction"] = "something else"
    write(path, records)
    errors, warnings = validate_submission(path, synthetic_dir / "test.jsonl", allow_unmatched=True)
    assert errors == [] and len(warnings) == 1 and f"(id={items[0].id}): answer_prediction" in warnings[0]
    assert main(["validate", str(path), "--meta", str(synthetic_dir / "test.jsonl"), "--allow-unmatched"]) == 0


def test_cli_run_reports_a_missing_adapter(tiny_checkpoint, synthetic_dir, tmp_path, capsys):
    code = main(["run", "recipes/tiny.yaml", f"model.path={tiny_checkpoint}", f"infer.meta={synthetic_dir / 'test.jsonl'}",
                 f"infer.output={tmp_path / 's.jsonl'}", f"infer.adapter={tmp_path / 'missing'}"])
    assert code == 2 and "adapter_config.json missing" in capsys.readouterr().err


@pytest.mark.slow
def test_data_parallel_workers_match_a_single_process(tiny_checkpoint, synthetic_dir, tmp_path, engine, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # workers import this tree
    single = recipe_for(tiny_checkpoint, synthetic_dir, tmp_path / "single" / "s.jsonl")
    run(single, engine)
    parallel = recipe_for(tiny_checkpoint, synthetic_dir, tmp_path / "dp" / "s.jsonl", "infer.data_parallel_size=2")
    ids = [item.id for item in load_items(parallel.infer.meta)]
    # what an interrupted earlier data-parallel run left behind: one finished record of worker 1
    (tmp_path / "dp").mkdir()
    left = {"id": ids[1], "thinking_prediction": "LEFT BY A KILLED WORKER", "answer_prediction": ""}
    (tmp_path / "dp" / "s.dp1.jsonl").write_text(json.dumps(left) + "\n")
    (tmp_path / "dp" / "s.dp1.raw.jsonl").write_text(json.dumps({**lines(tmp_path / "single" / "s.raw.jsonl")[1]}) + "\n")
    summary = run(parallel)
    merged = lines(tmp_path / "dp" / "s.jsonl")
    assert [r["id"] for r in merged] == ids and merged[1] == left
    assert merged[:1] + merged[2:] == lines(tmp_path / "single" / "s.jsonl")[:1] + lines(tmp_path / "single" / "s.jsonl")[2:]
    assert [r["id"] for r in lines(tmp_path / "dp" / "s.raw.jsonl")] == ids
    assert summary["complete"] and summary["this_invocation"]["answered"] == len(ids) - 1
    assert not list((tmp_path / "dp").glob("s.dp*.jsonl"))  # worker files folded into the main ones


def test_only_audio_question_choices_and_prompt_reach_the_model(synthetic_dir, processor):
    from core import qwen_omni as qo
    from infer.run import item_request

    item = load_items(synthetic_dir / "test.jsonl")[0]
    assert item.category and item.thinking  # present in the record...
    request = item_request(item, processor.tokenizer, "qwen", max_audio_seconds=1.0)
    assert request.prompt == qo.render_prompt(processor.tokenizer, item.question, item.choices, "qwen")
    assert item.category not in request.prompt and item.thinking not in request.prompt  # ...but never in the prompt
    assert len(request.audio) == 16_000  # cut to data.max_audio_seconds


def test_resume_check_accepts_other_no_effect_settings_and_refuses_others(tmp_path):
    from core.items import DataError
    from core.recipe import save_recipe
    from infer.run import check_resumable

    out = tmp_path / "submission.jsonl"
    paths = RunPaths.beside(out)
    save_recipe(load_recipe("recipes/tiny.yaml", [f"infer.output={out}"]), paths.recipe)
    out.write_text('{"id": "a"}\n')  # an output that holds an answer
    moved = [f"infer.output={out}", "infer.batch_size=1", "infer.limit=3", "infer.data_parallel_size=2",
             "infer.limit_mm_per_prompt.image=1", "model.experts_implementation=eager", "train.lr=1",
             "data.max_audio_seconds=5"]  # tagged NoEffect, or not read by inference
    check_resumable(paths, load_recipe("recipes/tiny.yaml", moved))
    with pytest.raises(DataError, match=r"Differing: model\.prompt_style: 'baseline' -> 'qwen'; infer\.seed: 0 -> 7\. "):
        check_resumable(paths, load_recipe("recipes/tiny.yaml", [*moved, "infer.seed=7", "model.prompt_style=qwen"]))
