"""Load and validate people profiles and conversation templates (our format and SleepTrain v2's)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sleeptrain_assets.lib.records import Person

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
PATH_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
KINDS = ("real", "fictional")
CATEGORIES = ("fact", "correction", "identity")
# Placeholders filled from the person or the correction pair rather than from an extractor.
BUILTIN_PLACEHOLDERS = {"name", "wrong_value", "correct_value"}
PERSONA_SYSTEM = "You are {name}."
# Held-out question forms are split in two: validation forms choose defaults, stop training early and gate
# promotions; test forms are only reported, so no choice is ever tuned on the numbers we publish.
SPLITS = ("validation", "test")
# What an extractor's value must be. `type:` on the extractor says it; without one, a placeholder named
# `*_year` or a path ending in `.year` is a year. `text` takes anything printable.
VALUE_TYPES = ("text", "year", "number")
YEAR = re.compile(r"^-?\d{1,4}$")
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


class CatalogError(ValueError):
    """Bad input: the message names the file, the record and the field."""

    def __init__(self, file: Path | str, record: str | None, field_name: str | None, problem: str):
        where = str(file)
        if record:
            where += f", record {record!r}"
        if field_name:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {problem}")
        self.file, self.record, self.field, self.problem = str(file), record, field_name, problem


class _NoPythonTagsLoader(yaml.SafeLoader):
    """safe_load already refuses python tags; this loader only sharpens the message."""


def read_yaml(path: Path) -> Any:
    """Parse one YAML file safely; every failure names the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CatalogError(path, None, None, f"cannot be read ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CatalogError(path, None, None, f"is not UTF-8 (byte {exc.start})") from exc
    if not text.strip():
        raise CatalogError(path, None, None, "is empty")
    if "!!python" in text:
        raise CatalogError(path, None, None, "uses a !!python YAML tag, which is refused")
    try:
        data = yaml.load(text, Loader=_NoPythonTagsLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise CatalogError(path, None, None, f"is not valid YAML ({exc})") from exc
    if data is None:
        raise CatalogError(path, None, None, "is empty (it holds no data)")
    return data


def yaml_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CatalogError(folder, None, None, "folder does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        raise CatalogError(folder, None, None, "holds no .yaml files")
    return files


# --------------------------------------------------------------------------- people


def _person_from_record(path: Path, index: int, record: Any) -> Person:
    label = f"#{index}"
    if not isinstance(record, Mapping):
        raise CatalogError(path, label, None, "a person must be a mapping")
    pid = record.get("id")
    label = str(pid) if pid else label
    name = record.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CatalogError(path, label, "name", "is missing or empty")
    if not isinstance(pid, str) or not ID_PATTERN.match(pid):
        raise CatalogError(path, name, "id", f"must be a lowercase identifier, got {pid!r}")
    facts = record.get("facts")
    if not isinstance(facts, Mapping) or not facts:
        raise CatalogError(path, pid, "facts", "is missing or empty")
    kind = record.get("kind", "real")
    if kind not in KINDS:
        raise CatalogError(path, pid, "kind", f"must be one of {KINDS}, got {kind!r}")
    wrong = record.get("wrong_values", record.get("wrong_dates", {})) or {}
    if not isinstance(wrong, Mapping) or any(not isinstance(v, list) for v in wrong.values()):
        raise CatalogError(path, pid, "wrong_values", "must map a key to a list of wrong values")
    lookalikes = record.get("lookalike_of", []) or []
    if not isinstance(lookalikes, list):
        raise CatalogError(path, pid, "lookalike_of", "must be a list of person ids")
    return Person(
        id=pid,
        name=name.strip(),
        facts=dict(facts),
        wrong_values={str(k): list(v) for k, v in wrong.items()},
        kind=kind,
        lookalike_of=tuple(str(x) for x in lookalikes),
        source=str(path),
    )


def load_people(folder: Path) -> dict[str, Person]:
    """Every person in every YAML file under `folder` (one person per file, or a v2 `people:` list)."""
    people: dict[str, Person] = {}
    for path in yaml_files(folder):
        data = read_yaml(path)
        if isinstance(data, Mapping) and "people" in data:
            records = data["people"]
            if not isinstance(records, list) or not records:
                raise CatalogError(path, None, "people", "must be a non-empty list")
        elif isinstance(data, Mapping):
            records = [data]
        else:
            raise CatalogError(path, None, None, "must hold a person mapping or a `people:` list")
        for index, record in enumerate(records):
            person = _person_from_record(path, index, record)
            if person.id in people:
                raise CatalogError(
                    path, person.id, "id", f"duplicate id, already defined in {people[person.id].source}"
                )
            people[person.id] = person
    for person in people.values():
        for other in person.lookalike_of:
            if other not in people:
                raise CatalogError(person.source, person.id, "lookalike_of", f"unknown person id {other!r}")
    return people


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """One question/answer template; `slots` maps fact placeholders to their profile slots."""

    id: str
    category: str
    questions: tuple[str, ...]
    eval_questions: tuple[str, ...]
    paraphrase_questions: tuple[str, ...]
    interview_prompts: tuple[str, ...]
    statement: str
    answer: str
    keywords: tuple[str, ...]
    persona: bool
    source: str
    wrong_key: str | None = None
    correct_key: str | None = None
    fact_placeholders: tuple[str, ...] = ()
    # Held-out forms (eval, paraphrase, control) listed here are test forms; the others are validation forms.
    test_forms: tuple[str, ...] = ()
    # Correction templates: true claims ("Was {name} born in {correct_value}?") the model must confirm.
    control_questions: tuple[str, ...] = ()
    control_answer: str = ""

    def placeholders(self) -> set[str]:
        texts = [*self.questions, *self.eval_questions, *self.paraphrase_questions, *self.interview_prompts]
        texts += [self.statement, self.answer, *self.keywords, *self.control_questions]
        texts += [self.control_answer] if self.control_answer else []
        return {m for t in texts for m in PLACEHOLDER.findall(t)}

    def split_of(self, form: str) -> str:
        """`test` for a test form, else `validation`."""
        return "test" if form in self.test_forms else "validation"


@dataclass(frozen=True)
class TemplateSet:
    templates: dict[str, Template]
    extractors: dict[str, str]  # placeholder -> path under the person (e.g. facts.birth.year)
    sources: tuple[str, ...] = field(default=())
    types: dict[str, str] = field(default_factory=dict)  # placeholder -> one of VALUE_TYPES

    def slot(self, placeholder: str) -> str:
        """The fact slot a placeholder reads: its extractor path without the leading `facts.`."""
        path = self.extractors[placeholder]
        return path[len("facts.") :] if path.startswith("facts.") else path

    def templates_for_slot(self, slot: str) -> list[Template]:
        return [t for t in self.templates.values() if any(self.slot(p) == slot for p in t.fact_placeholders)]


def _str_list(path: Path, tid: str, key: str, value: Any, required: bool) -> tuple[str, ...]:
    if value is None:
        if required:
            raise CatalogError(path, tid, key, "is missing")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or any(not isinstance(v, str) or not v.strip() for v in value):
        raise CatalogError(path, tid, key, "must be a list of non-empty strings")
    if required and not value:
        raise CatalogError(path, tid, key, "is empty")
    return tuple(v.strip() for v in value)


def _split_forms(path: Path, tid: str, key: str, value: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(all forms, test forms) of a held-out list.

    ``{validation: [...], test: [...]}`` names the split of each form. A plain list (the v2 format, older
    files) alternates: first validation, second test, ...; a single form is a test form, so a reported figure
    never rests on a form that was used for choosing.
    """
    if isinstance(value, Mapping):
        unknown = sorted(set(map(str, value)) - set(SPLITS))
        if unknown:
            raise CatalogError(path, tid, key, f"splits must be {SPLITS}, got {unknown}")
        validation = _str_list(path, tid, f"{key}.validation", value.get("validation"), required=False)
        test = _str_list(path, tid, f"{key}.test", value.get("test"), required=False)
        both = set(validation) & set(test)
        if both:
            raise CatalogError(path, tid, key, f"forms in both validation and test: {sorted(both)}")
        return validation + test, test
    forms = _str_list(path, tid, key, value, required=False)
    if len(forms) == 1:
        return forms, forms
    return forms, forms[1::2]


def _template(path: Path, tid: str, spec: Any, v2_file: bool) -> Template:
    if not isinstance(spec, Mapping):
        raise CatalogError(path, tid, None, "a template must be a mapping")
    questions = _str_list(path, tid, "questions", spec.get("questions"), required=True)
    answer = spec.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise CatalogError(path, tid, "answer", "is missing or empty")
    category = spec.get("category", "fact")
    if category not in CATEGORIES:
        raise CatalogError(path, tid, "category", f"must be one of {CATEGORIES}, got {category!r}")
    eval_q, eval_test = _split_forms(path, tid, "eval_questions", spec.get("eval_questions"))
    para_q, para_test = _split_forms(path, tid, "paraphrase_questions", spec.get("paraphrase_questions"))
    control_q, control_test = _split_forms(path, tid, "control_questions", spec.get("control_questions"))
    if v2_file and not eval_q and not para_q:
        # v2 templates have no held-out forms: keep at least two trained forms, hold out the rest.
        if len(questions) >= 4:
            questions, eval_q, para_q = questions[:-2], (questions[-2],), (questions[-1],)
        elif len(questions) == 3:
            questions, eval_q = questions[:-1], (questions[-1],)
        eval_test, para_test = eval_q, para_q
    held_out = (*eval_q, *para_q, *control_q)
    overlap = set(questions) & set(held_out)
    if overlap:
        raise CatalogError(path, tid, "eval_questions", f"held-out forms also trained: {sorted(overlap)}")
    repeated = sorted({q for q in held_out if held_out.count(q) > 1})
    if repeated:
        raise CatalogError(path, tid, "eval_questions", f"held-out forms listed twice: {repeated}")
    control_answer = spec.get("control_answer", "")
    if control_q and (not isinstance(control_answer, str) or not control_answer.strip()):
        raise CatalogError(path, tid, "control_answer", "is missing: control_questions need the confirming answer")
    if control_q and category != "correction":
        raise CatalogError(path, tid, "control_questions", "only correction templates have true-claim controls")
    keywords = _str_list(path, tid, "keywords", spec.get("keywords", []), required=False)
    persona = bool(spec.get("persona", v2_file))
    statement = spec.get("statement") or answer
    return Template(
        id=tid,
        category=category,
        questions=questions,
        eval_questions=eval_q,
        paraphrase_questions=para_q,
        interview_prompts=_str_list(path, tid, "interview_prompts", spec.get("interview_prompts"), False),
        statement=str(statement).strip(),
        answer=answer.strip(),
        keywords=keywords,
        persona=persona,
        source=str(path),
        wrong_key=spec.get("wrong_key") or (tid[len("correction_") :] if category == "correction" else None),
        correct_key=spec.get("correct_key") or (tid[len("correction_") :] if category == "correction" else None),
        test_forms=(*eval_test, *para_test, *control_test),
        control_questions=control_q,
        control_answer=str(control_answer or "").strip(),
    )


def _canonical_placeholder(name: str) -> str:
    # v2 correction templates say {wrong_year}/{correct_year}; ours say {wrong_value}/{correct_value}.
    if name.startswith("wrong_"):
        return "wrong_value"
    if name.startswith("correct_"):
        return "correct_value"
    return name


def load_templates(folder: Path) -> TemplateSet:
    """Every `templates:` + `extractors:` file under `folder`, merged; ids must be unique."""
    templates: dict[str, Template] = {}
    extractors: dict[str, str] = {}
    types: dict[str, str] = {}
    sources = []
    for path in yaml_files(folder):
        data = read_yaml(path)
        if not isinstance(data, Mapping) or not isinstance(data.get("templates"), Mapping):
            raise CatalogError(path, None, "templates", "must be a mapping of template id -> template")
        raw_extractors = data.get("extractors", {}) or {}
        if not isinstance(raw_extractors, Mapping):
            raise CatalogError(path, None, "extractors", "must be a mapping of placeholder -> {path: ...}")
        for key, spec in raw_extractors.items():
            epath = spec.get("path") if isinstance(spec, Mapping) else spec
            if not isinstance(epath, str) or not epath.strip():
                raise CatalogError(path, key, "extractors.path", "is missing")
            if key in extractors and extractors[key] != epath.strip():
                raise CatalogError(path, key, "extractors.path", f"conflicts with {extractors[key]!r}")
            try:
                parse_path(epath.strip())
            except ValueError as exc:
                raise CatalogError(path, key, "extractors.path", str(exc)) from exc
            extractors[str(key)] = epath.strip()
            kind = extractor_type(str(key), epath.strip(), spec.get("type") if isinstance(spec, Mapping) else None)
            if kind not in VALUE_TYPES:
                raise CatalogError(path, key, "extractors.type", f"must be one of {VALUE_TYPES}, got {kind!r}")
            if key in types and types[str(key)] != kind:
                raise CatalogError(path, key, "extractors.type", f"conflicts with {types[str(key)]!r}")
            types[str(key)] = kind
        v2_file = not any(isinstance(s, Mapping) and "statement" in s for s in data["templates"].values())
        for tid, spec in data["templates"].items():
            tid = str(tid)
            if tid in templates:
                raise CatalogError(path, tid, None, f"duplicate template id, already in {templates[tid].source}")
            templates[tid] = _template(path, tid, spec, v2_file)
        sources.append(str(path))
    resolved: dict[str, Template] = {}
    for tid, template in templates.items():
        facts = []
        for name in sorted(template.placeholders()):
            canonical = _canonical_placeholder(name)
            if canonical in BUILTIN_PLACEHOLDERS:
                continue
            if name not in extractors:
                raise CatalogError(template.source, tid, f"{{{name}}}", "placeholder has no extractor")
            if name in PLACEHOLDER.findall(template.answer) or name in PLACEHOLDER.findall(template.statement):
                facts.append(name)
        if template.category == "correction":
            for key, label in ((template.correct_key, "correct_key"),):
                if key not in extractors:
                    raise CatalogError(template.source, tid, label, f"names no extractor ({key!r})")
        resolved[tid] = Template(**{**template.__dict__, "fact_placeholders": tuple(facts)})
    return TemplateSet(templates=resolved, extractors=extractors, sources=tuple(sources), types=types)


def extractor_type(placeholder: str, path: str, declared: Any = None) -> str:
    """The declared `type:` of an extractor, else `year` for `*_year` / `*.year`, else `text`."""
    if declared is not None:
        return str(declared)
    return "year" if placeholder.endswith("_year") or path.endswith(".year") else "text"


def value_problem(kind: str, value: Any) -> str | None:
    """Why `value` is not a `kind` (None when it is)."""
    if kind == "text":
        return None
    pattern, wanted = (YEAR, "a year written in digits (like 1984)") if kind == "year" else (NUMBER, "a number")
    if isinstance(value, bool) or not pattern.match(str(value).strip()):
        return f"must be {wanted}, got {value!r}"
    return None


# --------------------------------------------------------------------------- values


def parse_path(path: str) -> list[str | int]:
    """`facts.awards[0].name` -> ["facts", "awards", 0, "name"]."""
    tokens: list[str | int] = []
    for part in path.split("."):
        if not part:
            raise ValueError(f"path {path!r} has an empty part")
        pos = 0
        for match in PATH_TOKEN.finditer(part):
            if match.start() != pos:
                raise ValueError(f"path {path!r} is malformed near {part!r}")
            tokens.append(match.group(1) if match.group(1) else int(match.group(2)))
            pos = match.end()
        if pos != len(part):
            raise ValueError(f"path {path!r} is malformed near {part!r}")
    return tokens


_MISSING = object()


def resolve(person: Person, path: str) -> Any:
    """The value at `path` in a person's record, or raise KeyError naming what is missing."""
    node: Any = {"facts": person.facts, "name": person.name, "id": person.id}
    for token in parse_path(path):
        if isinstance(token, int):
            node = node[token] if isinstance(node, list) and token < len(node) else _MISSING
        else:
            node = node.get(token, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is _MISSING:
            raise KeyError(path)
    if node is None or (isinstance(node, str) and not node.strip()):
        raise KeyError(path)
    return node


def format_value(value: Any) -> str:
    if isinstance(value, list):
        parts = [format_value(v) for v in value]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).strip()


def person_values(person: Person, templates: TemplateSet) -> dict[str, str]:
    """Every extractor placeholder this person has a value for, formatted for text."""
    values = {"name": person.name}
    for placeholder, path in templates.extractors.items():
        try:
            values[placeholder] = format_value(resolve(person, path))
        except KeyError:
            continue
    return values


def applicable(template: Template, person: Person, values: Mapping[str, str]) -> bool:
    """A template applies to a person when every fact it needs exists (and wrong values for corrections)."""
    needed = {_canonical_placeholder(p) for p in template.placeholders()} - BUILTIN_PLACEHOLDERS
    if not needed <= values.keys():
        return False
    if template.category == "correction":
        return bool(person.wrong_values.get(template.wrong_key or "")) and template.correct_key in values
    return True


def fill(text: str, values: Mapping[str, str]) -> str:
    """Substitute placeholders; a placeholder with no value raises KeyError naming it."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        key = _canonical_placeholder(name) if name not in values else name
        if key not in values:
            raise KeyError(name)
        return values[key]

    return PLACEHOLDER.sub(sub, text)


def validate_catalog(people: Mapping[str, Person], templates: TemplateSet,
                     self_reported: Iterable[str] = ()) -> list[str]:
    """Cross-checks: every extractor path is well-formed and each person can fill some template.

    Raises CatalogError for the first broken record; returns human-readable notes for gaps that are allowed:
    a template that does not apply to a person because the person lacks that fact, a template no known person
    can fill (skipped), and a `self_reported` person (met in the inbox) whose facts fill no template yet.
    """
    notes = []
    self_reported = set(self_reported)
    used = {p for t in templates.templates.values() for p in t.placeholders()}
    for placeholder, path in sorted(templates.extractors.items()):
        if placeholder not in used:
            continue
        found = False
        for person in people.values():
            try:
                resolve(person, path)
                found = True
                break
            except KeyError:
                # A present-but-empty value is a broken profile, not an unknown path.
                _raise_if_empty(person, placeholder, path)
        if not found:
            # People added later (e.g. from the inbox) may have this fact: skip the templates, do not fail.
            users = sorted(t.id for t in templates.templates.values() if placeholder in t.placeholders())
            source = next(t.source for t in templates.templates.values() if t.id == users[0])
            notes.append(f"{source}: extractor {placeholder!r} path {path!r}: no known person has it; "
                         f"template(s) {', '.join(users)} skipped until someone does")
    for person in people.values():
        for placeholder, path in templates.extractors.items():
            if placeholder in used:
                _raise_if_empty(person, placeholder, path)
                _raise_if_mistyped(person, placeholder, path, templates.types.get(placeholder, "text"))
    for person in people.values():
        values = person_values(person, templates)
        usable = [t for t in templates.templates.values() if applicable(t, person, values)]
        if not usable and person.id in self_reported:
            notes.append(f"{person.id}: none of the facts they told fills a template yet")
            continue
        if not usable:
            raise CatalogError(person.source, person.id, "facts", "no template applies: every placeholder lacks a value")
        for template in templates.templates.values():
            if template.category == "correction" and template.wrong_key in person.wrong_values:
                correct = values.get(template.correct_key or "")
                for wrong in person.wrong_values[template.wrong_key or ""]:
                    if correct is not None and format_value(wrong) == correct:
                        raise CatalogError(
                            person.source, person.id, f"wrong_values.{template.wrong_key}",
                            f"wrong value {wrong!r} equals the true value",
                        )
        skipped = [t.id for t in templates.templates.values() if t not in usable]
        if skipped:
            notes.append(f"{person.id}: {len(skipped)} template(s) not applicable ({', '.join(skipped[:5])})")
    return notes


def _raise_if_empty(person: Person, placeholder: str, path: str) -> None:
    """A slot that exists but holds nothing: the placeholder would render as no value."""
    node: Any = {"facts": person.facts}
    for token in parse_path(path):
        if isinstance(token, int):
            if not isinstance(node, list) or token >= len(node):
                return
            node = node[token]
        else:
            if not isinstance(node, Mapping) or token not in node:
                return
            node = node[token]
    if node is None or (isinstance(node, str) and not node.strip()) or node == []:
        raise CatalogError(person.source, person.id, path,
                           f"placeholder {{{placeholder}}} has no value (the field is empty)")


def _raise_if_mistyped(person: Person, placeholder: str, path: str, kind: str) -> None:
    """A value that is not what its extractor's type says (`year: "nineteen"`), or such a wrong value."""
    try:
        value = resolve(person, path)
    except KeyError:
        return
    problem = value_problem(kind, value)
    if problem:
        raise CatalogError(person.source, person.id, path, f"placeholder {{{placeholder}}} {problem}")
    for i, wrong in enumerate(person.wrong_values.get(placeholder, [])):
        problem = value_problem(kind, wrong)
        if problem:
            raise CatalogError(person.source, person.id, f"wrong_values.{placeholder}[{i}]", problem)


def iter_people_sorted(people: Mapping[str, Person]) -> Iterable[Person]:
    return (people[k] for k in sorted(people))
