"""Turn people and templates into day conversations, held-out evaluation items and trainable QA pairs."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence

from sleeptrain_assets.lib.catalog import (
    BUILTIN_PLACEHOLDERS,
    PLACEHOLDER as PLACEHOLDER_RE,
    PERSONA_SYSTEM,
    Template,
    TemplateSet,
    applicable,
    fill,
    format_value,
    iter_people_sorted,
    person_values,
)
from sleeptrain_assets.lib.records import (
    PROFILE_CATEGORY,
    Conversation,
    EvalItem,
    FactClaim,
    Memory,
    Person,
    Provenance,
    QAPair,
    Turn,
)

MODES = ("interview", "inline_summary", "end_summary", "correction")
FACTS_PER_CONVERSATION = 5
CORRECTIONS_PER_CONVERSATION = 3
DAY_SYSTEM = "You are a friendly assistant getting to know {name}. Listen carefully and remember what they say."
# Profile pairs: one prompt asks for everything known about a person, answered with all the person's fact
# sentences in a shuffled order (a new order per prompt). Stating the facts together and in varying orders
# ties each fact to the person's name rather than to one question wording ("knowledge augmentation",
# Allen-Zhu & Li, Physics of Language Models 3.1). These prompts are not evaluation forms.
PROFILE_PROMPTS = (
    "Tell me about {name}.",
    "Give me a short biography of {name}.",
    "Summarize the key facts about {name}.",
    "Describe {name}'s life in a few sentences.",
)
MIN_PROFILE_FACTS = 3


def _rng(seed: int, *parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _facts(template: Template, templates: TemplateSet, values: Mapping[str, str], claim: str = "true"):
    return tuple(FactClaim(slot=templates.slot(p), value=values[p], claim=claim) for p in template.fact_placeholders)


def _pick(forms: Sequence[str], index: int) -> str:
    return forms[index % len(forms)]


def eval_wrong_value(person: Person, template: Template) -> str | None:
    """The wrong value reserved for evaluation: the last one listed, never used in training."""
    wrong = person.wrong_values.get(template.wrong_key or "", [])
    return format_value(wrong[-1]) if wrong else None


def training_wrong_values(person: Person, template: Template) -> list[str]:
    wrong = [format_value(w) for w in person.wrong_values.get(template.wrong_key or "", [])]
    return wrong[:-1] if len(wrong) > 1 else wrong


def _correction_combo(template: Template, person: Person, round_no: int) -> tuple[str, str] | None:
    """Round n's (question form, wrong value): both vary first, and no pair repeats."""
    forms, wrongs = _ask_forms(template), training_wrong_values(person, template)
    combos = [(forms[f], wrongs[(f + shift) % len(wrongs)]) for shift in range(len(wrongs)) for f in range(len(forms))]
    return combos[round_no] if round_no < len(combos) else None


def _ask_forms(template: Template) -> tuple[str, ...]:
    # v2 templates have no interview prompts: the interviewer asks the trained question forms.
    return template.interview_prompts or template.questions


def _fact_turns(template: Template, templates: TemplateSet, person: Person, values: Mapping[str, str], form: int):
    question = fill(_pick(_ask_forms(template), form), values)
    facts = _facts(template, templates, values)
    prov = Provenance(person_id=person.id, template_id=template.id, facts=facts, question=question)
    return [Turn("assistant", question), Turn("user", fill(template.statement, values), prov)]


def _summary_sentence(template: Template, values: Mapping[str, str]) -> str:
    # Persona answers are in the person's first person; the assistant quotes them instead.
    if template.persona:
        return f'You told me: "{fill(template.statement, values)}"'
    return fill(template.answer, values)


def _merge_same_role(turns: list[Turn]) -> list[Turn]:
    """Chat templates expect alternating roles: join a turn to the previous one of the same role.

    Only turns where at most one side carries provenance are joined, so no fact loses its audit trail.
    """
    merged: list[Turn] = []
    for turn in turns:
        prev = merged[-1] if merged else None
        if prev and prev.role == turn.role and not (prev.provenance and turn.provenance):
            merged[-1] = Turn(turn.role, f"{prev.content} {turn.content}", prev.provenance or turn.provenance)
        else:
            merged.append(turn)
    return merged


def _conversation(person: Person, mode: str, round_no: int, index: int, turns: list[Turn]) -> Conversation:
    cid = f"{person.id}-r{round_no}-{mode}-{index}"
    system = Turn("system", DAY_SYSTEM.format(name=person.name))
    return Conversation(id=cid, person_id=person.id, mode=mode, turns=(system, *_merge_same_role(turns)))


def person_conversations(
    person: Person, templates: TemplateSet, rounds: int, seed: int
) -> list[Conversation]:
    """Every fact of a person, once per round, spread across the conversation modes of SleepTrain v2."""
    values = person_values(person, templates)
    fact_templates = [
        t for t in templates.templates.values() if t.category == "fact" and t.fact_placeholders and applicable(t, person, values)
    ]
    corrections = [t for t in templates.templates.values() if t.category == "correction" and applicable(t, person, values)]
    conversations: list[Conversation] = []
    for round_no in range(rounds):
        rng = _rng(seed, person.id, round_no)
        order = sorted(fact_templates, key=lambda t: t.id)
        rng.shuffle(order)
        chunks = [order[i : i + FACTS_PER_CONVERSATION] for i in range(0, len(order), FACTS_PER_CONVERSATION)]
        for index, chunk in enumerate(chunks):
            mode = MODES[(round_no + index) % 3]
            turns: list[Turn] = []
            for template in chunk:
                turns += _fact_turns(template, templates, person, values, form=round_no)
                if mode == "inline_summary":
                    prov = Provenance(person.id, template.id, _facts(template, templates, values))
                    turns.append(Turn("assistant", "Noted: " + fill(template.answer, values), prov))
            if mode == "end_summary":
                summary = " ".join(_summary_sentence(t, values) for t in chunk)
                facts = tuple(f for t in chunk for f in _facts(t, templates, values))
                turns.append(Turn("user", "Could you sum up what you learned about me?"))
                turns.append(Turn("assistant", "Here is what I learned: " + summary,
                                  Provenance(person.id, "end_summary", facts)))
            conversations.append(_conversation(person, mode, round_no, index, turns))
        if corrections:
            picked = sorted(corrections, key=lambda t: t.id)
            rng.shuffle(picked)
            turns = []
            for template in picked[:CORRECTIONS_PER_CONVERSATION]:
                combo = _correction_combo(template, person, round_no)
                if combo is None:
                    continue  # every (question form, wrong value) pair was already used in earlier rounds
                form, wrong = combo
                local = {**values, "wrong_value": wrong, "correct_value": values[template.correct_key or ""]}
                slot = templates.slot(template.correct_key or "")
                question = fill(form, local)
                turns.append(Turn("assistant", question,
                                  Provenance(person.id, template.id, (FactClaim(slot, wrong, "wrong"),), question)))
                turns.append(Turn("user", fill(template.statement, local),
                                  Provenance(person.id, template.id,
                                             (FactClaim(slot, local["correct_value"], "correction"),), question)))
            if turns:
                conversations.append(_conversation(person, "correction", round_no, 0, turns))
    return conversations


def interleave(groups: Mapping[str, Sequence[Conversation]], seed: int) -> list[Conversation]:
    """Round-robin across people (order reshuffled every cycle) so no person's conversations cluster."""
    queues = {pid: list(convs) for pid, convs in groups.items()}
    result: list[Conversation] = []
    cycle = 0
    last: str | None = None
    while any(queues.values()):
        order = sorted(pid for pid, q in queues.items() if q)
        _rng(seed, "interleave", cycle).shuffle(order)
        if len(order) > 1 and order[0] == last:
            order.append(order.pop(0))
        for pid in order:
            result.append(queues[pid].pop(0))
        last = order[-1]
        cycle += 1
    return result


def templated_conversations(
    people: Mapping[str, Person], templates: TemplateSet, rounds: int, seed: int
) -> list[Conversation]:
    """All day conversations, deterministic for `seed`, interleaved across people."""
    groups = {p.id: person_conversations(p, templates, rounds, seed) for p in iter_people_sorted(people)}
    return interleave(groups, seed)


def _norm(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text.casefold()).split())


def _overlaps(a: str, b: str) -> bool:
    """Whether one value is the other or lies inside it as whole words ("Leuven" / "KU Leuven")."""
    na, nb = f" {_norm(a)} ", f" {_norm(b)} "
    return bool(_norm(a)) and bool(_norm(b)) and (na in nb or nb in na)


def slot_values(people: Mapping[str, Person], templates: TemplateSet) -> dict[str, dict[str, str]]:
    """person id -> slot -> value, for every extractor a person can fill."""
    out: dict[str, dict[str, str]] = {}
    for person in iter_people_sorted(people):
        values = person_values(person, templates)
        out[person.id] = {templates.slot(p): v for p, v in values.items() if p in templates.extractors}
    return out


def competing_values(person: Person, slot: str, value: str, templates: TemplateSet,
                     by_person: Mapping[str, Mapping[str, str]]) -> tuple[str, ...]:
    """Wrong values of `slot` for `person`: other people's values of the slot and the person's listed wrong
    values, less any that equal, contain or lie inside the true value."""
    found: list[str] = []
    for other_id, slots in sorted(by_person.items()):
        if other_id != person.id and slot in slots:
            found.append(slots[slot])
    for placeholder, wrongs in sorted(person.wrong_values.items()):
        if placeholder in templates.extractors and templates.slot(placeholder) == slot:
            found += [format_value(w) for w in wrongs]
    own = set(by_person.get(person.id, {}).values())  # her residence is no wrong birth city when she names it
    kept = []
    for candidate in found:
        if not _overlaps(candidate, value) and candidate not in own and candidate not in kept:
            kept.append(candidate)
    return tuple(kept)


def _fact_group(slot: str) -> str:
    return slot.split(".")[0].split("[")[0]


def other_values(slot: str, value: str, slots: Mapping[str, str]) -> tuple[str, ...]:
    """The person's values of other slots, less those of the same fact group that hold the value: "March 3,
    1984" (birth.date) confirms the birth year, while "KU Leuven" (education.school) is no birth city."""
    return tuple(sorted({
        v for s, v in slots.items()
        if s != slot and _norm(v) != _norm(value) and not (_overlaps(v, value) and _fact_group(s) == _fact_group(slot))
    }))


def evaluation_items(people: Mapping[str, Person], templates: TemplateSet) -> list[EvalItem]:
    """Held-out questions, each in the validation or the test split; their forms are never trained.

    Kinds: recall and paraphrase (fact and identity templates), correction (a wrong claim to deny) and
    confirmation (the same question forms with the true value: a model that always says "No" fails them).
    Every item carries the slot's competing values (an answer stating one fails) and the person's other values
    (a keyword found only inside one of them is no evidence).
    """
    by_person = slot_values(people, templates)
    items: list[EvalItem] = []
    for person in iter_people_sorted(people):
        values = person_values(person, templates)
        system = PERSONA_SYSTEM.format(name=person.name)
        for template in sorted(templates.templates.values(), key=lambda t: t.id):
            if not applicable(template, person, values):
                continue
            local = dict(values)
            wrong = None
            if template.category == "correction":
                wrong = eval_wrong_value(person, template)
                local.update(wrong_value=wrong or "", correct_value=values[template.correct_key or ""])
                slot_keys = [template.correct_key or ""]
            else:
                slot_keys = list(template.fact_placeholders)
            slot = templates.slot(slot_keys[0]) if slot_keys else None
            value = local.get(slot_keys[0]) if slot_keys else None
            competing = competing_values(person, slot, value, templates, by_person) if slot and value else ()
            others = other_values(slot, value, by_person.get(person.id, {})) if slot and value else ()
            first_kind = template.category if template.category in ("correction", "identity") else "recall"
            forms = [(first_kind, q, template.answer) for q in template.eval_questions]
            if template.category == "correction":
                forms += [("confirmation", q, template.control_answer) for q in template.control_questions]
            else:
                forms += [("paraphrase", q, template.answer) for q in template.paraphrase_questions]
            for n, (kind, question, answer) in enumerate(forms):
                if kind == "correction" and not wrong:
                    continue  # no reserved wrong value for this person: nothing to deny
                items.append(
                    EvalItem(
                        id=f"{person.id}:{template.id}:{kind}:{n}",
                        kind=kind if template.category != "identity" else "identity",
                        person_id=person.id,
                        template_id=template.id,
                        category=template.category,
                        question=fill(question, local),
                        expected=fill(answer, local),
                        keywords=tuple(fill(k, local) for k in template.keywords),
                        slot=slot,
                        value=value,
                        wrong_value=wrong if kind == "correction" else None,
                        system=system if template.persona else None,
                        split=template.split_of(question),
                        competing_values=competing,
                        other_values=others,
                    )
                )
    return items


def qa_pairs(
    person: Person,
    templates: TemplateSet,
    values: Mapping[str, str],
    allowed_slots: set[str] | None = None,
    forms_per_template: int | None = None,
    confirmations: bool = True,
) -> list[QAPair]:
    """Trainable pairs for one person: the trained question forms of every fact, then the profile pairs.

    `forms_per_template` keeps only the first n trained forms of each template (None: all of them). With
    `confirmations`, a correction template with a `control_answer` is also trained on its own question forms
    asked with the true value and answered "Yes. ..." (category `confirmation`): trained on denials alone, a
    model learns to deny every claim about a person, true ones included.
    """
    pairs = []
    system = PERSONA_SYSTEM.format(name=person.name)
    for template in sorted(templates.templates.values(), key=lambda t: t.id):
        if not applicable(template, person, values):
            continue
        if template.category == "correction":
            slots = (templates.slot(template.correct_key or ""),)
            right = values[template.correct_key or ""]
            fills = [{**values, "wrong_value": w, "correct_value": right} for w in training_wrong_values(person, template)]
            if confirmations and template.control_answer:
                fills.append({**values, "wrong_value": right, "correct_value": right})
        else:
            slots = tuple(templates.slot(p) for p in template.fact_placeholders)
            fills = [dict(values)]
        if allowed_slots is not None and not set(slots) <= allowed_slots:
            continue
        for local in fills:
            confirming = template.category == "correction" and local["wrong_value"] == local["correct_value"]
            slot_values = tuple(
                local[template.correct_key or ""] if template.category == "correction" else local[p]
                for p in (template.fact_placeholders if template.category != "correction" else (template.correct_key,))
            )
            for question in template.questions[:forms_per_template]:
                pairs.append(
                    QAPair(
                        person_id=person.id,
                        template_id=template.id,
                        category="confirmation" if confirming else template.category,
                        question=fill(question, local),
                        answer=fill(template.control_answer if confirming else template.answer, local),
                        slots=slots,
                        values=slot_values,
                        system=system if template.persona else None,
                    )
                )
    return pairs + profile_pairs(person, templates, values, allowed_slots)


def profile_pairs(
    person: Person,
    templates: TemplateSet,
    values: Mapping[str, str],
    allowed_slots: set[str] | None = None,
) -> list[QAPair]:
    """One pair per `PROFILE_PROMPTS` entry: all the person's fact sentences, in a different order each.

    Only plain fact templates take part (no persona or correction forms); a sentence that leans on another
    fact ("won it in 2016" needs the award) follows that fact's sentence and is left out without it. With
    fewer than `MIN_PROFILE_FACTS` facts there is no profile to tell.
    """
    chains: dict[str, list[tuple[tuple[str, ...], tuple[str, ...], str]]] = {}
    dependent = []
    for template in sorted(templates.templates.values(), key=lambda t: t.id):
        if template.category in ("correction", "identity") or template.persona:
            continue
        if not applicable(template, person, values):
            continue
        slots = tuple(templates.slot(p) for p in template.fact_placeholders)
        if not slots or (allowed_slots is not None and not set(slots) <= allowed_slots):
            continue
        fact = (slots, tuple(values[p] for p in template.fact_placeholders), fill(template.answer, values))
        context = sorted(template.placeholders() - set(template.fact_placeholders) - BUILTIN_PLACEHOLDERS)
        if context:
            dependent.append((context, fact))
        else:
            chains[template.fact_placeholders[0]] = [fact]
    for context, fact in dependent:
        head = next((chains[c] for c in context if c in chains), None)
        if head is not None:
            head.append(fact)
    facts = [fact for chain in chains.values() for fact in chain]
    if len(facts) < MIN_PROFILE_FACTS:
        return []
    by_slot = {slot: value for fact_slots, fact_values, _ in facts for slot, value in zip(fact_slots, fact_values)}
    pairs = []
    for index, prompt in enumerate(PROFILE_PROMPTS):
        order = list(chains.values())
        _rng(index, "profile", person.id).shuffle(order)
        pairs.append(
            QAPair(
                person_id=person.id,
                template_id=PROFILE_CATEGORY,
                category=PROFILE_CATEGORY,
                question=fill(prompt, values),
                answer=" ".join(sentence for chain in order for _, _, sentence in chain),
                slots=tuple(by_slot),
                values=tuple(by_slot.values()),
            )
        )
    return pairs


def qa_pairs_for_memories(
    memories: Sequence[Memory],
    people: Mapping[str, Person],
    templates: TemplateSet,
    forms_per_template: int | None = None,
    confirmations: bool = True,
) -> list[QAPair]:
    """Trainable pairs for what the hippocampus kept: a template is used only when all its slots are memories.

    Memory values win over profile values, so a corrected fact is trained with its corrected value.
    """
    by_person: dict[str, dict[str, str]] = defaultdict(dict)
    for memory in sorted(memories, key=lambda m: (m.person_id, m.slot, -m.importance, m.id)):
        if memory.status != "active" or memory.slot in by_person[memory.person_id]:
            continue
        by_person[memory.person_id][memory.slot] = memory.value
    pairs: list[QAPair] = []
    slot_of = {p: templates.slot(p) for p in templates.extractors}
    for person_id in sorted(by_person):
        person = people.get(person_id)
        if person is None:
            continue
        values = person_values(person, templates)
        held = by_person[person_id]
        for placeholder, slot in slot_of.items():
            if slot in held:
                values[placeholder] = held[slot]
        pairs += qa_pairs(person, templates, values, allowed_slots=set(held), forms_per_template=forms_per_template,
                          confirmations=confirmations)
    return pairs


def conversation_text(conversation: Conversation) -> str:
    return "\n".join(f"{t.role}: {t.content}" for t in conversation.turns)


NGRAM = 6


def _form_words(form: str) -> list[str]:
    # Placeholders become one token each, so "{name}" never makes two forms look alike or apart.
    return _norm(PLACEHOLDER_RE.sub(" slotvalue ", form)).split()


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def leaking_test_forms(templates: TemplateSet, n: int = NGRAM) -> list[str]:
    """Test forms too close to a trained or validation form: equal after normalising, sharing an n-gram, or
    holding a shorter form whole.

    A test figure is only a test of generalisation when its wordings were never trained nor used to choose.
    """
    problems = []
    for template in sorted(templates.templates.values(), key=lambda t: t.id):
        held_out = (*template.eval_questions, *template.paraphrase_questions, *template.control_questions)
        seen = [("trained", q) for q in template.questions]
        seen += [("validation", q) for q in held_out if template.split_of(q) == "validation"]
        for test in (q for q in held_out if template.split_of(q) == "test"):
            words = _form_words(test)
            for split, other in seen:
                other_words = _form_words(other)
                if words == other_words:
                    problems.append(f"{template.source}: {template.id}: test form {test!r} is the {split} form {other!r}")
                elif len(other_words) < n and _ngrams(words, len(other_words)) & {tuple(other_words)}:
                    problems.append(f"{template.source}: {template.id}: test form {test!r} contains the {split} form "
                                    f"{other!r}")
                elif _ngrams(words, n) & _ngrams(other_words, n):
                    shared = " ".join(sorted(_ngrams(words, n) & _ngrams(other_words, n))[0])
                    problems.append(f"{template.source}: {template.id}: test form {test!r} shares {shared!r} with the "
                                    f"{split} form {other!r}")
    return problems


def split_coverage_gaps(items: Sequence[EvalItem]) -> list[str]:
    """(person, slot, kind) combinations held out in one split but not the other."""
    found: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for item in items:
        if item.person_id:
            found[(item.person_id, item.slot or item.template_id, item.kind)].add(item.split)
    return [f"{pid} / {slot} / {kind}: only {sorted(splits)}"
            for (pid, slot, kind), splits in sorted(found.items()) if splits != {"validation", "test"}]
