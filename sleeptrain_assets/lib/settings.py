"""Where SleepTrain reads its inputs and writes its state, and how big a run is.

Two folders and one size switch, all from the environment:
- ``SLEEPTRAIN_DATA_DIR``: inputs (``people/``, ``templates/``, ``benchmarks/``, ``inbox/``), default ``./data``.
- ``SLEEPTRAIN_HOME``: everything generated (adapters, registry, local store, caches, reports, the
  Dagster home), default ``./.sleeptrain``.
- ``SLEEPTRAIN_PROFILE``: ``smoke`` (CI-sized) or ``default`` (the real demo).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Defaults shipped with SleepTrain for the `benchmarks/` inputs a data folder may leave out.
SHIPPED_BENCHMARKS = PROJECT_ROOT / "data" / "benchmarks"
# Every benchmarks/ file a full run reads (training: replay prompts; evaluation: the rest).
BENCHMARK_FILES = ("replay_prompts.yaml", "general_knowledge.yaml", "unknown_people.yaml", "paths.yaml")


def _from_env(name: str, default: Path) -> Path:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser().resolve() if value else default


def data_dir() -> Path:
    """Input folder; relative paths resolve against the working directory."""
    default = Path.cwd() / "data"
    # `./data` is the documented default; fall back to the checkout's data when run from elsewhere.
    if not default.is_dir():
        default = PROJECT_ROOT / "data"
    return _from_env("SLEEPTRAIN_DATA_DIR", default.resolve())


def benchmark_path(name: str) -> Path:
    """The data folder's ``benchmarks/<name>`` if present, else the default shipped with SleepTrain."""
    own = data_dir() / "benchmarks" / name
    if own.exists():
        return own
    shipped = SHIPPED_BENCHMARKS / name
    if shipped.exists():
        return shipped
    raise FileNotFoundError(f"benchmarks/{name}: not in {own.parent} and no default shipped at {shipped}")


def missing_inputs() -> list[str]:
    """What a full run needs and cannot find (people, templates, benchmark files), one line each."""
    root = data_dir()
    missing = []
    for folder in ("people", "templates"):
        path = root / folder
        if not path.is_dir() or not any(p.suffix in (".yaml", ".yml") for p in path.rglob("*")):
            missing.append(f"{path}: no {folder} (.yaml files) in SLEEPTRAIN_DATA_DIR={root}")
    for name in BENCHMARK_FILES:
        try:
            benchmark_path(name)
        except FileNotFoundError as exc:
            missing.append(str(exc))
    return missing


def state_dir() -> Path:
    """Generated-state folder (created on first use)."""
    path = _from_env("SLEEPTRAIN_HOME", (Path.cwd() / ".sleeptrain").resolve())
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_subdir(*parts: str) -> Path:
    path = state_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str | None:
    """Postgres URL of the memory store when the user points SleepTrain at one, else None."""
    url = os.environ.get("SLEEPTRAIN_DATABASE_URL", "").strip()
    return url or None


@dataclass(frozen=True)
class ProfileSettings:
    """Sizes of one run; `smoke` keeps every stage real but small."""

    name: str
    seed: int = 7
    # templated conversations
    conversation_rounds: int = 3  # each round covers every fact of every person once
    max_same_person_run: int = 2
    min_paraphrases_per_fact: int = 2
    max_person_imbalance: float = 3.0
    near_duplicate_threshold: float = 0.97
    max_seq_len: int = 256
    # training: passes over the training set, optionally capped at a number of optimizer steps
    train_epochs: float = 3.0
    train_max_steps: int | None = None
    train_batch_size: int = 8
    learning_rate: float = 1e-3
    lora_rank: int = 16
    lora_alpha: int = 32
    replay_share: float = 0.25
    # continuing from an adapter: replay at least one pair of every fact already in its weights (up to as many
    # as the new pairs), so a small training set does not overwrite the facts it leaves out
    replay_every_older_fact: bool = True
    # trained question forms per template used in training, in the order listed (None: every listed form)
    trained_forms_per_template: int | None = 3
    # correction templates also train their forms asked with the true value, answered "Yes" (true-claim pairs)
    train_confirmations: bool = True
    # sleep cycles: mine wrong values for people who list none (lib/hard_cases.py), as correction pairs and items
    cycle_hard_cases: bool = False
    # sleep cycles: passes over a challenger's training set (new memories plus bounded replay; a cycle's set is
    # small, so it needs more passes than the first adapter's). Chosen on validation items with
    # benchmarks/cycle_variants.py (docs/ARCHITECTURE.md).
    cycle_train_epochs: float = 6.0
    # sleep cycles: replay share of a challenger that continues from a champion (its facts and general prompts;
    # a first challenger keeps `replay_share`). Chosen on validation items (benchmarks/cycle_variants.py).
    cycle_continued_replay_share: float = 0.5
    # sleep cycles: SEAL-style self-training (lib/self_training.py): the model's own reward-checked answers
    cycle_self_training: bool = False
    # replay targets: the base model answers the replay prompts once; top-k log-probs feed the locality term
    replay_max_new_tokens: int = 64
    replay_top_k: int = 16
    replay_max_prompts: int | None = None
    # chosen on the validation split (benchmarks/locality_ablation.py; docs/ARCHITECTURE.md): KL + SFT on replay
    locality_kl: bool = True
    locality_kl_weight: float = 1.0
    locality_sft: bool = True
    # evaluation: held-out questions are chosen per kind, split and slot (people in turn, so every slot and every
    # person is covered); ~480 prompts per system keep CPU evaluation of adapter, base and retrieval near 9 min.
    eval_items_per_slot: int | None = 4
    # cap per kind and split of every kind (held-out questions after the per-slot choice); None: all
    eval_max_items_per_kind: int | None = None
    # multi-turn: one conversation per taught person, at most this many
    eval_max_conversations: int | None = None
    max_new_tokens: int = 40
    retrieval_top_k: int = 3


PROFILES: dict[str, ProfileSettings] = {
    # 600 steps keep `make run` as long as before the true-claim pairs were added (596 steps then)
    "default": ProfileSettings(name="default", train_max_steps=600),
    "smoke": ProfileSettings(
        name="smoke",
        conversation_rounds=2,
        train_max_steps=4,
        train_batch_size=4,
        max_seq_len=192,
        eval_items_per_slot=1,
        eval_max_items_per_kind=6,
        eval_max_conversations=2,
        max_new_tokens=32,
        replay_max_new_tokens=24,
        replay_max_prompts=24,
    ),
}


def training_steps(examples: int, batch_size: int, epochs: float, cap: int | None = None) -> int:
    """Optimizer steps for `epochs` passes over `examples` (at least one step), at most `cap`."""
    steps = max(1, math.ceil(epochs * examples / max(1, batch_size)))
    return min(steps, cap) if cap else steps


def profile() -> ProfileSettings:
    """The profile named by ``SLEEPTRAIN_PROFILE`` (default: ``default``)."""
    name = os.environ.get("SLEEPTRAIN_PROFILE", "default").strip() or "default"
    if name not in PROFILES:
        raise ValueError(
            f"SLEEPTRAIN_PROFILE={name!r} is not a known profile; choose one of {sorted(PROFILES)}"
        )
    return PROFILES[name]


def with_overrides(settings: ProfileSettings, **overrides: object) -> ProfileSettings:
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def model_cache_dir() -> Path:
    """Converted base-model copies; ``SLEEPTRAIN_MODEL_CACHE`` lets several homes (and tests) share one."""
    override = os.environ.get("SLEEPTRAIN_MODEL_CACHE", "").strip()
    path = Path(override).expanduser().resolve() if override else state_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
