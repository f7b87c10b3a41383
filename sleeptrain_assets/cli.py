"""`sleeptrain` console script: ask the model what it learned."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sleeptrain_assets.lib.catalog import PERSONA_SYSTEM


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sleeptrain", description="Operate a SleepTrain installation.")
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser(
        "ask",
        help="answer a question with the base model and the current adapter (greedy)",
        description="Print the model's greedy answer. Default: base model + the registry's current adapter.",
    )
    ask.add_argument("question", help="the question to ask")
    which = ask.add_mutually_exclusive_group()
    which.add_argument("--adapter", metavar="VERSION|PATH", help="a registered version or an adapter folder")
    which.add_argument("--base", action="store_true", help="answer with the base model alone")
    ask.add_argument("--person", metavar="ID", help='ask in persona: system prompt "You are {name}."')
    ask.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    ask.add_argument("--model-path", default=os.environ.get("SLEEPTRAIN_BASE_MODEL", ""),
                     help="local HF model folder (default: SLEEPTRAIN_BASE_MODEL or the packaged SmolLM2)")
    ask.add_argument("--verbose", action="store_true", help="say on stderr which model and adapter answered")
    commands.add_parser("results", help="say where the adapter, memory store and leaderboard of this home are")
    return parser


def _person_name(person_id: str) -> str:
    from sleeptrain_assets.lib import settings
    from sleeptrain_assets.lib.catalog import load_people

    folder = settings.data_dir() / "people"
    people = load_people(folder)
    if person_id not in people:
        known = ", ".join(sorted(people)) or "none"
        raise SystemExit(f"sleeptrain ask: no person {person_id!r} in {folder} (known: {known})")
    return people[person_id].name


def ask(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sleeptrain_resources.llm import BaseModel
    from sleeptrain_resources.registry import AdapterRegistry, RegistryError

    messages = []
    if args.person:
        messages.append({"role": "system", "content": PERSONA_SYSTEM.format(name=_person_name(args.person))})
    messages.append({"role": "user", "content": args.question})

    registry = AdapterRegistry()
    adapter: Path | None = None
    try:
        if args.adapter:
            adapter = registry.resolve(args.adapter)
        elif not args.base:
            adapter = registry.current_path()
            if adapter is None:
                print(f"note: no current adapter in {registry.root_dir}; answering with the base model",
                      file=sys.stderr)
    except RegistryError as exc:
        raise SystemExit(f"sleeptrain ask: {exc}") from exc

    model = BaseModel(model_path=args.model_path)
    if args.verbose:
        print(f"model: {model.model_id}; adapter: {adapter or 'none (base model)'}", file=sys.stderr)
    [answer] = model.generate([messages], adapter=adapter, max_new_tokens=args.max_new_tokens)
    print(answer)
    return 0


def results(_: argparse.Namespace) -> int:
    import json

    from sleeptrain_assets.lib import settings
    from sleeptrain_resources.memory_store import memory_store_from_env
    from sleeptrain_resources.registry import AdapterRegistry

    home = settings.state_dir()
    registry = AdapterRegistry()
    reports = home / "reports"
    print(f"SleepTrain home: {home}")
    version = registry.current()
    print(f"current adapter: {version} at {registry.current_path()}" if version else "current adapter: none yet")
    store = memory_store_from_env()
    print(f"memory store:    {store.describe()} ({store.count()} active memories)")
    board = reports / "leaderboard.json"
    if board.is_file():
        print(f"leaderboard:     {reports / 'leaderboard.html'}  (rows: {board})")
        data = json.loads(board.read_text())
        for target in data.get("latest_run", {}).get("targets", []):
            state = "met" if target["met"] else "NOT met"
            print(f"  {target['label']}: {target['value']} (goal {target['goal']}, {target['detail']}): {state}")
    else:
        print("leaderboard:     not written yet (materialize `leaderboard`)")
    print('ask the model:   .venv/bin/sleeptrain ask "When was Lena Varga born?"')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from sleeptrain_resources.memory_store import MemoryStoreError, MemoryStoreUnreachable

    args = _parser().parse_args(argv)
    try:
        return {"ask": ask, "results": results}[args.command](args)
    except (MemoryStoreUnreachable, MemoryStoreError) as exc:
        # An operator's mistake or a server that is down: one line, not a driver stack.
        print(f"sleeptrain {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
