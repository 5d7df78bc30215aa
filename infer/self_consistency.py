"""Self-consistency (`infer.self_consistency`): n sampled chains per item, a vote, one chain submitted.

Every chain of an item is a request of its own (`ID#sc<k>`) in the same engine call, so both engines
batch them with everything else. The vote counts each chain's answer as the choice the official answer
rule accepts it for (core.answer_rule, through infer.parse.official_choices); an answer the rule accepts
for no single choice casts no vote. The winning choice has the most votes, a tie going to the choice
whose first chain comes first. The submitted chain is one whose answer won, unedited (the submission
holds only what the model wrote): under `consensus` the one whose thinking shares the most words with
the other winning chains (mean Jaccard similarity of their word sets), under `first` the lowest-numbered;
ties go to the lower number. When no chain votes, chain 0 is submitted. The raw file keeps every chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from core.answer_rule import answer_tokens
from core.items import Item
from core.recipe import SelfConsistencyConfig
from infer.engine import Generation, Request, SamplingConfig
from infer.parse import Parsed, official_choices, parse_output

CHAIN = "#sc"  # request id = item id + CHAIN + chain number


def chain_requests(requests: Sequence[Request], n: int) -> list[Request]:
    return [Request(f"{r.id}{CHAIN}{k}", r.prompt, r.audio) for r in requests for k in range(n)]


def chain_sampling(sampling: SamplingConfig, sc: SelfConsistencyConfig) -> SamplingConfig:
    """The run's settings (budget, lengths, seed) with the chains' sampling."""
    return sampling.replace(do_sample=True, temperature=sc.temperature, top_p=sc.top_p, top_k=sc.top_k)


class ChainCollector:
    """Gathers generations by item; hands an item over once all its n chains are done (in any batch order)."""

    def __init__(self, n: int):
        self.n = n
        self.pending: dict[str, dict[int, Generation]] = {}

    def add(self, batch: Sequence[Generation]) -> list[tuple[str, list[Generation]]]:
        complete = []
        for generation in batch:
            item_id, _, k = generation.id.rpartition(CHAIN)
            chains = self.pending.setdefault(item_id, {})
            chains[int(k)] = generation
            if len(chains) == self.n:
                complete.append((item_id, [chains[i] for i in range(self.n)]))
                del self.pending[item_id]
        return complete


@dataclass(frozen=True)
class Vote:
    ballots: tuple[str | None, ...]  # per chain: the choice it voted for, None: no vote
    winner: str | None
    chosen: int  # the submitted chain

    def counts(self) -> dict[str, int]:
        counted: dict[str, int] = {}
        for ballot in self.ballots:
            if ballot is not None:
                counted[ballot] = counted.get(ballot, 0) + 1
        return counted


def ballot(parsed: Parsed, choices: Sequence[str]) -> str | None:
    accepted = official_choices(parsed.answer, choices)
    return choices[accepted[0]] if accepted else None


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def vote(parsed: Sequence[Parsed], choices: Sequence[str], selection: str) -> Vote:
    ballots = tuple(ballot(p, choices) for p in parsed)
    counts: dict[str, int] = {}
    for b in ballots:
        if b is not None:
            counts[b] = counts.get(b, 0) + 1
    if not counts:
        return Vote(ballots, None, 0)
    winner = max(counts, key=lambda c: (counts[c], -ballots.index(c)))
    winning = [k for k, b in enumerate(ballots) if b == winner]
    if selection == "first" or len(winning) == 1:
        return Vote(ballots, winner, winning[0])
    words = {k: answer_tokens(parsed[k].thinking) for k in winning}
    agreement = {k: sum(jaccard(words[k], words[j]) for j in winning if j != k) for k in winning}
    return Vote(ballots, winner, max(winning, key=lambda k: (agreement[k], -k)))


def vote_chains(item: Item, chains: Sequence[Generation], selection: str) -> tuple[Generation, dict]:
    """(the chain to submit, what the item's raw line adds: every chain and the vote, and token and time totals over
    every chain, the item's cost)."""
    parsed = [parse_output(g.text, item.choices) for g in chains]
    result = vote(parsed, item.choices, selection)
    return chains[result.chosen], {
        "n_generated_tokens": sum(g.n_generated_tokens for g in chains),
        "seconds": round(sum(g.seconds for g in chains), 4),
        "self_consistency": {
            "votes": result.counts(), "winner": result.winner, "chosen": result.chosen,
            "chains": [{"raw_output": g.text, "answer_text": p.answer_text, "vote": b, "finished": g.finished,
                        "n_generated_tokens": g.n_generated_tokens} for g, p, b in zip(chains, parsed, result.ballots)],
        },
    }
