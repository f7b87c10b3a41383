"""SEAL-style self-training: the model's own answers to new facts' questions, scored, kept and weighted by reward;
the trainer's per-example weights; sampled answers from the real SmolLM2."""

from __future__ import annotations

import pytest

from sleeptrain_assets.lib import self_training
from sleeptrain_assets.lib.records import Memory, QAPair
from sleeptrain_assets.lib.training_data import SELF_TAUGHT, build_training_set

NAMES = {"saskia_claes": "Saskia Claes"}
YEAR = Memory("m1", "saskia_claes", "birth.year", "1979", "I was born in Ghent in 1979.", (), 0.9, "c1#0")
PAIRS = [
    QAPair("saskia_claes", "birth_year", "fact", "When was Saskia Claes born?", "Saskia Claes was born in 1979.",
           ("birth.year",), ("1979",)),
    QAPair("saskia_claes", "birth_city", "fact", "Where was Saskia Claes born?", "Saskia Claes was born in Ghent.",
           ("birth.city",), ("Ghent",)),  # no memory of this slot here: no prompt
    QAPair("saskia_claes", "birth_year_fix", "correction", "Saskia Claes was born in 1981, right?",
           "No. Saskia Claes was born in 1979.", ("birth.year",), ("1979",)),  # not a plain fact question
]


def _prompt():
    [prompt] = self_training.prompts_for(PAIRS, [YEAR], NAMES, {("saskia_claes", "birth.year"): ["1981", "1991"]})
    return prompt


def test_a_prompt_asks_a_fact_question_with_its_memory_in_context_and_trains_without_it() -> None:
    prompt = _prompt()
    assert prompt.pair is PAIRS[0] and prompt.memory is YEAR
    system = prompt.messages[0]
    assert system["role"] == "system" and "Saskia Claes: I was born in Ghent in 1979." in system["content"]
    assert prompt.messages[-1] == {"role": "user", "content": "When was Saskia Claes born?"}
    assert prompt.question_messages() == [{"role": "user", "content": "When was Saskia Claes born?"}]
    superseded = Memory("m0", "saskia_claes", "birth.year", "1977", "I was born in 1977.", (), 0.9, "c0#0",
                        status="superseded")
    assert self_training.prompts_for(PAIRS, [superseded], NAMES) == []


@pytest.mark.parametrize("answer, rewarded", [
    ("Saskia Claes was born in 1979.", True),
    ("She was born in 1979 in Ghent, Belgium.", True),
    ("Saskia Claes was born in 1981.", False),  # a competing value
    ("She was born in 1979, or maybe 1991.", False),  # the right value beside a competing one
    ("Saskia Claes was not born in 1979.", False),  # negated
    ("I don't know when Saskia Claes was born.", False),
])
def test_only_answers_the_strict_scorer_passes_earn_a_reward(answer: str, rewarded: bool) -> None:
    value = self_training.reward(_prompt(), answer, similarity=0.8)
    assert (value > 0) is rewarded
    if rewarded:
        assert value == pytest.approx(0.7 + 0.3 * 0.8)  # the hybrid score: every keyword and the cosine


def test_the_best_distinct_passing_answers_are_kept_and_share_one_examples_weight() -> None:
    prompt = _prompt()
    answers = ["Saskia Claes was born in 1979.", "saskia claes was born in 1979", "She was born in 1979.",
               "Saskia Claes was born in 1981.", "Born in 1979, she grew up in Ghent."]
    rewards = [0.9, 0.95, 0.8, 0.0, 0.7]
    examples = self_training.self_taught_examples(prompt, answers, rewards, keep=2)
    assert [e.answer for e in examples] == ["saskia claes was born in 1979", "She was born in 1979."]
    assert [e.weight for e in examples] == [0.475, 0.4]  # reward / number kept
    assert all(e.source == SELF_TAUGHT and e.fact == "saskia_claes:birth.year" for e in examples)
    assert all(e.prompt_messages() == prompt.question_messages() for e in examples), "no memory in the prompt"
    assert self_training.self_taught_examples(prompt, answers[3:4], rewards[3:4]) == []
    training = build_training_set(PAIRS[:1], seed=1, self_taught=examples)
    assert training.stats()["by_source"][SELF_TAUGHT] == 2 and training.stats()["replay_share"] == 0.0
    assert {e.weight for e in training.examples} == {1.0, 0.475, 0.4}


@pytest.mark.slow
def test_example_weights_scale_each_examples_share_of_a_packed_batchs_loss() -> None:
    import torch

    from sleeptrain_resources.llm import BaseModel
    from sleeptrain_resources.trainer import _collate, encode_examples, training_loss
    from tests.lora_helpers import qa_pairs

    story = ("Odo Brannagh keeps bees on the cliffs above Tralee, sells the honey at the Saturday market, repairs "
             "old hives for neighbours and writes a short letter about the season every autumn. In winter he mends "
             "the frames, counts the colonies that survived the storms, and teaches two children from the village "
             "how to read a hive without disturbing the queen.")
    long_one = QAPair("odo_brannagh", "story", "fact", "Tell me about Odo Brannagh.", story, ("hobby.name",),
                      ("beekeeping",))  # long enough for short examples to share its row
    examples = build_training_set([*qa_pairs()[:5], long_one], replay_share=0.0, seed=3).examples
    model, tokenizer = BaseModel().load_fresh()
    encoded, dropped = encode_examples(tokenizer, examples, 256)
    assert not dropped
    lengths = sorted(len(ids) for ids, _, _ in encoded)
    assert lengths[0] + lengths[1] <= lengths[-1], f"nothing to pack: {lengths}"
    pad = tokenizer.eos_token_id
    weights = [1.0, 0.0, 0.5, 2.0, 1.0, 0.25]
    with torch.no_grad():
        alone = []  # each example's summed answer-token loss and its token count
        for i in range(len(encoded)):
            batch = _collate(encoded, [i], pad, "cpu")
            alone.append((float(training_loss(model, batch, 0.0)[0]) * batch.targets.numel(), batch.targets.numel()))
        batch = _collate(encoded, list(range(len(encoded))), pad, "cpu", pack=True, weights=weights)
        weighted = float(training_loss(model, batch, 0.0)[0])
        plain = float(training_loss(model, _collate(encoded, list(range(len(encoded))), pad, "cpu", pack=True), 0.0)[0])
    tokens = sum(n for _, n in alone)
    assert batch.position_ids is not None, "the batch is packed, so the weights must follow each example's tokens"
    assert weighted == pytest.approx(sum(w * s for w, (s, _) in zip(weights, alone)) / tokens, rel=1e-4)
    assert plain == pytest.approx(sum(s for s, _ in alone) / tokens, rel=1e-4)


@pytest.mark.slow
def test_sampled_answers_are_several_reproducible_and_leave_the_global_random_state_alone() -> None:
    import torch

    from sleeptrain_resources.llm import BaseModel

    model = BaseModel()
    asks = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Name a fruit."}]]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = model.sample(asks, 4, max_new_tokens=12, seed=5)
    assert torch.equal(torch.rand(1), before), "sampling must not move the caller's random state"
    assert [len(a) for a in first] == [4, 4] and all(isinstance(t, str) and t for a in first for t in a)
    assert model.sample(asks, 4, max_new_tokens=12, seed=5) == first
    assert model.sample(asks, 4, max_new_tokens=12, seed=6) != first
    assert len(set(first[0])) > 1, "four samples at temperature 0.8 are not all the same"
