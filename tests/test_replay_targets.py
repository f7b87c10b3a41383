"""Replay targets on the real SmolLM2 and the KL locality term the trainer builds from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dagster as dg
import pytest

from sleeptrain_assets.defs.training import LoraConfig, ReplayTargetsConfig, lora_adapter, replay_targets
from sleeptrain_assets.lib import settings
from sleeptrain_assets.lib.catalog import load_people, load_templates
from sleeptrain_assets.lib.training_data import ReplayTargets, example_from_prompt
from sleeptrain_resources.llm import BaseModel, encode_supervised
from sleeptrain_resources.registry import AdapterRegistry
from sleeptrain_resources.trainer import Hyperparams, LoraTrainer, _collate, encode_examples, top_k_kl
from tests.lora_helpers import make_adapter

SMALL = ReplayTargetsConfig(max_prompts=6, max_new_tokens=24, top_k=8)


def _materialize(config: ReplayTargetsConfig = SMALL) -> dg.Output:
    return replay_targets(dg.build_asset_context(), config, BaseModel())


def test_replay_targets_are_the_base_models_own_answers_and_distribution() -> None:
    first = _materialize()
    targets: ReplayTargets = first.value
    assert len(targets.targets) + len(targets.unusable) == 6 and len(targets.targets) >= 4
    assert targets.top_k == 8 and targets.base_sha256 == BaseModel().source_hash()
    tokenizer = BaseModel().tokenizer()
    agree = total = 0
    for target in targets.targets:
        ids, start, end = encode_supervised(tokenizer, [{"role": "user", "content": target.prompt}], target.answer)
        assert len(target.teacher) == end - start, "one teacher distribution per supervised position"
        for (top, logprobs), label in zip(target.teacher[:-1], ids[start : end - 1]):
            assert len(top) == len(logprobs) == 8
            assert all(a >= b for a, b in zip(logprobs, logprobs[1:])) and logprobs[0] <= 0.0
            agree += top[0] == label
            total += 1
    # The answers are the base model's greedy text, so its own top-1 is the answer token almost everywhere
    # (re-tokenizing decoded text can split a word differently).
    assert agree / total >= 0.9, f"teacher top-1 matches the greedy answer at only {agree}/{total} positions"
    assert first.metadata["from_cache"].value is False

    again = _materialize()
    assert again.metadata["from_cache"].value is True
    assert again.value == targets and again.data_version == first.data_version
    other = _materialize(SMALL.model_copy(update={"top_k": 4}))
    assert other.data_version != first.data_version and other.value.top_k == 4


def test_training_refuses_replay_targets_of_other_base_weights() -> None:
    data = settings.data_dir()
    people, templates = load_people(data / "people"), load_templates(data / "templates")
    from tests.test_training_asset import _memories

    stale = dataclasses.replace(_materialize().value, base_sha256="0" * 64)
    registry = AdapterRegistry()
    with pytest.raises(ValueError, match="materialize replay_targets again"):
        lora_adapter(dg.build_asset_context(), config=LoraConfig(max_steps=1, early_stop_patience=0),
                     consolidated_memories=_memories("lena_varga", people, templates), people_profiles=people,
                     conversation_templates=templates, replay_targets=stale, base_model=BaseModel(),
                     trainer=LoraTrainer(), registry=registry)
    assert registry.versions() == []


def test_top_k_kl_is_zero_at_the_teacher_and_falls_under_its_own_gradient() -> None:
    import torch

    torch.manual_seed(0)
    teacher_logits = torch.randn(5, 50)
    values, ids = torch.log_softmax(teacher_logits, -1).topk(6, dim=-1)
    assert float(top_k_kl(teacher_logits, ids, values)) < 1e-5
    student = (teacher_logits + torch.randn(5, 50)).requires_grad_()
    before = top_k_kl(student, ids, values)
    assert float(before.detach()) > 0.01
    before.backward()
    with torch.no_grad():
        stepped = student - 1.0 * student.grad
    assert float(top_k_kl(stepped, ids, values)) < float(before.detach())


def test_a_teacher_that_does_not_fit_the_answer_is_named() -> None:
    tokenizer = BaseModel().tokenizer()
    example = example_from_prompt("How do I boil an egg?", "Put it in boiling water for nine minutes.",
                                  teacher=(((1, 2), (-0.1, -3.0)),))
    encoded, _ = encode_examples(tokenizer, [example], 256)
    with pytest.raises(ValueError, match="another tokenizer or chat template"):
        _collate(encoded, [0], 0, "cpu", [example.teacher])


def test_locality_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="locality_sft=False needs locality_kl_weight > 0"):
        Hyperparams(locality_sft=False, locality_kl_weight=0.0).validate()
    with pytest.raises(ValueError, match="locality_kl_weight must be >= 0"):
        Hyperparams(locality_kl_weight=-1.0).validate()


@pytest.mark.slow
def test_the_kl_term_pulls_a_drifted_adapter_back_to_the_base_models_answers(tmp_path: Path) -> None:
    base = BaseModel()
    targets = _materialize(ReplayTargetsConfig(max_prompts=12, max_new_tokens=24, top_k=16)).value
    drifted = make_adapter(base, tmp_path / "drifted", seed=1, scale=0.3)
    examples = [example_from_prompt(t.prompt, t.answer, t.teacher) for t in targets.targets]
    # KL alone (no cross-entropy on the answers): whatever moves the adapter back is the locality term.
    result = LoraTrainer().train(
        examples, base, tmp_path / "pulled_back", init_adapter=drifted,
        overrides={"max_steps": 12, "batch_size": 4, "learning_rate": 2e-3, "warmup_steps": 0,
                   "early_stop_patience": 0, "locality_kl_weight": 1.0, "locality_sft": False},
    )
    metrics = result.manifest["metrics"]
    print(f"locality KL per batch: first {metrics['locality_kl_first']}, last {metrics['locality_kl_last']}; "
          f"losses {metrics['loss_curve']}")
    assert metrics["locality_kl_batches"] == 12
    assert metrics["locality_kl_last"] < metrics["locality_kl_first"], metrics
    # Measured apart from the trainer: the base model's answers became likelier again under the adapter.
    pairs = [([{"role": "user", "content": t.prompt}], t.answer) for t in targets.targets]
    nll = {name: sum(base.answer_nll(pairs, adapter=a)) / len(pairs)
           for name, a in (("base", None), ("drifted", drifted), ("pulled_back", result.adapter_dir))}
    print(f"mean answer NLL of the base model's own answers: {nll}")
    assert nll["drifted"] > nll["base"] + 0.05, "the random adapter must move the model for this test to mean anything"
    assert nll["pulled_back"] < nll["drifted"] - 0.5 * (nll["drifted"] - nll["base"]), nll
