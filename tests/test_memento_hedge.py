"""Memento consolidation and the Hedge routing policy (synthetic rewards stand in for benchmark deltas)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sleeptrain_assets.lib.hedge import ACTIONS, HedgeConfig, HedgePolicy, clip_distribution
from sleeptrain_assets.lib.memento import MementoPolicy, consolidate, summarize
from sleeptrain_assets.lib.records import Memory
from sleeptrain_resources.embedding import DIM
from sleeptrain_resources.memory_store import LocalMemoryStore, StatusChange


def unit(v: np.ndarray) -> tuple[float, ...]:
    return tuple((v / np.linalg.norm(v)).astype(np.float32).tolist())


def mem(mid: str, importance: float, vector: np.ndarray, value: str = "x", person: str = "p",
        created: str = "2026-01-01T00:00:00") -> Memory:
    return Memory(id=mid, person_id=person, slot=f"slot.{mid}", value=value, text=f"text {mid}",
                  embedding=unit(vector), importance=importance, source="c#0", created_at=created)


@pytest.fixture
def vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((6, DIM)).astype(np.float32)


# --------------------------------------------------------------------------- Memento


def test_memento_promotes_evicts_and_merges_with_reasons(vectors: np.ndarray) -> None:
    twin = vectors[0] + 0.05 * vectors[1]
    memories = [
        mem("strong", 8.0, vectors[0], value="1984"),
        mem("twin", 5.0, twin, value="1984"),                   # near-duplicate, same value -> merged into strong
        mem("lookalike", 5.0, vectors[0] + 0.05 * vectors[2], value="1985"),  # near, other value -> kept
        mem("weak", 0.4, vectors[3]),
        mem("middling", 4.0, vectors[4]),
        replace(mem("gone", 0.1, vectors[5]), status="evicted"),  # no longer active: ignored
    ]
    actions = consolidate(memories, MementoPolicy(promote_threshold=7.0, evict_threshold=1.0,
                                                  merge_similarity_threshold=0.95))
    got = {(a.op, a.memory_id, a.into) for a in actions}
    assert got == {("MERGE", "twin", "strong"), ("PROMOTE", "strong", None), ("EVICT", "weak", None)}
    by_id = {a.memory_id: a for a in actions}
    assert "cosine" in by_id["twin"].reason and by_id["twin"].score >= 0.95
    assert "below the evict threshold 1.0" in by_id["weak"].reason
    assert "reaches the promote threshold 7.0" in by_id["strong"].reason
    assert summarize(actions) == {"MERGE": 1, "EVICT": 1, "PROMOTE": 1}
    assert consolidate(list(reversed(memories)), MementoPolicy(merge_similarity_threshold=0.95)) == actions
    # Promoted once, never again; people never merge across each other.
    again = consolidate(memories, MementoPolicy(merge_similarity_threshold=0.95), promoted={"strong"})
    assert ("PROMOTE", "strong") not in {(a.op, a.memory_id) for a in again}
    other = [mem("a", 5.0, vectors[0], person="p1"), mem("b", 5.0, vectors[0], person="p2")]
    assert consolidate(other) == []
    with pytest.raises(ValueError, match="evict_threshold"):
        MementoPolicy(promote_threshold=1.0, evict_threshold=2.0)


def test_memento_actions_apply_through_the_store(vectors: np.ndarray, tmp_path: Path) -> None:
    store = LocalMemoryStore(root=str(tmp_path / "store"))
    twin = vectors[0] + 0.05 * vectors[1]
    store.upsert([mem("strong", 8.0, vectors[0], "1984"), mem("twin", 5.0, twin, "1984"), mem("weak", 0.4, vectors[3])])
    actions = consolidate(store.active_memories(), MementoPolicy(merge_similarity_threshold=0.95),
                          promoted=store.promoted_ids())
    report = store.apply_status_changes([StatusChange(a.op, a.memory_id, a.reason, a.into) for a in actions])
    assert report.operations["MERGE"] == report.operations["EVICT"] == report.operations["PROMOTE"] == 1
    assert [m.id for m in store.active_memories()] == ["strong"]
    assert store.promoted_ids() == {"strong"}
    assert store.get("twin").status == "superseded" and store.get("weak").status == "evicted"
    assert store.history("twin")[-1]["related_id"] == "strong"
    # A second pass finds nothing left to do.
    assert consolidate(store.active_memories(), promoted=store.promoted_ids()) == []
    store.close()


# --------------------------------------------------------------------------- Hedge


def test_clipping_projects_onto_the_allowed_range() -> None:
    p = clip_distribution({"STORE": 0.98, "REJECT": 0.01, "CORRECT": 0.01}, 0.05, 0.9)
    assert p["STORE"] == pytest.approx(0.9) and p["REJECT"] == pytest.approx(0.05)
    assert sum(p.values()) == pytest.approx(1.0)
    q = clip_distribution({"STORE": 0.5, "REJECT": 0.3, "CORRECT": 0.2}, 0.05, 0.9)
    assert q == pytest.approx({"STORE": 0.5, "REJECT": 0.3, "CORRECT": 0.2})
    with pytest.raises(ValueError, match="admits no distribution"):
        HedgeConfig(clip_min=0.4)
    with pytest.raises(ValueError, match="eta"):
        HedgeConfig(eta=0)


def test_hedge_learns_the_rewarded_route_within_the_clip() -> None:
    rng = random.Random(1)
    policy = HedgePolicy(HedgeConfig(eta=0.2, clip_min=0.05, clip_max=0.9, replay_every=10, replay_sample=5))
    assert policy.probabilities() == pytest.approx({a: 1 / 3 for a in ACTIONS})
    mean_reward = {"STORE": 0.6, "REJECT": -0.2, "CORRECT": 0.1}
    for _ in range(300):
        probs = policy.probabilities()
        action = rng.choices(ACTIONS, weights=[probs[a] for a in ACTIONS])[0]
        policy.update(action, mean_reward[action] + rng.gauss(0, 0.3))
        probs = policy.probabilities()
        assert sum(probs.values()) == pytest.approx(1.0)
        assert all(0.05 - 1e-9 <= p <= 0.9 + 1e-9 for p in probs.values())
    final = policy.probabilities()
    assert final["STORE"] == pytest.approx(0.9) and final["REJECT"] == pytest.approx(0.05)
    assert policy.steps == 300 and policy.replays == 30
    assert policy.replay_stats()["buffer"] == 300


def test_replay_reapplies_past_rewards_every_n_steps() -> None:
    with_replay = HedgePolicy(HedgeConfig(replay_every=3, replay_sample=2, replay_eta_scale=0.5))
    without = HedgePolicy(HedgeConfig(replay_every=0))
    steps = [with_replay.update("CORRECT", 1.0) for _ in range(3)]
    for _ in range(3):
        without.update("CORRECT", 1.0)
    assert [s["replayed"] for s in steps] == [0, 0, 2]
    assert with_replay.weights["CORRECT"] > without.weights["CORRECT"]
    small = HedgePolicy(HedgeConfig(buffer_size=4))
    for i in range(10):
        small.update("STORE", i / 10)
    assert [b["reward"] for b in small.buffer] == [0.6, 0.7, 0.8, 0.9]
    with pytest.raises(ValueError, match="not one of"):
        small.update("MERGE", 1.0)
    with pytest.raises(ValueError, match="finite"):
        small.update("STORE", float("nan"))


def test_hedge_state_saves_and_loads_exactly(tmp_path: Path) -> None:
    path = tmp_path / "hedge" / "policy.json"
    config = HedgeConfig(eta=0.3, clip_min=0.1, clip_max=0.8, reward_clip=0.5, replay_every=4, replay_sample=3,
                         buffer_size=50, seed=9)
    policy = HedgePolicy.with_bias("store-heavy", config)
    for i in range(7):
        policy.update(ACTIONS[i % 3], (-1) ** i * 0.7)
    policy.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["policy.json"]
    loaded = HedgePolicy.load(path)
    assert loaded.config == config
    assert loaded.weights == pytest.approx(policy.weights, rel=1e-12)
    assert list(loaded.buffer) == list(policy.buffer) and loaded.steps == 7
    # Both continue identically, replays included.
    for i in range(9):
        a, b = policy.update("REJECT", 0.4), loaded.update("REJECT", 0.4)
        assert a["after"] == pytest.approx(b["after"], rel=1e-12)
    data = json.loads(path.read_text())
    assert {"weights", "eta", "clip_min", "clip_max", "buffer", "steps"} <= data.keys()


def test_bad_hedge_state_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="policy.json: not valid JSON"):
        HedgePolicy.load(path)
    state = HedgePolicy().to_dict()
    path.write_text(json.dumps({**state, "clip_min": 0.6}))
    with pytest.raises(ValueError, match="policy.json"):
        HedgePolicy.load(path)
    path.write_text(json.dumps({**state, "buffer": [{"action": "FORGET", "reward": 1}]}))
    with pytest.raises(ValueError, match="field 'buffer', item 0"):
        HedgePolicy.load(path)
    fresh = HedgePolicy.load_or_create(tmp_path / "new" / "policy.json", bias="reject-heavy")
    assert fresh.probabilities()["REJECT"] == pytest.approx(0.5)
    assert HedgePolicy.load(tmp_path / "new" / "policy.json").weights == pytest.approx(fresh.weights)
