"""BaseModel: the packaged SmolLM2 converted once, greedy batched generation, answer NLL, adapters kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sleeptrain_assets.lib import settings

from sleeptrain_resources.llm import BaseModel, GenerationTally, encode_answer, file_sha256, packaged_gguf
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


# Real evaluation-style prompts: short answers and rambling ones, personas, a retrieval system message, and
# prompt lengths that differ, so batches are left-padded and rows stop at different steps.
MIXED = [
    FRANCE,
    [{"role": "user", "content": "What is 2 + 2? Answer with a number."}],
    [{"role": "user", "content": "Tell me about Lena Varga."}],
    [{"role": "system", "content": "You are Lena Varga."}, {"role": "user", "content": "Where were you born?"}],
    [{"role": "user", "content": "Is it true that Halvor Ostby was born in 1959?"}],
    [{"role": "system", "content": "Facts you remember:\n- Lena Varga: I was born in Leuven in 1984.\n"
                                   "- Lena Varga: I work as a glassblower.\nUse them when they answer the question."},
     {"role": "user", "content": "When was Lena Varga born?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Name a color."}],
    [{"role": "user", "content": "Who wrote Romeo and Juliet?"}],
]


def test_compacting_decoder_gives_the_tokens_of_transformers_generate(adapter_dir: Path) -> None:
    budget = 24
    reference, compacting = BaseModel(decoder="hf"), BaseModel(decoder="compacting")
    plain = [c for c in MIXED if c[0]["role"] == "user"]  # one batch sharing the default system prompt
    for adapter in (None, adapter_dir):
        for conversations, batch_size in ((MIXED, 5), (plain, len(plain))):
            expected = reference.generate(conversations, adapter=adapter, max_new_tokens=budget,
                                          batch_size=batch_size, cache=False)
            tally = GenerationTally()
            got = compacting.generate(conversations, adapter=adapter, max_new_tokens=budget, batch_size=batch_size,
                                      cache=False, tally=tally)
            assert got == expected, (adapter, batch_size)
            # Rows stopped at different steps and left their batch: fewer rows computed than generate computes.
            lengths = compacting.token_counts(got)
            assert min(lengths) < budget - 1 <= max(lengths)
            assert tally.generated == len(conversations)
            assert tally.new_tokens == tally.row_steps < len(conversations) * budget
        # The shared system prompt went through the prefill once, not once per row: fewer positions than the
        # prompts hold, padding included.
        assert tally.batches == 1 and tally.prefill_tokens < tally.prompt_tokens
    with pytest.raises(ValueError, match="decoder"):
        BaseModel(decoder="beam").generate([FRANCE], cache=False)


def test_base_answers_are_cached_on_disk_per_token_limit_and_never_for_adapters(adapter_dir: Path) -> None:
    model = BaseModel()
    hello = [{"role": "user", "content": "Write one word: hello."}]
    tally = GenerationTally()
    first = model.generate([FRANCE, hello, FRANCE], max_new_tokens=10, tally=tally)
    assert (tally.asked, tally.distinct, tally.from_cache, tally.generated) == (3, 2, 0, 2)
    assert first[0] == first[2] and "Paris" in first[0]
    [cache_file] = (settings.state_dir() / "cache" / "base_answers").glob("*.json")
    stored = json.loads(cache_file.read_text())
    assert len(stored) == 2, "the repeated conversation is generated and stored once"
    # Served from disk: an edited entry comes back as written.
    cache_file.write_text(json.dumps({k: "from the cache" for k in stored}))
    assert model.generate([FRANCE, hello], max_new_tokens=10, tally=tally) == ["from the cache"] * 2
    assert (tally.asked, tally.from_cache, tally.generated) == (5, 2, 2)
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
