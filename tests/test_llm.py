"""BaseModel: the packaged SmolLM2 converted once, greedy batched generation, answer NLL, adapters kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sleeptrain_assets.lib import settings

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
    batched = model.generate(conversations, max_new_tokens=12, batch_size=16, cache=False)
    assert len(batched) == 3 and all(batched)
    assert "Paris" in batched[0]
    assert model.generate(conversations, max_new_tokens=12, batch_size=16, cache=False) == batched
    assert model.generate(conversations, max_new_tokens=12, batch_size=1, cache=False) == batched


def test_base_answers_are_cached_on_disk_per_token_limit_and_never_for_adapters(adapter_dir: Path) -> None:
    model = BaseModel()
    hello = [{"role": "user", "content": "Write one word: hello."}]
    first = model.generate([FRANCE, hello, FRANCE], max_new_tokens=10)
    assert first[0] == first[2] and "Paris" in first[0]
    [cache_file] = (settings.state_dir() / "cache" / "base_answers").glob("*.json")
    stored = json.loads(cache_file.read_text())
    assert len(stored) == 2, "the repeated conversation is generated and stored once"
    # Served from disk: an edited entry comes back as written.
    cache_file.write_text(json.dumps({k: "from the cache" for k in stored}))
    assert model.generate([FRANCE], max_new_tokens=10) == ["from the cache"]
    assert model.generate([FRANCE], max_new_tokens=10, cache=False) == [first[0]]
    # Another token limit is another answer; adapter answers are never stored.
    assert model.generate([FRANCE], max_new_tokens=11) != ["from the cache"]
    size = len(json.loads(cache_file.read_text()))
    assert size == 3
    model.generate([[{"role": "user", "content": "Name a color."}]], adapter=adapter_dir, max_new_tokens=8)
    assert len(json.loads(cache_file.read_text())) == size


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
    base_answer = model.generate([FRANCE], max_new_tokens=10, cache=False)

    base_nll = model.answer_nll(pair)
    adapted_nll = model.answer_nll(pair, adapter=adapter_dir)
    assert adapted_nll != base_nll
    assert model.answer_nll(pair, adapter=adapter_dir) == adapted_nll  # cached adapter, same result
    assert model.answer_nll(pair) == base_nll
    model.generate([FRANCE], max_new_tokens=10, adapter=adapter_dir)
    # Generated afresh (not read back from the base-answer cache) after the adapter ran: still the base's answer.
    assert model.generate([FRANCE], max_new_tokens=10, cache=False) == base_answer
    # The plain model object handed out by load() still answers as the base after adapter calls.
    with torch.no_grad():
        assert torch.equal(weight, before_weight)


def test_missing_adapter_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        BaseModel().generate([FRANCE], adapter=tmp_path)
