"""Self-consistency: the vote on hand-made chains, the collector, and `infer run` with n chains per item end to end
(the submitted chain verbatim, every chain kept, the compliance check stating it)."""

from __future__ import annotations

import json

import pytest
import yaml

from core.items import DataError
from core.recipe import load_recipe
from infer.engine import Generation
from infer.parse import parse_output
from infer.self_consistency import ChainCollector, vote

CHOICES = ["first tone", "second tone", "third tone"]


def chains(*texts: str):
    return [parse_output(text, CHOICES) for text in texts]


def test_majority_wins_non_answers_cast_no_vote():
    result = vote(chains("<think>a</think>\n\nsecond tone", "<think>b</think>\n\nthird tone",
                         "<think>c</think>\n\nthe SECOND tone.", "<think>d</think>\n\nno idea", "<think>e</think>\n\nthird tone",
                         "<think>f</think>\n\nsecond tone"), CHOICES, "first")
    assert result.ballots == ("second tone", "third tone", "second tone", None, "third tone", "second tone")
    assert result.counts() == {"second tone": 3, "third tone": 2}
    assert (result.winner, result.chosen) == ("second tone", 0)


def test_a_tie_goes_to_the_answer_that_came_first():
    result = vote(chains("<think>x</think>\n\nthird tone", "<think>y</think>\n\nfirst tone",
                         "<think>z</think>\n\nfirst tone", "<think>w</think>\n\nthird tone"), CHOICES, "first")
    assert (result.winner, result.chosen) == ("third tone", 0)


def test_consensus_submits_the_winning_chain_closest_to_the_others():
    texts = ["<think>low beep then high beep so the second</think>\n\nsecond tone",
             "<think>the pitch rises twice, count the beeps, the second tone is highest</think>\n\nsecond tone",
             "<think>count the beeps the second tone is highest</think>\n\nsecond tone",
             "<think>count the beeps the first is highest</think>\n\nfirst tone"]
    assert vote(chains(*texts), CHOICES, "first").chosen == 0
    # chain 2 shares most words with chains 0 and 1; chain 3 (another answer) plays no part
    assert vote(chains(*texts), CHOICES, "consensus").chosen == 2


def test_no_vote_submits_chain_zero():
    result = vote(chains("<think>hmm</think>\n\nneither", "<think>hmm</think>\n\n"), CHOICES, "consensus")
    assert (result.winner, result.chosen, result.counts()) == (None, 0, {})


def test_collector_hands_over_an_item_once_all_its_chains_are_done():
    def gen(rid):
        return Generation(rid, rid, (), 0, 0, True, 0.0)

    collector = ChainCollector(3)
    assert collector.add([gen("a#sc2"), gen("b#sc0"), gen("a#sc0")]) == []
    done = collector.add([gen("b#sc1"), gen("a#sc1")])
    assert [(item, [g.id for g in got]) for item, got in done] == [("a", ["a#sc0", "a#sc1", "a#sc2"])]
    assert collector.add([gen("b#sc2")])[0][0] == "b" and collector.pending == {}


@pytest.fixture
def sc_recipe(tmp_path, tiny_checkpoint, synthetic_dir):
    recipe = {
        "model": {"path": str(tiny_checkpoint), "dtype": "float32"},
        "infer": {"meta": str(synthetic_dir / "test.jsonl"), "output": str(tmp_path / "sc" / "submission.jsonl"),
                  "batch_size": 8, "max_new_tokens": 16, "min_new_tokens": 8, "thinking_budget": None, "limit": 4,
                  "self_consistency": {"n": 3, "temperature": 1.0, "top_p": 1.0, "top_k": 0}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_infer_run_submits_a_winning_chain_verbatim_and_keeps_every_chain(sc_recipe, one_torch_thread):
    from audit.compliance import check_decoding
    from infer.run import RunPaths, run
    from infer.submission import read_records

    recipe = load_recipe(sc_recipe)
    summary = run(recipe)
    paths = RunPaths.beside(recipe.infer.output)
    submission, raw = read_records(paths.submission), {r["id"]: r for r in read_records(paths.raw)}
    assert len(submission) == 4 and summary["self_consistency"]["n"] == 3 and summary["sampling"]["do_sample"] is True
    distinct = 0
    for line in submission:
        voted = raw[line["id"]]["self_consistency"]
        assert len(voted["chains"]) == 3
        chosen = voted["chains"][voted["chosen"]]
        assert chosen["raw_output"] == raw[line["id"]]["raw_output"]  # the submitted chain, verbatim
        item_choices = None
        for record in map(json.loads, open(recipe.infer.meta)):
            if record["id"] == line["id"]:
                item_choices = record["choices"]
        parsed = parse_output(chosen["raw_output"], item_choices)
        assert (line["thinking_prediction"], line["answer_prediction"]) == (parsed.thinking, parsed.answer)
        if voted["winner"] is not None:
            assert chosen["vote"] == voted["winner"] and voted["votes"][voted["winner"]] == max(voted["votes"].values())
        assert raw[line["id"]]["n_generated_tokens"] == sum(c["n_generated_tokens"] for c in voted["chains"])
        distinct += len({c["raw_output"] for c in voted["chains"]}) > 1
    assert distinct >= 3  # sampled chains: an item's chains differ

    check = check_decoding(paths.submission)
    assert check.status == "pass" and any("SELF-CONSISTENCY ON: 3 sampled chains" in d for d in check.details)
    # a raw line whose submitted chain is not the chosen one is caught
    lines = read_records(paths.raw)
    voted = lines[0]["self_consistency"]
    voted["chains"][voted["chosen"]]["raw_output"] += " edited"
    paths.raw.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert check_decoding(paths.submission).status == "fail"


def test_resuming_with_other_chain_settings_is_refused(sc_recipe, one_torch_thread):
    from infer.run import run

    recipe = load_recipe(sc_recipe, ["infer.limit=1"])
    run(recipe)
    with pytest.raises(DataError, match=r"infer.self_consistency.n: 3 -> 5"):
        run(load_recipe(sc_recipe, ["infer.limit=2", "infer.self_consistency.n=5"]))
    with pytest.raises(DataError, match=r"infer.self_consistency"):
        run(load_recipe(sc_recipe, ["infer.limit=2", "infer.self_consistency=null"]))


def test_vllm_refuses_the_audio_attention_boost(sc_recipe):
    from infer.engine import vllm_engine_kwargs

    recipe = load_recipe(sc_recipe, ["infer.backend=vllm", "infer.mata.layers=[1]", "infer.mata.strength=2"])
    with pytest.raises(ValueError, match="infer.mata: .* infer.backend=hf only"):
        vllm_engine_kwargs(recipe)
