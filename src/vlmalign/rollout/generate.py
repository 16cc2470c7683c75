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


def prompt_example(adapter, prompt, loader: ImageLoader, *, max_length: int | None = None) -> Example:
    """One prompt (a message list or a record with ``.prompt``) tokenized for generation, its
    images loaded (a bad image or an over-long prompt raises here, before any generation)."""
    msgs = prompt.prompt if hasattr(prompt, "prompt") else prompt
    refs = [img for m in msgs for img in m.images]
    t = adapter.tokenize_prompt(msgs, [loader.inputs(r) for r in refs], max_length=max_length)
    return Example(rows={"input_ids": t.input_ids}, images=refs, image_prompts=image_prompts(msgs, adapter))


@torch.no_grad()
def generate_tokens(adapter, items: Sequence[Example], loader, cfg: SamplingConfig,
                    **generate_kwargs) -> torch.Tensor:
    """One completion per item (``prompt_example``s, left-padded into one batch): the new token
    ids, one row per item. Each unique image is encoded once; ``loader`` needs only ``inputs(ref)``.
    ``generate_kwargs`` (a streamer, stopping criteria) go to the model's ``generate``."""
    uniq, per, uprompts = unique_images(items, loader)
    dev = adapter.device
    pad_id = adapter.tokenizer.pad_token_id
    ids = pad([it.rows["input_ids"] for it in items], pad_id, side="left").to(dev)
    mask = pad([[1] * len(it.rows["input_ids"]) for it in items], 0, side="left").to(dev)
    enc = adapter.encode_images(uniq, prompts=uprompts) if uniq else None
    was_training = adapter.model.training
    adapter.model.eval()
    out = adapter.generate(ids, mask, encoded=enc, image_indices=per, **_gen_kwargs(cfg, adapter),
                           **generate_kwargs)
    if was_training:
        adapter.model.train()
    return adapter.new_tokens(out, ids)


def generate_batch(adapter, prompts: Sequence, loader: ImageLoader, cfg: SamplingConfig,
                   *, max_length: int | None = None) -> list[list[str]]:
    """Generate ``cfg.num_samples`` completions per prompt (messages list or RLPrompt).

    Prompts are left-padded; each unique image of the batch is encoded once and its features
    are reused by every sample of every prompt that shows it.
    """
    items = []
    for p in prompts:
        ex = prompt_example(adapter, p, loader, max_length=max_length)
        items.extend([ex] * cfg.num_samples)
    texts = adapter.tokenizer.batch_decode(generate_tokens(adapter, items, loader, cfg), skip_special_tokens=True)
    n = cfg.num_samples
    return [[s.strip() for s in texts[i * n:(i + 1) * n]] for i in range(len(prompts))]


def generate(adapter, prompts: Sequence, loader: ImageLoader, cfg: SamplingConfig | None = None,
             *, batch_size: int = 16, max_length: int | None = None) -> list[list[str]]:
    cfg = cfg or SamplingConfig()
    out: list[list[str]] = []
    for i in range(0, len(prompts), batch_size):
        out.extend(generate_batch(adapter, prompts[i:i + batch_size], loader, cfg, max_length=max_length))
    return out
