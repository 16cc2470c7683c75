"""A scalar head on any supported VLM: reward models (one score per sequence) and value models
(one value per token, for PPO).

:class:`ScalarModel` wraps a family adapter's model (plain, or wrapped by PEFT for LoRA) and adds
``Linear(hidden, 1)`` on the language model's final hidden state (after its last norm, the input
of the LM head). Images go through the adapter as everywhere else (encoded once, handed to the
text forward as features), so every family works without a ``*ForSequenceClassification`` class.

* ``forward(input_ids, attention_mask, **family_kwargs)`` -> :class:`ScalarOutput` with
  ``values`` (B, T): the head at every position, and ``scores`` (B,): the head at the LAST REAL
  token of each row (the last position whose attention mask is 1), so left- and right-padded
  batches give the same score. The LM head is asked for one position only (``logits_to_keep=1``)
  so no full-vocabulary logits are built.
* ``score(batch)``: encode the batch's unique images once, run the rows, return (rows,) scores.
* ``save_pretrained(dir)`` writes the base as a normal Hugging Face directory (or a PEFT adapter
  directory under LoRA, plus trained non-LoRA parameters in ``extra_params.safetensors``), the
  head in ``scalar_head.safetensors`` and ``scalar_head.json`` (kind, hidden size, whether the base
  is an adapter). ``load_scalar_model(dir)`` reads it back; the training engine's checkpoints
  and resume use the same two methods, because ``ScalarModel`` is the module the engine trains.

The head is initialised N(0, 1/(hidden+1)) with a zero bias (the init of OpenAI's
lm-human-preferences reward head), from its own seeded generator so it does not depend on
what else consumed the global RNG.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .zero import any_partitioned, full_shape, gathered

HEAD_WEIGHTS = "scalar_head.safetensors"
HEAD_CONFIG = "scalar_head.json"
FORMAT = "vlmalign-scalar-head"
KINDS = ("reward", "value")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) index of each row's last real token.

    Right padding: the position before the first pad; left padding: T - 1. A row without any
    real token is an error, not a silent read of padding.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got {tuple(attention_mask.shape)}")
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    idx = torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).amax(dim=1)  # (B,)
    if bool((idx < 0).any()):
        rows = (idx < 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no real token (attention mask all zero)")
    return idx


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token values -> (B,) the value at each row's last real token."""
    idx = last_token_index(attention_mask)
    return values.gather(1, idx[:, None]).squeeze(1)


def final_hidden_state(output) -> torch.Tensor:
    """The language model's last hidden state (B, T, H) from a forward run with
    ``output_hidden_states=True``. Where the LM is a separate sub-model whose outputs are nested
    (InstructBLIP: ``language_model_outputs``) it is read from there. transformers returns the
    final hidden state after the last norm as ``hidden_states[-1]`` (the LM head's input;
    tests/integration/test_reward_model.py checks ``lm_head(h) == logits`` for every family)."""
    hs = getattr(output, "hidden_states", None)
    if hs is None and getattr(output, "language_model_outputs", None) is not None:
        hs = output.language_model_outputs.hidden_states
    if hs is None:
        raise ModelError(f"{type(output).__name__} carries no hidden states; cannot attach a scalar head")
    return hs[-1]


def text_hidden_size(model: nn.Module) -> int:
    """Width of the language model's hidden state (its input embedding width)."""
    emb = model.get_input_embeddings()
    return int(full_shape(emb.weight)[1])   # a ZeRO-3 shard is empty: its full shape is ds_shape


@dataclass
class ScalarOutput:
    values: torch.Tensor   # (B, T) head output at every position
    scores: torch.Tensor   # (B,) head output at each row's last real token


def _is_peft(model) -> bool:
    from .peft import is_peft
    return is_peft(model)


class ScalarModel(nn.Module):
    """``base`` (the family model, maybe PEFT-wrapped) + ``head`` = Linear(hidden, 1).

    ``adapter`` is the family adapter whose ``model`` is (or is wrapped by) ``base``; it encodes
    images and builds the family's forward kwargs. Constructing a ScalarModel points
    ``adapter.runner`` at it, so ``adapter.forward(...)`` returns a :class:`ScalarOutput` (the
    training engine later points it at its DDP wrapper of this module).
    """

    def __init__(self, adapter, base: nn.Module | None = None, *, kind: str = "reward",
                 head: nn.Linear | None = None, seed: int = 0):
        super().__init__()
        if kind not in KINDS:
            raise ModelError(f"unknown scalar head kind {kind!r} (expected one of {', '.join(KINDS)})")
        self.base = base if base is not None else adapter.model
        self.kind = kind
        hidden = text_hidden_size(adapter.model)
        if head is None:
            head = nn.Linear(hidden, 1)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(hidden + 1))
                head.bias.zero_()
        if head.in_features != hidden or head.out_features != 1:
            raise ModelError(f"scalar head is Linear({head.in_features}, {head.out_features}); the model's "
                             f"hidden size is {hidden}")
        # fp32 head (one tiny matrix): scores keep full precision under bf16 bases
        self.head = head.to(device=adapter.device, dtype=torch.float32)
        object.__setattr__(self, "adapter", adapter)  # not a submodule: base already holds the model
        adapter.runner = self

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> ScalarOutput:
        kwargs.setdefault("use_cache", False)
        kwargs.setdefault("logits_to_keep", 1)  # the LM head is not needed: build 1 position only
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        **kwargs)
        h = final_hidden_state(out)                                       # (B, T, H)
        # the head runs in fp32 even under bf16/fp16 autocast: scores rounded to bf16 (8 bits
        # of mantissa) would tie candidates whose scores differ by less than ~1%
        with torch.autocast(device_type=h.device.type, enabled=False):
            values = self.head(h.float()).squeeze(-1)                     # (B, T)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return ScalarOutput(values=values, scores=gather_last(values, attention_mask))

    def score(self, batch) -> torch.Tensor:
        """Scores (rows,) of a :class:`vlmalign.data.batching.Batch` with ``input_ids`` and
        ``attention_mask``; its unique images are encoded once for all rows."""
        t = batch.tensors
        enc = batch.encode(self.adapter)
        out = self.adapter.forward(t["input_ids"], t["attention_mask"], encoded=enc,
                                   image_indices=batch.image_indices)
        return out.scores

    # ------------------------------------------------------------------ saving
    def head_config(self) -> dict:
        cfg = {"format": FORMAT, "version": 1, "kind": self.kind, "hidden_size": self.head.in_features,
               "lora": _is_peft(self.base), "family": self.adapter.family}
        if cfg["lora"]:
            cfg["base_model"] = self.adapter.model.name_or_path
        return cfg

    def save_pretrained(self, out_dir, safe_serialization: bool = True, state_dict: dict | None = None,
                        **kwargs) -> None:
        """Base (HF directory or LoRA adapter) + head weights + head json into ``out_dir``.

        ``state_dict`` (this module's full state dict, e.g. gathered from shards) is split into
        the base's part and the head's part."""
        from safetensors.torch import save_file
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is None and any_partitioned(self):
            # ZeRO-3 shards: the full weights, gathered with every process taking part
            with gathered(list(self.parameters())):
                state_dict = {k: v.detach().clone() for k, v in self.state_dict().items()}
        head_sd = {k: v for k, v in self.head.state_dict().items()}
        base_kw = {}
        if state_dict is not None:
            base_kw["state_dict"] = {k[len("base."):]: v for k, v in state_dict.items() if k.startswith("base.")}
            head_sd = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
        self.base.save_pretrained(out, safe_serialization=True, **base_kw)
        if _is_peft(self.base):
            from .peft import EXTRA_PARAMS, peft_extra_params
            extra = peft_extra_params(self.base, base_kw.get("state_dict"))
            if extra:
                save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(out / EXTRA_PARAMS))
        save_file({k: v.detach().float().contiguous().cpu() for k, v in head_sd.items()}, str(out / HEAD_WEIGHTS))
        (out / HEAD_CONFIG).write_text(json.dumps(self.head_config(), indent=2))

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, trust_remote_code: bool = False, base: str | None = None,
                        is_trainable: bool = False, **kwargs) -> "ScalarModel":
        """Load a directory written by :meth:`save_pretrained` (the engine's resume calls this
        with ``dtype`` and ``use_safetensors``, which is always the case here)."""
        return load_scalar_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code, base=base,
                                 is_trainable=is_trainable)


def read_head_config(path) -> dict:
    f = Path(path) / HEAD_CONFIG
    if not f.exists():
        raise ModelError(f"{path}: no {HEAD_CONFIG}; not a reward/value model directory "
                         "(train one with `vlmalign train rm`)")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{f}: not valid JSON ({e})") from None
    if cfg.get("format") != FORMAT:
        raise ModelError(f"{f}: format {cfg.get('format')!r} is not {FORMAT!r}")
    return cfg


def load_scalar_model(path: str, *, dtype=None, device=None, trust_remote_code: bool = False,
                      base: str | None = None, is_trainable: bool = False) -> ScalarModel:
    """A reward/value model directory -> :class:`ScalarModel` (``.adapter`` is its adapter).

    The base is a model directory, or a LoRA adapter directory over the base it names (``base``
    overrides that); LoRA weights stay unmerged, so scores equal the trained model's.
    """
    from safetensors.torch import load_file

    from . import adapter_for, load_adapter
    from .peft import is_adapter_dir, load_with_adapter
    cfg = read_head_config(path)
    if is_adapter_dir(path):
        peft_model, processor = load_with_adapter(path, base=base, trust_remote_code=trust_remote_code,
                                                  dtype=dtype)
        if is_trainable:
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
        adapter = adapter_for(peft_model.base_model.model, processor)
        base_module = peft_model
    else:
        adapter = load_adapter(path, trust_remote_code=trust_remote_code, dtype=dtype)
        base_module = adapter.model
    if device is not None:
        base_module.to(device)
    hidden = text_hidden_size(adapter.model)
    if int(cfg.get("hidden_size", hidden)) != hidden:
        raise ModelError(f"{path}: head hidden size {cfg['hidden_size']} differs from the model's {hidden}")
    head = nn.Linear(hidden, 1)
    sd = load_file(str(Path(path) / HEAD_WEIGHTS))
    missing = {"weight", "bias"} - sd.keys()
    if missing or sd.keys() - {"weight", "bias"}:
        raise ModelError(f"{path}/{HEAD_WEIGHTS}: expected weight and bias, got {sorted(sd)}")
    head.load_state_dict(sd)
    return ScalarModel(adapter, base_module, kind=cfg.get("kind", "reward"), head=head)
