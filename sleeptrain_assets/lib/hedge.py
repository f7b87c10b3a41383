"""Hedge (multiplicative weights) over the hippocampus' routing biases, with routing replay.

Each routed action (STORE, REJECT, CORRECT) has a weight; a reward r for an action multiplies its weight
by exp(eta * r), r clipped to [-reward_clip, reward_clip]. Probabilities are the normalized weights
projected onto [clip_min, clip_max] so no route ever dies out or takes over. Every (action, reward) pair
goes to a bounded replay buffer; every `replay_every` updates a seeded sample of past pairs is replayed
at a reduced rate, so old evidence keeps a voice as new rewards arrive. State saves to JSON atomically.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sleeptrain_assets.lib.atomic import write_text_atomic

ACTIONS = ("STORE", "REJECT", "CORRECT")
FORMAT_VERSION = 1
BIASES: dict[str, dict[str, float]] = {
    "balanced": {"STORE": 1.0, "REJECT": 1.0, "CORRECT": 1.0},
    "store-heavy": {"STORE": 2.0, "REJECT": 1.0, "CORRECT": 1.0},
    "reject-heavy": {"STORE": 1.0, "REJECT": 2.0, "CORRECT": 1.0},
    "correct-heavy": {"STORE": 1.0, "REJECT": 1.0, "CORRECT": 2.0},
}


@dataclass(frozen=True)
class HedgeConfig:
    eta: float = 0.1
    clip_min: float = 0.05
    clip_max: float = 0.90
    reward_clip: float = 1.0
    replay_every: int = 10
    replay_sample: int = 5
    replay_eta_scale: float = 0.5
    buffer_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        n = len(ACTIONS)
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise ValueError(f"HedgeConfig.eta={self.eta} must be a positive number")
        if not 0.0 <= self.clip_min <= self.clip_max <= 1.0:
            raise ValueError(f"HedgeConfig clip range [{self.clip_min}, {self.clip_max}] must lie in [0, 1]")
        if self.clip_min * n > 1.0 + 1e-12 or self.clip_max * n < 1.0 - 1e-12:
            raise ValueError(
                f"HedgeConfig clip range [{self.clip_min}, {self.clip_max}] admits no distribution over {n} actions"
            )
        if self.reward_clip <= 0:
            raise ValueError(f"HedgeConfig.reward_clip={self.reward_clip} must be > 0")
        if self.replay_every < 0 or self.replay_sample < 0 or self.buffer_size < 1:
            raise ValueError("HedgeConfig.replay_every, replay_sample must be >= 0 and buffer_size >= 1")
        if not 0.0 <= self.replay_eta_scale <= 1.0:
            raise ValueError(f"HedgeConfig.replay_eta_scale={self.replay_eta_scale} must be in [0, 1]")


def clip_distribution(p: Mapping[str, float], lo: float, hi: float) -> dict[str, float]:
    """Project a distribution onto {q : sum q = 1, lo <= q_a <= hi}, keeping free entries proportional."""
    fixed: dict[str, float] = {}
    raw = {a: max(0.0, float(v)) for a, v in p.items()}
    for _ in range(len(raw) + 1):
        free = [a for a in raw if a not in fixed]
        mass = 1.0 - sum(fixed.values())
        total = sum(raw[a] for a in free)
        q = {a: (mass * raw[a] / total if total > 0 else mass / len(free)) for a in free} if free else {}
        low = [a for a in free if q[a] < lo - 1e-15]
        high = [a for a in free if q[a] > hi + 1e-15]
        if not low and not high:
            return {a: fixed.get(a, q.get(a, 0.0)) for a in raw}
        for a in low:
            fixed[a] = lo
        for a in high:
            fixed[a] = hi
    return {a: fixed.get(a, 0.0) for a in raw}


class HedgePolicy:
    """Multiplicative weights over STORE/REJECT/CORRECT with probability clipping and routing replay."""

    def __init__(
        self,
        config: HedgeConfig | None = None,
        weights: Mapping[str, float] | None = None,
        buffer: list[dict[str, Any]] | None = None,
        steps: int = 0,
        replays: int = 0,
    ) -> None:
        self.config = config or HedgeConfig()
        start = dict(weights) if weights is not None else BIASES["balanced"]
        missing = [a for a in ACTIONS if a not in start]
        if missing or any(not (start[a] > 0 and math.isfinite(start[a])) for a in ACTIONS):
            raise ValueError(f"Hedge weights need a positive finite weight for each of {ACTIONS}, got {start}")
        total = sum(start[a] for a in ACTIONS)
        self._log_w = {a: math.log(start[a] / total) for a in ACTIONS}
        self.buffer: deque[dict[str, Any]] = deque(buffer or [], maxlen=self.config.buffer_size)
        self.steps = steps
        self.replays = replays

    @classmethod
    def with_bias(cls, bias: str = "balanced", config: HedgeConfig | None = None) -> HedgePolicy:
        if bias not in BIASES:
            raise ValueError(f"unknown routing bias {bias!r}; choose one of {sorted(BIASES)}")
        return cls(config, BIASES[bias])

    @property
    def weights(self) -> dict[str, float]:
        top = max(self._log_w.values())
        raw = {a: math.exp(v - top) for a, v in self._log_w.items()}
        total = sum(raw.values())
        return {a: raw[a] / total for a in ACTIONS}

    def probabilities(self) -> dict[str, float]:
        return clip_distribution(self.weights, self.config.clip_min, self.config.clip_max)

    def _apply(self, action: str, reward: float, eta: float) -> None:
        r = max(-self.config.reward_clip, min(self.config.reward_clip, float(reward)))
        self._log_w[action] += eta * r
        top = max(self._log_w.values())
        # Renormalize in log space and floor the spread so a long losing streak stays recoverable.
        for a in ACTIONS:
            self._log_w[a] = max(self._log_w[a] - top, -700.0)

    def update(self, action: str, reward: float) -> dict[str, Any]:
        """Reward one action; every `replay_every` steps also replay a sample of the buffer."""
        if action not in ACTIONS:
            raise ValueError(f"Hedge action {action!r} is not one of {ACTIONS}")
        if not math.isfinite(float(reward)):
            raise ValueError(f"Hedge reward for {action} must be finite, got {reward!r}")
        before = self.probabilities()
        self._apply(action, reward, self.config.eta)
        self.steps += 1
        self.buffer.append({"action": action, "reward": float(reward), "step": self.steps})
        replayed = 0
        if self.config.replay_every and self.steps % self.config.replay_every == 0:
            replayed = self.replay()
        return {"step": self.steps, "action": action, "reward": float(reward), "before": before,
                "after": self.probabilities(), "replayed": replayed}

    def replay(self) -> int:
        """Re-apply a seeded sample of past (action, reward) pairs at eta x replay_eta_scale."""
        if not self.buffer or not self.config.replay_sample or not self.config.replay_eta_scale:
            return 0
        rng = random.Random(f"{self.config.seed}:{self.steps}:{self.replays}")
        sample = rng.sample(list(self.buffer), min(self.config.replay_sample, len(self.buffer)))
        for item in sample:
            self._apply(item["action"], item["reward"], self.config.eta * self.config.replay_eta_scale)
        self.replays += 1
        return len(sample)

    def replay_stats(self) -> dict[str, Any]:
        rewards = [b["reward"] for b in self.buffer]
        return {"buffer": len(self.buffer), "capacity": self.config.buffer_size, "replays": self.replays,
                "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0}

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "actions": list(ACTIONS), "weights": self.weights,
                **asdict(self.config), "steps": self.steps, "replays": self.replays, "buffer": list(self.buffer)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "hedge state") -> HedgePolicy:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{where}: field 'version' is {data.get('version')!r}, expected {FORMAT_VERSION}")
        names = [f for f in HedgeConfig.__dataclass_fields__ if f in data]
        try:
            config = HedgeConfig(**{f: data[f] for f in names})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        weights = data.get("weights")
        if not isinstance(weights, Mapping):
            raise ValueError(f"{where}: field 'weights' must map each of {ACTIONS} to a weight")
        buffer = data.get("buffer", [])
        for i, item in enumerate(buffer):
            if not (isinstance(item, Mapping) and item.get("action") in ACTIONS
                    and isinstance(item.get("reward"), (int, float))):
                raise ValueError(f"{where}: field 'buffer', item {i} must hold an action of {ACTIONS} and a reward")
        try:
            return cls(config, {a: float(weights[a]) for a in ACTIONS}, [dict(b) for b in buffer],
                       int(data.get("steps", 0)), int(data.get("replays", 0)))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{where}: field 'weights': {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write the state atomically (temp file + rename): a crash leaves the old state or the new one."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> HedgePolicy:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, where=str(path))

    @classmethod
    def load_or_create(cls, path: str | Path, bias: str = "balanced", config: HedgeConfig | None = None) -> HedgePolicy:
        path = Path(path)
        if path.is_file():
            return cls.load(path)
        policy = cls.with_bias(bias, config)
        policy.save(path)
        return policy
