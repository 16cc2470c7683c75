"""A plain causal language model (no vision tower) that answers text prompts: the text-only judge.

Loaded from a local directory (safetensors only, no remote code unless asked); prompts go through
the tokenizer's chat template when it has one, are left-padded and decoded greedily in batches.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ModelError


class TextLM:
    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, path: str, *, trust_remote_code: bool = False, dtype=None, device=None) -> "TextLM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .loading import resolve_dtype
        try:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                         use_safetensors=True,
                                                         dtype=resolve_dtype(dtype) if dtype else None)
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load a causal language model ({e})") from None
        if device is not None:
            model.to(device)
        return cls(model, tok)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _ids(self, text: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
        return tok(text)["input_ids"]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 8) -> list[str]:
        tok = self.tokenizer
        out: list[str] = []
        for i in range(0, len(prompts), batch_size):
            rows = [self._ids(p) for p in prompts[i:i + batch_size]]
            width = max(map(len, rows))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=tok.pad_token_id)
            out += [t.strip() for t in tok.batch_decode(gen[:, width:], skip_special_tokens=True)]
        return out
