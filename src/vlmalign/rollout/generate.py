"""Batched generation with images encoded once per batch (HF ``generate`` with a KV cache)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import opt
from ..data.batching import Example, ImageLoader, image_prompts, pad, unique_images


@dataclass
class SamplingConfig:
    max_new_tokens: int = opt(32, "tokens per response", ge=1)
    temperature: float = opt(0.0, "sampling temperature (0: greedy)", ge=0)
    top_p: float = opt(1.0, "nucleus sampling threshold", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling (0: off)", ge=0)
    num_samples: int = opt(1, "responses per prompt", ge=1)


def _gen_kwargs(cfg: SamplingConfig, adapter) -> dict:
    kw = {"max_new_tokens": cfg.max_new_tokens, "pad_token_id": adapter.tokenizer.pad_token_id,
          "eos_token_id": adapter.stop_token_ids()}
    if cfg.temperature and cfg.temperature > 0:
        kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                  top_k=cfg.top_k if cfg.top_k > 0 else None)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


@torch.no_grad()
def generate_batch(adapter, prompts: Sequence, loader: ImageLoader, cfg: SamplingConfig,
                   *, max_length: int | None = None) -> list[list[str]]:
    """Generate ``cfg.num_samples`` completions per prompt (messages list or RLPrompt).

    Prompts are left-padded; each unique image of the batch is encoded once and its features
    are reused by every sample of every prompt that shows it.
    """
    tok = adapter.tokenizer
    items = []
    for p in prompts:
        msgs = p.prompt if hasattr(p, "prompt") else p  # a record (RLPrompt, ...) or a message list
        refs = [img for m in msgs for img in m.images]
        imgs = [loader.inputs(r) for r in refs]
        t = adapter.tokenize_prompt(msgs, imgs, max_length=max_length)
        eps = image_prompts(msgs, adapter)
        for _ in range(cfg.num_samples):
            items.append(Example(rows={"input_ids": t.input_ids}, images=refs, image_prompts=eps))
    uniq, per, uprompts = unique_images(items, loader)
    dev = adapter.device
    ids = pad([it.rows["input_ids"] for it in items], tok.pad_token_id, side="left").to(dev)
    mask = pad([[1] * len(it.rows["input_ids"]) for it in items], 0, side="left").to(dev)
    enc = adapter.encode_images(uniq, prompts=uprompts) if uniq else None
    was_training = adapter.model.training
    adapter.model.eval()
    out = adapter.generate(ids, mask, encoded=enc, image_indices=per, **_gen_kwargs(cfg, adapter))
    if was_training:
        adapter.model.train()
    texts = tok.batch_decode(adapter.new_tokens(out, ids), skip_special_tokens=True)
    n = cfg.num_samples
    return [[s.strip() for s in texts[i * n:(i + 1) * n]] for i in range(len(prompts))]


def generate(adapter, prompts: Sequence, loader: ImageLoader, cfg: SamplingConfig | None = None,
             *, batch_size: int = 16, max_length: int | None = None) -> list[list[str]]:
    cfg = cfg or SamplingConfig()
    out: list[list[str]] = []
    for i in range(0, len(prompts), batch_size):
        out.extend(generate_batch(adapter, prompts[i:i + batch_size], loader, cfg, max_length=max_length))
    return out
