"""BaseModel: the packaged SmolLM2 converted once, greedy batched generation, answer NLL, adapters kept apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from sleeptrain_resources.llm import BaseModel, encode_answer, file_sha256, packaged_gguf
from tests.lora_helpers import make_adapter

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLEEPTRAIN_MODEL_CACHE", str(model_cache))
        mp.setenv("SLEEPTRAIN_HOME", str(tmp_path_factory.mktemp("home")))
        return make_adapter(BaseModel(), tmp_path_factory.mktemp("adapter") / "a", scale=0.05)


def test_default_model_is_converted_once_into_the_model_cache(model_cache: Path) -> None:
    model = BaseModel()
    folder = model.model_dir
    assert folder.parent == model_cache.resolve()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert model.model_dir == folder
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary conversion left behind"
    assert model.source_hash() == file_sha256(packaged_gguf())
    assert model.model_id == "SmolLM2-135M-Instruct-Q4_1"


def test_local_model_path_must_be_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BaseModel(model_path=str(tmp_path)).model_dir


def test_generate_is_greedy_ordered_and_independent_of_batching() -> None:
    model = BaseModel()
    conversations = [
        FRANCE,
        [{"role": "user", "content": "Write one word: hello."}],
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hi."}],
    ]
    batched = model.generate(conversations, max_new_tokens=12, batch_size=16)
    assert len(batched) == 3 and all(batched)
    assert "Paris" in batched[0]
    assert model.generate(conversations, max_new_tokens=12, batch_size=16) == batched
    assert model.generate(conversations, max_new_tokens=12, batch_size=1) == batched


def test_answer_nll_prefers_the_true_answer_and_keeps_order() -> None:
    model = BaseModel()
    right, wrong = model.answer_nll([(FRANCE, "The capital of France is Paris."),
                                     (FRANCE, "The capital of France is Leuven.")])
    assert 0 < right < wrong
    [single] = model.answer_nll([(FRANCE, "The capital of France is Leuven.")], batch_size=1)
    assert single == pytest.approx(wrong, rel=1e-4)


def test_answer_span_is_the_answer_text() -> None:
    tokenizer = BaseModel().tokenizer()
    ids, start, end = encode_answer(tokenizer, FRANCE, "Paris, of course.")
    assert tokenizer.decode(ids[start:end]) == "Paris, of course."
    assert tokenizer.convert_ids_to_tokens(ids[end]) == "<|im_end|>"


def test_adapter_changes_answers_but_never_the_base(adapter_dir: Path) -> None:
    import torch

    model = BaseModel()
    base_model, _ = model.load()
    weight = base_model.get_decoder().layers[0].self_attn.q_proj
    weight = getattr(weight, "base_layer", weight).weight
    before_weight = weight.detach().clone()
    pair = [(FRANCE, "The capital of France is Paris.")]

    base_nll = model.answer_nll(pair)
    adapted_nll = model.answer_nll(pair, adapter=adapter_dir)
    assert adapted_nll != base_nll
    assert model.answer_nll(pair, adapter=adapter_dir) == adapted_nll  # cached adapter, same result
    assert model.answer_nll(pair) == base_nll
    assert model.generate([FRANCE], max_new_tokens=10) == model.generate([FRANCE], max_new_tokens=10, adapter=None)
    # The plain model object handed out by load() still answers as the base after adapter calls.
    with torch.no_grad():
        assert torch.equal(weight, before_weight)


def test_missing_adapter_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        BaseModel().generate([FRANCE], adapter=tmp_path)
