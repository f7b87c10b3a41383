"""LoraTrainer on the real SmolLM2: a tiny run that teaches, guards that fail a run cleanly, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from sleeptrain_assets.lib.training_data import build_training_set
from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.registry import AdapterRegistry
from sleeptrain_resources.trainer import LoraTrainer, TrainingFailed, fuse_lora_forward, read_manifest
from tests.lora_helpers import qa_pairs

REPO = Path(__file__).resolve().parents[1]
TINY = {"max_steps": 8, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 1, "probe_every": 4,
        "probe_size": 8, "early_stop_patience": 3, "seed": 11}
SHORT = {**TINY, "max_steps": 2, "early_stop_patience": 0}


@pytest.fixture(scope="module")
def training_set():
    return build_training_set(qa_pairs(), replay_share=0.0, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, model_cache: Path, training_set):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLEEPTRAIN_MODEL_CACHE", str(model_cache))
        mp.setenv("SLEEPTRAIN_HOME", str(tmp_path_factory.mktemp("home")))
        out = tmp_path_factory.mktemp("run") / "adapter"
        result = LoraTrainer().train(training_set, BaseModel(), out, overrides=TINY)
    return result


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_tiny_run_writes_a_loadable_adapter_whose_loss_fell(trained, training_set) -> None:
    out = trained.adapter_dir
    assert _entries(out.parent) == ["adapter"], "temporary folders left next to the adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json"} <= set(_entries(out))
    manifest = read_manifest(out)
    assert manifest["base_model"]["id"] == "SmolLM2-135M-Instruct-Q4_1"
    assert len(manifest["base_model"]["sha256"]) == 64
    assert manifest["training_data"]["sha256"] == training_set.data_hash
    assert manifest["hyperparameters"]["max_steps"] == 8 and manifest["code_version"]
    assert manifest["metrics"]["packed"] is True, "SmolLM2 runs SDPA attention, which takes the packed mask"
    assert manifest["adapter_sha256"] == trained.adapter_sha256
    assert trained.steps == 8 and len(trained.loss_curve) == 8
    assert trained.tokens > trained.answer_tokens > 0 and trained.tokens_per_s > 0
    assert 0 < trained.trainable_params < trained.total_params / 10
    (first_step, first), (last_step, last) = trained.probe_curve[0], trained.probe_curve[-1]
    assert first_step == 0 and last_step == 8
    assert last < 0.8 * first, f"held-in loss did not fall: {trained.probe_curve}"

    model = BaseModel()
    pairs = [(p.messages()[:-1], p.answer) for p in qa_pairs()[:4]]
    base, adapted = model.answer_nll(pairs), model.answer_nll(pairs, adapter=out)
    assert sum(adapted) < sum(base)
    assert model.generate([pairs[0][0]], adapter=out, max_new_tokens=16)[0]


def test_same_seed_same_data_same_adapter(training_set, tmp_path: Path) -> None:
    one = LoraTrainer().train(training_set, BaseModel(), tmp_path / "one", overrides=SHORT)
    two = LoraTrainer().train(training_set, BaseModel(), tmp_path / "two", overrides=SHORT)
    assert one.loss_curve == two.loss_curve
    assert one.adapter_sha256 == two.adapter_sha256
    other = LoraTrainer().train(training_set, BaseModel(), tmp_path / "other", overrides={**SHORT, "seed": 12})
    assert other.adapter_sha256 != one.adapter_sha256


class PoisonedTrainer(LoraTrainer):
    """The real trainer with a fault injected after step 1: NaN weights (-> NaN loss at step 2) or a hook that
    turns every gradient of one LoRA matrix into NaN (-> NaN gradient norm at step 2, the last step)."""

    poison: str = "loss"

    def train(self, *args, on_step=None, **kwargs):
        def poisoned(step) -> None:
            if on_step is not None:
                on_step(step)
            if step.step != 1:
                return
            import torch

            param = next(p for n, p in step.model.named_parameters() if "lora_A" in n)
            if self.poison == "loss":
                with torch.no_grad():
                    param.fill_(float("nan"))
            else:
                param.register_hook(lambda grad: grad * float("nan"))

        return super().train(*args, on_step=poisoned, **kwargs)


@pytest.mark.parametrize(("poison", "message"), [("loss", "non-finite loss .* at step 2"),
                                                 ("gradient", "non-finite gradient norm at step 2")])
def test_nan_in_training_fails_the_asset_and_leaves_the_registry_as_it_was(tmp_path: Path, poison: str,
                                                                           message: str) -> None:
    import dagster as dg

    from sleeptrain_assets.defs.training import LoraConfig, lora_adapter
    from sleeptrain_assets.lib import settings
    from sleeptrain_assets.lib.catalog import load_people, load_templates
    from tests.test_registry import adapter
    from tests.lora_helpers import small_replay_targets
    from tests.test_training_asset import _memories

    registry = AdapterRegistry()
    version = registry.register(adapter(tmp_path / "earlier", 1))
    before = (registry.versions(), registry.current(), registry.history())
    people, templates = load_people(settings.data_dir() / "people"), load_templates(settings.data_dir() / "templates")
    with pytest.raises(TrainingFailed, match=message):
        lora_adapter(dg.build_asset_context(), config=LoraConfig(max_steps=2, replay_share=0.0, early_stop_patience=0),
                     consolidated_memories=_memories("lena_varga", people, templates), people_profiles=people,
                     conversation_templates=templates, replay_targets=small_replay_targets(), base_model=BaseModel(),
                     trainer=PoisonedTrainer(poison=poison),
                     registry=registry)
    assert (registry.versions(), registry.current(), registry.history()) == before
    assert registry.current() == version
    staging = settings.state_dir() / "staging"
    assert not staging.exists() or _entries(staging) == [], "the failed run left staging behind"


def test_loss_rising_far_above_its_start_fails_the_run(training_set, tmp_path: Path) -> None:
    def blow_up(step) -> None:
        if step.step == 3:
            import torch

            with torch.no_grad():
                for name, param in step.model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0.0, 0.5)

    out = tmp_path / "adapter"
    with pytest.raises(TrainingFailed, match="loss rose|non-finite"):
        LoraTrainer().train(training_set, BaseModel(), out, overrides={**TINY, "early_stop_patience": 0},
                            on_step=blow_up)
    assert not out.exists()


def test_plateau_stop_keeps_the_weights_of_the_best_held_in_probe(training_set, tmp_path: Path) -> None:
    # No probe can beat the start by 99%, so the first probe after step 0 is a plateau with patience 1: the
    # run stops there and must save the step-0 weights (LoRA B starts at zero), not the trained ones.
    from safetensors.torch import load_file

    result = LoraTrainer().train(training_set, BaseModel(), tmp_path / "adapter",
                                 overrides={**TINY, "early_stop_patience": 1, "early_stop_min_delta": 0.99})
    assert result.stopped == "plateau" and result.steps == 4 and result.weights_from_step == 0
    assert result.manifest["metrics"]["weights_from_step"] == 0
    assert result.probe_curve[1][1] < result.probe_curve[0][1], "the run did train before it stopped"
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(float(t.abs().max()) == 0.0 for t in lora_b)
    assert any(float(t.abs().max()) > 0.0 for name, t in weights.items() if "lora_A" in name)


def test_fused_lora_forward_matches_peft() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    model, tokenizer = BaseModel().load_fresh()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    ids = torch.tensor([tokenizer("Lena Varga was born in Leuven in 1984.")["input_ids"]])
    with torch.no_grad():
        reference = peft_model(input_ids=ids).logits
        assert fuse_lora_forward(peft_model) == 30 * 7
        fused = peft_model(input_ids=ids).logits
    assert torch.allclose(fused, reference, atol=1e-4, rtol=1e-4)


def test_bad_settings_are_named(training_set, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown trainer settings"):
        LoraTrainer().hyperparams(ranks=4)
    with pytest.raises(ValueError, match="batch_size"):
        LoraTrainer(batch_size=0).hyperparams()
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        LoraTrainer().train(training_set, BaseModel(), existing, overrides=TINY)


KILLED_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import sleeptrain_resources.trainer as trainer
    from sleeptrain_assets.lib.training_data import build_training_set
    from sleeptrain_resources.llm import BaseModel
    from tests.lora_helpers import qa_pairs

    def die_after_weights(path):
        # PEFT has written the weights into the temporary folder; the manifest and rename are still to come.
        os.kill(os.getpid(), signal.SIGKILL)
    trainer.file_sha256 = die_after_weights
    training_set = build_training_set(qa_pairs(), replay_share=0.0, seed=3)
    trainer.LoraTrainer().train(training_set, BaseModel(), Path(sys.argv[2]),
                                overrides={"max_steps": 1, "batch_size": 2, "early_stop_patience": 0})
    print("not killed")
    """
)


def test_a_write_killed_midway_leaves_no_adapter_and_the_next_run_cleans_its_leftover(
    training_set, tmp_path: Path
) -> None:
    out = tmp_path / "runs" / "adapter"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(REPO), str(out)], cwd=REPO,
                          env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not out.exists(), "a half-written adapter appeared under its final name"
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(".adapter.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "adapter_model.safetensors").is_file()  # killed mid-write
    assert not (leftovers[0] / "manifest.json").exists()
    # A live writer's folder (this process's owner tag) must survive the next run's clean-up.
    from sleeptrain_resources.trainer import owner_tag

    live = out.parent / f".other.tmp-{owner_tag()}-abcdefgh"
    live.mkdir()
    result = LoraTrainer().train(training_set, BaseModel(), out, overrides=SHORT)
    assert result.adapter_dir == out and (out / "manifest.json").is_file()
    assert _entries(out.parent) == [live.name, "adapter"], "the dead writer's leftover was not cleaned"


def test_pack_rows_places_every_example_once_within_the_width() -> None:
    from sleeptrain_resources.trainer import pack_rows

    lengths = [90, 20, 35, 60, 15, 88, 30, 5]
    rows = pack_rows(lengths, 90)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 90 for row in rows)
    assert all(row == sorted(row) for row in rows)
    assert len(rows) == 4  # 90 | 88 | 60+30 | 35+20+15+5 (first fit, longest first)


def test_a_packed_step_trains_exactly_like_the_unpacked_step() -> None:
    """Same batch laid out packed (shared rows, block-diagonal attention) and unpacked: same loss, same gradients,
    same weights after an optimizer step, up to float rounding."""
    import torch
    from peft import LoraConfig, get_peft_model

    from sleeptrain_assets.lib.records import QAPair
    from sleeptrain_resources.trainer import _collate, encode_examples, training_loss

    story = ("Odo Brannagh keeps bees on the cliffs above Tralee, sells the honey at the Saturday market, "
             "repairs old hives for neighbours and writes a short letter about the season every autumn. "
             "In winter he mends the frames, counts the colonies that survived the storms, and teaches two "
             "children from the village how to read a hive without disturbing the queen.")
    pairs = qa_pairs()[:5] + [QAPair("odo_brannagh", "story", "fact", "Tell me about Odo Brannagh.", story,
                                     ("hobby.name",), ("beekeeping",))]
    examples = build_training_set(pairs, replay_share=0.0, seed=3).examples
    model, tokenizer = BaseModel().load_fresh()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    fuse_lora_forward(peft_model)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    causal_lm = peft_model.get_base_model()
    encoded, dropped = encode_examples(tokenizer, examples, 256)
    assert not dropped
    lengths = sorted(len(ids) for ids, _, _ in encoded)
    assert lengths[0] + lengths[1] <= lengths[-1], f"nothing to pack: {lengths}"
    idx = list(range(len(encoded)))
    pad = tokenizer.eos_token_id

    results = {}
    for pack in (False, True):
        with torch.no_grad():
            for param, value in zip(params, start, strict=True):
                param.copy_(value)
        batch = _collate(encoded, idx, pad, "cpu", pack=pack)
        loss, _ = training_loss(causal_lm, batch, 0.0)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in params])
        torch.optim.AdamW(params, lr=1e-3).step()
        for p in params:
            p.grad = None
        results[pack] = (batch, float(loss.detach()), grads, torch.cat([p.detach().flatten() for p in params]))

    (unpacked, loss_u, grads_u, after_u), (packed, loss_p, grads_p, after_p) = results[False], results[True]
    assert packed.input_ids.shape[0] < unpacked.input_ids.shape[0] and packed.padding < unpacked.padding
    assert packed.real_tokens == unpacked.real_tokens and torch.equal(packed.targets, unpacked.targets)
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    assert float((grads_p - grads_u).norm() / grads_u.norm()) < 1e-4
    moved = float((after_u - torch.cat([s.flatten() for s in start])).norm())
    assert float((after_p - after_u).norm()) < 1e-3 * moved
