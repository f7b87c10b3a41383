"""`sleeptrain` console script: ask the model what it learned; operate sleep cycles and the adapter registry."""

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
    commands.add_parser("status", help="champion, versions, the last cycles and their decisions, what waits in the inbox")
    commands.add_parser("versions", help="every registered adapter version, its source cycle and hash")
    rollback = commands.add_parser("rollback", help="make an earlier version the champion again (audited)")
    rollback.add_argument("version", help="a registered version, e.g. v0002-1a2b3c4d")
    rollback.add_argument("--reason", default="", help="why, recorded in the registry history")
    cycle = commands.add_parser(
        "cycle", help="run one sleep cycle on what is new in the inbox, as the sensor would, and wait for it",
        description="Exit 0 when the challenger was promoted or rejected (or nothing was new), 1 when the cycle failed.")
    cycle.add_argument("--dry-run", action="store_true", help="train and evaluate, promote nothing")
    cycle.add_argument("--baseline-version", metavar="V", help="start from and compare with V instead of the champion")
    cycle.add_argument("--hard-cases", action=argparse.BooleanOptionalAction, default=None,
                       help="mine wrong values for people who list none, as correction pairs and items "
                       "(default: the profile's cycle_hard_cases)")
    cycle.add_argument("--self-training", action=argparse.BooleanOptionalAction, default=None,
                       help="SEAL-style: also train on the model's own answers to the new facts' questions that "
                       "the scorer passes, weighted by reward (default: the profile's cycle_self_training)")
    return parser


def _person_name(person_id: str) -> str:
    from sleeptrain_assets.lib import settings
    from sleeptrain_assets.lib.learned_people import learned_people_dir, load_all_people

    people, _ = load_all_people()
    if person_id not in people:
        known = ", ".join(sorted(people)) or "none"
        raise SystemExit(f"sleeptrain ask: no person {person_id!r} in {settings.data_dir() / 'people'} or "
                         f"{learned_people_dir()} (known: {known})")
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


def _cycle_reports(limit: int | None = None) -> list[dict]:
    import json

    from sleeptrain_assets.lib import settings

    folder = settings.state_dir() / "cycles"
    reports = []
    for path in sorted(folder.glob("cycle-*/report.json"))[-limit if limit else None:]:
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError:
            reports.append({"cycle": path.parent.name, "status": "unreadable report"})
    return reports


def status(_: argparse.Namespace) -> int:
    from sleeptrain_assets.lib import inbox
    from sleeptrain_resources.registry import AdapterRegistry

    registry = AdapterRegistry()
    champion = registry.current()
    versions = registry.versions()
    sha = registry.manifest(champion).get("adapter_sha256", "")[:12] if champion else ""
    print(f"champion: {champion or 'none (base model)'}" + (f" (sha256 {sha})" if sha else ""))
    print(f"versions: {len(versions)} in {registry.root_dir}")
    reports = _cycle_reports(limit=10)
    print(f"last cycles ({len(reports)}):" if reports else "cycles: none yet")
    for report in reports:
        decision = report.get("decision") or {}
        reason = (decision.get("reasons") or [report.get("failure", {}).get("message", "")])[0]
        print(f"  {report.get('cycle')}  {report.get('status', '?'):<16} {report.get('time', '')}  "
              f"promoted: {report.get('promoted_version') or '-'}  {reason[:160]}")
    seen = inbox.ledger_seen(inbox.load_ledger())
    waiting = [p.name for p in inbox.inbox_files(inbox.inbox_dir()) if seen.get(p.name) != inbox.sha256_bytes(p.read_bytes())]
    print(f"inbox: {len(waiting)} file(s) not yet taken in {inbox.inbox_dir()}" + (f": {', '.join(waiting)}" if waiting else ""))
    return 0


def versions(_: argparse.Namespace) -> int:
    from sleeptrain_resources.registry import AdapterRegistry

    registry = AdapterRegistry()
    champion = registry.current()
    for version in registry.versions():
        manifest = registry.manifest(version)
        mark = "*" if version == champion else " "
        print(f"{mark} {version}  created {manifest.get('created_at', '?')}  cycle {manifest.get('cycle', '-')}  "
              f"from {manifest.get('previous_version') or 'base'}  sha256 {manifest.get('adapter_sha256', '')[:12]}")
    reigns = registry.champions()
    if reigns:
        print("champions (who was current when, and why):")
        for reign in reigns:
            print(f"  {reign['version']}  {reign['since']} -> {reign['until'] or 'now'}  {reign['reason']}")
    return 0


def rollback(args: argparse.Namespace) -> int:
    import getpass

    from sleeptrain_resources.registry import AdapterRegistry, RegistryError

    registry = AdapterRegistry()
    before = registry.current()
    reason = f"rollback by {getpass.getuser()} via `sleeptrain rollback`" + (f": {args.reason}" if args.reason else "")
    try:
        registry.rollback(args.version, reason=reason)
    except RegistryError as exc:
        raise SystemExit(f"sleeptrain rollback: {exc}") from exc
    print(f"champion: {before or 'none'} -> {registry.current()} ({reason})")
    return 0


def cycle(args: argparse.Namespace) -> int:
    import dagster as dg

    from sleeptrain_assets.lib import settings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Dynamic partitions need a persistent instance: the same home `make dev` uses unless DAGSTER_HOME says else.
    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(settings.state_subdir("dagster"))
    from sleeptrain_assets.defs.cycles import run_cycle_now

    with dg.DagsterInstance.get() as instance:
        key, skipped, result = run_cycle_now(instance, dry_run=args.dry_run, baseline_version=args.baseline_version,
                                             hard_cases=args.hard_cases, self_training=args.self_training)
    if key is None:
        print(f"no cycle: {skipped}")
        return 0
    report = next((r for r in _cycle_reports() if r.get("cycle") == key), {})
    decision = report.get("decision") or {}
    print(f"{key}: {report.get('status', 'unknown')}" + (f"; promoted {report['promoted_version']}"
                                                         if report.get("promoted_version") else ""))
    for reason in decision.get("reasons", []):
        print(f"  - {reason}")
    print(f"report: {settings.state_dir() / 'cycles' / key / 'report.md'}")
    if report.get("status") in ("promoted", "rejected", "dry run", "nothing to learn"):
        return 0
    print(f"the cycle failed: {report.get('failure', {}).get('message', 'see the run in Dagster')}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    from sleeptrain_resources.memory_store import MemoryStoreError, MemoryStoreUnreachable

    args = _parser().parse_args(argv)
    commands = {"ask": ask, "results": results, "status": status, "versions": versions, "rollback": rollback,
                "cycle": cycle}
    try:
        return commands[args.command](args)
    except (MemoryStoreUnreachable, MemoryStoreError) as exc:
        # An operator's mistake or a server that is down: one line, not a driver stack.
        print(f"sleeptrain {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
