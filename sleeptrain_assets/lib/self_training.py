"""SEAL-style self-training for a sleep cycle: the model's own answers to new facts' questions, checked and
weighted by reward.

The model in service answers each trained question form of a new fact several times (sampled), with the
memory in front of it as the retrieval baseline sees it. Each answer is scored as a recall answer against the
stored value (the strict rules of lib/scoring.py: the value stated as its own phrase, not negated, no competing
value), and its reward is the hybrid score when it passes, 0 when not. The best distinct passing answers of a
question become extra training examples without the memory in the prompt, each weighted reward / number kept,
so a question adds at most one example's weight however many answers pass (reward-weighted regression over
the model's own distribution: facts learned in its own words, not in the templates' register).
Pure logic: the asset samples, embeds and trains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sleeptrain_assets.lib import scoring
from sleeptrain_assets.lib.eval_suite import retrieval_messages
from sleeptrain_assets.lib.records import EvalItem, Memory, QAPair
from sleeptrain_assets.lib.training_data import SELF_TAUGHT, TrainingExample

FACT_CATEGORY = "fact"


@dataclass(frozen=True)
class SelfTrainingPrompt:
    """One trained question of a new fact: asked with its memory in context, scored as a recall item."""

    pair: QAPair
    memory: Memory
    messages: tuple[dict[str, str], ...]  # the question, the memory added to the system message
    item: EvalItem  # what an answer is scored as

    def question_messages(self) -> list[dict[str, str]]:
        """The question as training sees it: no memory in the prompt."""
        return _question(self.pair)


def _question(pair: QAPair) -> list[dict[str, str]]:
    return [m for m in pair.messages() if m["role"] != "assistant"]


def prompts_for(
    pairs: Sequence[QAPair],
    memories: Sequence[Memory],
    names: Mapping[str, str],
    competing: Mapping[tuple[str, str], Sequence[str]] | None = None,
) -> list[SelfTrainingPrompt]:
    """One prompt per single-slot fact question among `pairs` whose (person, slot) is one of `memories`.

    `competing`: (person, slot) -> wrong values of the slot (other people's values, mined or listed wrong
    values); an answer stating one earns nothing.
    """
    by_key = {(m.person_id, m.slot): m for m in memories if m.status == "active"}
    out = []
    for pair in pairs:
        if pair.category != FACT_CATEGORY or len(pair.slots) != 1 or len(pair.values) != 1:
            continue
        memory = by_key.get((pair.person_id, pair.slots[0]))
        if memory is None:
            continue
        item = EvalItem(
            id=f"self:{pair.person_id}:{pair.template_id}:{pair.question}", kind="recall", person_id=pair.person_id,
            template_id=pair.template_id, category=pair.category, question=pair.question, expected=pair.answer,
            keywords=(memory.value,), slot=memory.slot, value=memory.value, system=pair.system,
            competing_values=tuple((competing or {}).get((pair.person_id, memory.slot), ())),
        )
        out.append(SelfTrainingPrompt(pair, memory, tuple(retrieval_messages(_question(pair), [memory], names)), item))
    return out


def reward(prompt: SelfTrainingPrompt, answer: str, similarity: float | None) -> float:
    """The hybrid recall score of a passing answer (0.7 x keywords + 0.3 x cosine to the expected answer); 0 for
    an answer the strict scorer fails (wrong, competing or negated value, or no value)."""
    verdict = scoring.score_item(prompt.item, answer, similarity)
    return round(verdict.score, 4) if verdict.passed else 0.0


def self_taught_examples(
    prompt: SelfTrainingPrompt, answers: Sequence[str], rewards: Sequence[float], keep: int = 2
) -> list[TrainingExample]:
    """The `keep` best distinct answers with a reward above 0 (ties: the shorter first), each weighted
    reward / number kept."""
    best: dict[str, tuple[float, str]] = {}
    for answer, value in zip(answers, rewards, strict=True):
        text = answer.strip()
        key = scoring.normalise(text)
        if value > 0 and key and value > best.get(key, (0.0, ""))[0]:
            best[key] = (value, text)
    chosen = sorted(best.values(), key=lambda vt: (-vt[0], len(vt[1]), vt[1]))[: max(0, keep)]
    fact = f"{prompt.pair.person_id}:{prompt.memory.slot}"
    question = tuple((m["role"], m["content"]) for m in prompt.question_messages())
    return [
        TrainingExample(messages=(*question, ("assistant", text)), source=SELF_TAUGHT,
                        person_id=prompt.pair.person_id, fact=fact, category=FACT_CATEGORY,
                        weight=round(value / len(chosen), 4))
        for value, text in chosen
    ]
