"""Write the small generated sample suites under data/benchmarks/samples/ (deterministic; re-run to refresh).

They follow the public suites' task shapes, generated here so they can ship with the project:
- BABILong: bAbI task 1 (single supporting fact) with the facts scattered through distractor sentences;
- InfiniteBench: passkey retrieval in repeated filler text;
- TRACE: NumGLUE-style arithmetic word problems (one of TRACE's continual-learning tasks);
- MemoryBench: facts a user mentioned across earlier chat sessions, asked back later.
Every line holds `id`, `task`, `input` and `target`. Last line printed: a JSON summary.

    python benchmarks/make_babi_samples.py [--out data/benchmarks/samples] [--n 16] [--seed 11]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEOPLE = ["Mary", "John", "Sandra", "Daniel"]
PLACES = ["bathroom", "hallway", "kitchen", "garden", "office", "bedroom"]
MOVES = ["moved to", "went to", "journeyed to", "travelled to", "went back to"]
DISTRACTORS = [
    "The clock on the wall ticked slowly.",
    "A delivery van stopped outside and drove on.",
    "Rain tapped against the windows for a while.",
    "Somebody had left a cup of tea on the table.",
    "The radio played a quiet song in another room.",
    "A cat watched the birds from the fence.",
    "The lights flickered once and then steadied.",
    "Outside, the wind moved the leaves around.",
    "A neighbour was mowing the lawn next door.",
    "The kettle clicked off in the distance.",
]
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ITEMS = ["apples", "pencils", "stamps", "marbles", "cookies", "books"]
NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lucas", "Priya"]
MEMORY_FACTS = [
    ("My dog is called {v}.", "What is my dog called?", ["Biscuit", "Pepper", "Rocket", "Mochi"]),
    ("I grew up in {v}.", "Where did I grow up?", ["Tromso", "Valencia", "Dundee", "Kyoto"]),
    ("My sister works as a {v}.", "What does my sister work as?", ["pilot", "dentist", "carpenter", "chemist"]),
    ("I am learning to play the {v}.", "Which instrument am I learning to play?", ["cello", "trumpet", "banjo", "harp"]),
]
SMALL_TALK = [
    "User: The weather was lovely today.",
    "User: I finally finished that report at work.",
    "User: Do you have any tips for sleeping better?",
    "User: I watched a documentary about glaciers.",
    "User: My commute took ages this morning.",
]


def babilong(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for index in range(n):
        facts, where = [], {}
        for _ in range(rng.randint(4, 7)):
            person, place = rng.choice(PEOPLE), rng.choice(PLACES)
            facts.append(f"{person} {rng.choice(MOVES)} the {place}.")
            where[person] = place
        asked = rng.choice(sorted(where))
        story = []
        for fact in facts:
            story += rng.sample(DISTRACTORS, rng.randint(1, 3)) + [fact]
        text = " ".join(story + rng.sample(DISTRACTORS, 2))
        rows.append({
            "id": f"babilong-qa1-{index:03d}",
            "task": "qa1_single_supporting_fact",
            "input": f"{text}\n\nQuestion: Where is {asked}? Answer with one word.",
            "target": where[asked],
        })
    return rows


def infinitebench(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for index in range(n):
        key = str(rng.randint(10000, 99999))
        before, after = rng.randint(4, 14), rng.randint(4, 14)
        text = " ".join([PASSKEY_FILLER] * before + [f"The pass key is {key}. Remember it. {key} is the pass key."]
                        + [PASSKEY_FILLER] * after)
        rows.append({
            "id": f"infinitebench-passkey-{index:03d}",
            "task": "passkey",
            "input": "There is an important piece of information hidden inside a lot of irrelevant text. Find it "
                     f"and memorize it.\n\n{text}\n\nWhat is the pass key? Answer with the number only.",
            "target": key,
        })
    return rows


def trace(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for index in range(n):
        a, b, c = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(6, 20)
        d = rng.randint(1, c - 1)
        if rng.random() < 0.5:
            text, answer = f"{a} has {c} {b}. {a} gives away {d} of them. How many {b} does {a} have now?", c - d
        else:
            text, answer = f"{a} has {c} {b} and buys {d} more. How many {b} does {a} have now?", c + d
        rows.append({
            "id": f"trace-numglue-{index:03d}",
            "task": "numglue_arithmetic",
            "input": f"{text} Answer with a number.",
            "target": str(answer),
        })
    return rows


def memorybench(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for index in range(n):
        statement, question, values = MEMORY_FACTS[index % len(MEMORY_FACTS)]
        value = rng.choice(values)
        sessions = [[line] for line in rng.sample(SMALL_TALK, 3)]
        sessions[rng.randrange(2)].append("User: " + statement.format(v=value))
        text = "\n".join(f"Session {s + 1}:\n" + "\n".join(lines) for s, lines in enumerate(sessions))
        rows.append({
            "id": f"memorybench-recall-{index:03d}",
            "task": "cross_session_recall",
            "input": f"Here are earlier chat sessions with the user.\n{text}\n\nUser: {question} Answer in one word.",
            "target": value,
        })
    return rows


SUITES = {
    "BABILong": ("babilong_qa1_sample.jsonl", babilong),
    "InfiniteBench": ("infinitebench_passkey_sample.jsonl", infinitebench),
    "TRACE": ("trace_numglue_sample.jsonl", trace),
    "MemoryBench": ("memorybench_sample.jsonl", memorybench),
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "benchmarks" / "samples")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    summary = {}
    for name, (filename, build) in SUITES.items():
        rows = build(random.Random(f"{args.seed}:{name}"), args.n)
        write_jsonl(args.out / filename, rows)
        summary[name] = {"file": str(args.out / filename), "count": len(rows),
                         "max_input_chars": max(len(r["input"]) for r in rows)}
        print(f"{name:14s} {len(rows):3d} examples -> {args.out / filename}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
