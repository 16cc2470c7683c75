"""The model-adapter contract and its family-neutral implementation.

An adapter wraps one loaded VLM (``model``) and its processor. Everything that differs between
families lives in a subclass in this package (``llava.py``, ``qwen2_vl.py``, ...); trainers only
talk to this interface:

* ``preprocess_image(img)`` -> :class:`ImageInputs`: the family's tensors for ONE image, the
  number of text tokens the image becomes and the exact token ids that replace its placeholder.
* ``encode_images(list[ImageInputs], prompts=None)`` -> :class:`EncodedImages`: vision tower +
  projector, once per unique image. Where ``encoding_uses_prompt`` (InstructBLIP: the Q-Former
  reads the instruction) "unique" means unique (image, ``image_prompt(...)``) and ``prompts``
  is required; every other family ignores it.
* ``mm_kwargs(encoded, indices)``: forward kwargs (``mm_encoder_outputs`` plus family extras)
  that hand already-encoded images to any number of sequences, so one encoding serves chosen,
  rejected, policy, reference and k rollouts.
* ``tokenize_conversation`` / ``tokenize_preference`` / ``tokenize_prompt``: chat-template
  rendering, placeholder expansion and loss masks, with length limits checked, never guessed.
* ``param_groups()`` -> ``{"vision", "projector", "language", "head"}`` for freezing and LoRA.
* ``generate(input_ids, attention_mask, encoded=..., image_indices=...)``: generation from
  already-encoded images (rollouts share one encoding); returns prompt + new ids, and
  ``new_tokens(output, input_ids)`` takes the new ones out.
* ``position_ids(input_ids, attention_mask, encoded=..., image_indices=...)``: the position
  ids ``generate`` uses for (left-)padded rows, so a training forward can score a sampled
  sequence at the positions it was sampled at.
* ``forward(..., segment_ids=...)``: packed rows (several samples in one row, SFT's
  ``data.packing``): ``packed_inputs`` restarts the position ids at every sample (Qwen2-VL's
  M-RoPE ids computed per sample) and keeps attention inside each sample, either through
  transformers' own handling of restarting position ids or a block-diagonal 4-D mask.

Tokenization works in three steps. (1) The processor's chat template renders the messages to
text (each image becomes one placeholder token). (2) The tokenizer encodes that text with
character offsets; assistant spans (found by rendering growing prefixes of the conversation)
set the loss mask. (3) Each placeholder token is replaced by the image's expansion ids. Step 3
is what the processor does internally; tests prove per family that our ids equal the
processor's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..constants import IGNORE_INDEX
from ..data.schema import (Conversation, ImagePart, Message, PreferencePair, RankedList, Record,
                           RLPrompt, UnpairedExample)
from ..errors import DataError, LengthError, ModelError


@dataclass
class ImageInputs:
    """One preprocessed image."""

    tensors: dict[str, torch.Tensor]  # family tensors for this image (leading dim = 1 image)
    expansion: list[int]              # token ids that replace the image's placeholder token
    num_features: int                 # feature vectors the encoder produces for it
    text: str | None = None           # the processor's replacement string (families that expand in text)

    @property
    def num_tokens(self) -> int:
        return len(self.expansion)


@dataclass
class EncodedImages:
    """Projected features of N unique images, in the order they were given."""

    features: list[torch.Tensor]                 # per image: (num_features_i, hidden)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-image rows (e.g. grid_thw)

    def __len__(self) -> int:
        return len(self.features)


@dataclass
class Tokenized:
    """A tokenized sample. ``labels`` is IGNORE_INDEX outside supervised tokens."""

    input_ids: list[int]
    labels: list[int]
    num_images: int
    image_token_counts: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedPair:
    """A preference pair sharing one tokenized prompt."""

    prompt_ids: list[int]
    chosen_ids: list[int]     # completion only
    rejected_ids: list[int]   # completion only
    num_images: int
    image_token_counts: list[int]


def saved_chat_template(path: str, tokenizer=None) -> str | None:
    """The chat template saved in a model directory (``chat_template.jinja``, or the older
    ``chat_template.json``), else the tokenizer's."""
    import json
    import os
    if os.path.isdir(path):
        jinja, legacy = os.path.join(path, "chat_template.jinja"), os.path.join(path, "chat_template.json")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        if os.path.isfile(legacy):
            with open(legacy, encoding="utf-8") as f:
                found = json.load(f).get("chat_template")
            if found:
                return found
    return getattr(tokenizer, "chat_template", None)


def to_hf_messages(messages: Sequence[Message]) -> list[dict]:
    """Schema messages -> the list-of-parts dicts that HF chat templates take."""
    out = []
    for m in messages:
        parts = []
        for p in m.content:
            if isinstance(p, ImagePart):
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": p.text})
        out.append({"role": m.role, "content": parts})
    return out


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) positions counted from 0 again wherever the segment id changes (the
    padding after a row's last sample counts as one more segment, so it starts at 0 too)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def block_diagonal_mask(segment_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 1, T, T) causal attention inside each segment only: boolean (True: attend) when
    ``dtype`` is None, else additive (0 or the dtype's minimum) for eager attention. Padding
    (segment 0) attends to earlier padding only, so no query row is fully masked."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def segment_spans(segment_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample (segment id > 0) of packed rows, row by row in order."""
    spans = []
    for r, row in enumerate(segment_ids.tolist()):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                if row[start] > 0:
                    spans.append((r, start, t))
                start = t
    return spans


def unpack_segments(values: torch.Tensor, spans: Sequence[tuple[int, int, int]], fill=0):
    """The samples of packed rows ``values`` (B, T) as right-padded rows (S, Lmax) with their
    (S, Lmax) mask: what the samples would be in an unpacked batch."""
    L = max((b - a for _, a, b in spans), default=0)
    out = values.new_full((len(spans), L), fill)
    mask = torch.zeros(len(spans), L, dtype=torch.long, device=values.device)
    for s, (r, a, b) in enumerate(spans):
        out[s, : b - a] = values[r, a:b]
        mask[s, : b - a] = 1
    return out, mask


class PrefixNotShared(Exception):
    """A batch whose prompts cannot be run once for all their rows (:meth:`VLMAdapter.prompt_cache`):
    the caller runs its unshared forward instead."""


def is_dynamic_cache(cache) -> bool:
    """True for a key/value cache whose every layer is a plain growing store (one that rows can be
    indexed out of and continued; not sliding-window or static layers)."""
    layers = getattr(cache, "layers", None)
    if layers is None or not hasattr(cache, "batch_select_indices"):
        return False
    return all(type(layer).__name__ == "DynamicLayer" for layer in layers)


class _Memo:
    """A bounded memo (oldest entry evicted first) for pure functions of hashable keys."""

    def __init__(self, size: int):
        self.size = size
        self._d: dict = {}

    def get(self, key, compute):
        hit = self._d.get(key)
        if hit is None:
            hit = compute()
            if len(self._d) >= self.size:
                self._d.pop(next(iter(self._d)))
            self._d[key] = hit
        return hit


class VLMAdapter:
    """Family-neutral behaviour; subclasses override the marked hooks."""

    family: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()
    # name of the special token that the chat template renders for each image
    placeholder_token: ClassVar[str] = "<image>"
    # Parameter-name prefixes (on the *ForConditionalGeneration model) per group.
    vision_prefixes: ClassVar[tuple[str, ...]] = ("model.vision_tower.",)
    projector_prefixes: ClassVar[tuple[str, ...]] = ("model.multi_modal_projector.",)
    head_prefixes: ClassVar[tuple[str, ...]] = ("lm_head.",)
    # True where an image's features depend on the prompt text (InstructBLIP's Q-Former reads the
    # instruction): encode once per (image, ``image_prompt(prompt)``) and pass ``prompts``.
    encoding_uses_prompt: ClassVar[bool] = False
    # Most images one sample may hold (None: any number).
    max_images: ClassVar[int | None] = None
    # False where the model puts image tokens in a fixed place (InstructBLIP: before BOS) and the
    # chat template renders no placeholder for them.
    placeholders_in_text: ClassVar[bool] = True
    # True where a prompt's key/value cache can be continued exactly by passing 1-D position ids
    # (methods/logps.py shares the prompt between chosen and rejected); False for families whose
    # positions or attention depend on the whole sequence (M-RoPE, prefix-LM), with the reason.
    prefix_sharing: ClassVar[bool] = True
    prefix_sharing_note: ClassVar[str] = ""
    # False where the family's own generate cannot continue a prefilled key/value cache (rollouts
    # then prefill each of a prompt's k rows; InstructBLIP's generate builds its own embeddings)
    prefill_sharing: ClassVar[bool] = True
    # Sequence packing (``forward(segment_ids=...)``, SFT's ``data.packing``). None: supported;
    # otherwise why this family cannot hold several samples in one row (the run is refused with it).
    packing_refused: ClassVar[str | None] = None
    # How a packed row's samples are kept from attending to each other:
    # "position_ids": position ids restart at every sample and no 2-D mask is passed; transformers
    #   (5.25) then builds the block-diagonal causal mask itself for sdpa / eager / flex
    #   (masking_utils.find_packed_sequence_indices) and flash-attention runs its varlen kernel;
    # "mask": a block-diagonal causal 4-D mask built here (block_diagonal_mask), which
    #   transformers passes through untouched (never with flash-attention, which takes no 4-D mask).
    packing_attention: ClassVar[str] = "position_ids"
    # Parameters (full names in ``model``) that ``encode_images`` reads outside the forward of
    # every FSDP2 unit (``shard_units``): bare parameters of a module that is no unit
    # (InstructBLIP's ``query_tokens`` and LLaVA-NeXT's ``image_newline``, read by the encoding
    # itself; the Mllama tower's ``class_embedding``, a tower taken by its children). They would
    # fall to the root unit, gathered only in the model's forward, so sharding keeps them whole
    # on every process instead and averages their gradients itself (``engine/sharding.py``).
    replicated_params: ClassVar[tuple[str, ...]] = ()
    # The training stage the adapter serves: None outside training, "pretrain" (projector
    # pretraining) or "finetune" (every other method), set by methods/setup.prepare_trainable.
    # Families whose inputs or frozen parts differ by stage read it (AlignGPT, aligngpt.py).
    stage: str | None = None

    def __init__(self, model: nn.Module, processor: Any):
        self.model = model
        # module called for the text forward: the model itself, or its accelerate/DDP/FSDP wrapper
        self.runner: nn.Module = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        tid = self.tokenizer.convert_tokens_to_ids(self.placeholder_token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ModelError(f"{self.family}: tokenizer has no placeholder token {self.placeholder_token!r}")
        self.placeholder_id: int = tid
        cfg = model.config
        # id of the tokens that receive image features inside an expansion
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(cfg, "image_token_index", None)
        self.encode_calls = 0  # number of encode_images calls (tests count encodings)
        self.encoded_images = 0
        # chat-template renders and text encodings by content: datasets repeat prompts (and VQA
        # whole conversations) across images, and a template render costs far more than a lookup
        self._text_memo = _Memo(8192)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, *, trust_remote_code: bool = False, dtype=None,
                        device: str | torch.device | None = None, **kwargs) -> "VLMAdapter":
        from .loading import load_model_and_processor
        model, processor = load_model_and_processor(path, trust_remote_code=trust_remote_code,
                                                    dtype=dtype, **kwargs)
        if device is not None:
            model.to(device)
        return cls(model, processor)

    def save_pretrained(self, out_dir: str) -> None:
        self.model.save_pretrained(out_dir, safe_serialization=True)
        self.processor.save_pretrained(out_dir)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ parameters
    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Split named parameters into vision / projector / language / head.

        Everything that is neither vision, projector nor head is language (embeddings,
        decoder layers, final norm). Tied output heads appear once, under language.
        """
        groups: dict[str, list] = {"vision": [], "projector": [], "language": [], "head": []}
        for name, p in self.model.named_parameters():
            groups[self._group_of(name)].append((name, p))
        return groups

    def _group_of(self, name: str) -> str:
        if name.startswith(self.vision_prefixes):
            return "vision"
        if name.startswith(self.projector_prefixes):
            return "projector"
        if name.startswith(self.head_prefixes):
            return "head"
        return "language"

    def set_trainable(self, *, vision: bool, projector: bool, language: bool, head: bool | None = None):
        """Freeze or unfreeze whole groups (head follows language unless given)."""
        flags = {"vision": vision, "projector": projector, "language": language,
                 "head": language if head is None else head}
        frozen = self.frozen_parameter_names()
        for g, params in self.param_groups().items():
            for name, p in params:
                p.requires_grad_(flags[g] and name not in frozen)

    def frozen_parameter_names(self) -> set[str]:
        """Parameters the family keeps frozen in the current ``stage`` whatever the groups say
        (AlignGPT's indicators in fine-tuning); methods/setup.py keeps them frozen under LoRA too,
        where PEFT copies the projector. Default: none."""
        return set()

    def record_inputs(self, record: Record, *, stage: str) -> dict[str, int]:
        """Extra per-record forward inputs read from the record's fields in ``stage`` (one integer
        per name, batched to a (B,) tensor and passed to ``forward``; AlignGPT's pretraining
        passes each record's ``similarity`` bucket as ``alignment_level``). Raise a DataError
        naming the field where the record lacks it. Default: none."""
        return {}

    def lora_target_modules(self, include_vision: bool = False, include_head: bool = False) -> list[str]:
        """Full names of the Linear layers LoRA should wrap: the language model's by default."""
        out = []
        for name, mod in self.model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            g = self._group_of(name + ".")
            if g == "language" or (g == "vision" and include_vision) or (g == "head" and include_head):
                out.append(name)
        return out

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards as units of their own (``engine/sharding.py``; the trained
        module itself is the root unit around them):

        * every layer the model declares unsplittable (transformers' ``_no_split_modules``:
          decoder layers, vision-encoder layers, patch embeddings);
        * the modules ``encode_images`` runs outside the model's forward: the vision tower and
          projector (``vision_prefixes`` / ``projector_prefixes`` naming a module), so the
          encoding gathers their parameters itself. A tower that is a transformers model is
          taken by its children: transformers finds which outputs a model records (the hidden
          states the projector reads) by the model's class, and sharding replaces the class. A
          container without a forward (a ``ModuleList``, e.g. Qwen3-VL's DeepStack mergers), which
          FSDP2 refuses as a unit, is taken by its members.
        """
        from transformers import PreTrainedModel
        names = set()
        for m in self.model.modules():
            names.update(getattr(m, "_no_split_modules", None) or ())
        units = [m for m in self.model.modules() if type(m).__name__ in names]
        covered = {id(p) for u in units for p in u.parameters()}
        for prefix in (*self.vision_prefixes, *self.projector_prefixes):
            try:
                mod = self.model.get_submodule(prefix.rstrip("."))
            except AttributeError:
                continue   # a bare parameter (e.g. an image_newline): replicated_params
            parts = list(mod.children()) if isinstance(mod, PreTrainedModel) else [mod]
            parts = [m for part in parts for m in
                     (part.children() if isinstance(part, (nn.ModuleList, nn.ModuleDict)) else [part])]
            for part in parts:
                if any(id(p) not in covered for p in part.parameters()):
                    units.append(part)
                    covered.update(id(p) for p in part.parameters())
        return units

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The parameters named by ``replicated_params``: FSDP2 leaves them unsharded
        (``engine/sharding.py``)."""
        return [self.model.get_parameter(n) for n in self.replicated_params]

    @classmethod
    def load_processor(cls, path: str, *, trust_remote_code: bool = False):
        """AutoProcessor, checked; where it fails, the family's ``_fallback_processor``.

        AutoProcessor hands back the bare tokenizer when it does not know the saved processor
        class (e.g. our image-only processors), so a result without an image processor counts
        as a failure too.
        """
        from transformers import AutoProcessor
        try:
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - ImportError (torchvision), ValueError, OSError by version
            reason = repr(e)
        else:
            if getattr(processor, "image_processor", None) is not None and hasattr(processor, "_process_images"):
                return processor
            reason = f"it returned a {type(processor).__name__}, not a processor with an image processor"
        try:
            fallback = cls._fallback_processor(path, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot load a processor from {path!r}: AutoProcessor failed ({reason}); "
                             f"the fallback failed with {e!r}") from None
        if fallback is None:
            raise ModelError(f"cannot load a processor from {path!r}: AutoProcessor failed ({reason})")
        return fallback

    @classmethod
    def _fallback_processor(cls, path: str, *, trust_remote_code: bool = False):
        """A processor built another way when AutoProcessor fails (None: no fallback)."""
        return None

    # ------------------------------------------------------------------ images (family hooks)
    # keys of the image processor's output that the vision encoder takes
    encoder_keys: ClassVar[tuple[str, ...] | None] = None

    def preprocess_image(self, image) -> ImageInputs:
        """One image -> family tensors + the exact ids the processor puts in its place.

        Uses the transformers 5.x processor contract: ``_process_images`` returns the processed
        tensors and, per image, the replacement string for its placeholder token.
        """
        try:
            processed, reps = self.processor._process_images([image], return_tensors="pt")
        except (AttributeError, NotImplementedError) as e:
            raise ModelError(f"{type(self.processor).__name__} does not expose per-image placeholder "
                             f"expansion; this family needs its own adapter ({e})") from None
        expansion = list(self._encode_text(reps[0])[0])
        keys = self.encoder_keys or [k for k, v in processed.items() if isinstance(v, torch.Tensor)]
        tensors = {k: processed[k] for k in keys if k in processed}
        n_feat = sum(1 for t in expansion if t == self.image_token_id)
        return ImageInputs(tensors=tensors, expansion=expansion, num_features=n_feat)

    def collate_images(self, items: Sequence[ImageInputs]) -> dict[str, torch.Tensor]:
        """Batch per-image tensors for the encoder (default: concatenate along dim 0)."""
        keys = items[0].tensors.keys()
        return {k: torch.cat([it.tensors[k] for it in items], dim=0) for k in keys}

    def _encode(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run vision tower + projector; return one (num_features, hidden) tensor per image."""
        out = self.model.model.get_image_features(**batch, return_dict=True)
        feats = out.pooler_output
        return list(feats)

    def image_prompt(self, prompt: str | Sequence[Message] | None) -> str | None:
        """The text an image's encoding depends on (None: it depends on no text, the default).

        ``prompt`` is the messages that hold the image or a string used verbatim. Callers that
        share encodings between records key them on (image, ``image_prompt(prompt)``).
        """
        return None

    def _encoder_text_inputs(self, prompts, n: int) -> dict[str, torch.Tensor]:
        """Extra encoder tensors computed from ``prompts`` (only where ``encoding_uses_prompt``)."""
        return {}

    def encode_images(self, items: Sequence[ImageInputs], *,
                      prompts: Sequence[str | Sequence[Message]] | None = None) -> EncodedImages:
        """Encode unique images once. Features keep their autograd graph (trainable towers).

        ``prompts`` (one per item: the messages that hold the image, or a string) is needed only
        where ``encoding_uses_prompt``; other families ignore it.
        """
        if not items:
            return EncodedImages(features=[])
        dev, dtype = self.device, next(self.model.parameters()).dtype
        batch = self.collate_images(items)
        batch.update(self._encoder_text_inputs(prompts, len(items)))
        batch = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in batch.items()}
        self.encode_calls += 1
        self.encoded_images += len(items)
        feats = self._encode(batch)
        for it, f in zip(items, feats):
            if f.shape[0] != it.num_features:
                raise ModelError(f"{self.family}: image gave {f.shape[0]} features, expected {it.num_features}")
        return EncodedImages(features=feats, extras=self._encode_extras(items))

    def _encode_extras(self, items: Sequence[ImageInputs]) -> dict[str, torch.Tensor]:
        return {}

    def mm_kwargs(self, encoded: EncodedImages | None, indices: Sequence[int]) -> dict[str, Any]:
        """Forward kwargs for a batch whose placeholders, row by row, use images ``indices``."""
        if encoded is None or len(indices) == 0:
            return {}
        feats = [encoded.features[i] for i in indices]
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)}}

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                encoded: EncodedImages | None = None, image_indices: Sequence[Sequence[int]] = (),
                pixel_inputs: dict[str, torch.Tensor] | None = None,
                segment_ids: torch.Tensor | None = None, **kwargs):
        """Model forward on token ids with already-encoded images.

        ``image_indices[b]`` lists, in order, which of ``encoded``'s images row ``b``'s
        placeholders use (rows may share images). ``pixel_inputs`` instead runs the model's
        own image path (used to prove equivalence). ``segment_ids`` (B, T) marks packed rows:
        1, 2, ... per sample in row order, 0 on padding (``data.batching.SFTCollator``); the
        position ids and attention then come from :meth:`packed_inputs`, so each sample sees
        exactly what it would see alone in a row.
        """
        flat = [i for row in image_indices for i in row]
        mm = dict(pixel_inputs) if pixel_inputs is not None else self.mm_kwargs(encoded, flat)
        mm.update(self._extra_forward_kwargs(input_ids, attention_mask, mm))
        if segment_ids is not None:
            packed = self.packed_inputs(input_ids, segment_ids, mm)
            attention_mask = packed.pop("attention_mask")
            mm.update(packed)
            # a training layout: with a cache transformers skips its packed-sequence detection
            kwargs["use_cache"] = False
        return self.runner(input_ids=input_ids, attention_mask=attention_mask, **mm, **kwargs)

    # ------------------------------------------------------------------ packing
    def check_packing(self) -> None:
        """Raise ModelError where this family cannot pack several samples into one row."""
        if self.packing_refused:
            raise ModelError(f"{self.family}: data.packing is not supported: {self.packing_refused}")

    def packed_inputs(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, mm: dict[str, Any], *,
                      attention: str | None = None) -> dict[str, Any]:
        """Forward kwargs for packed rows: ``position_ids`` restarting at every sample and the
        ``attention_mask`` that keeps each sample's attention inside it (None on the
        "position_ids" path, a 4-D block-diagonal mask on the "mask" path; ``attention``
        overrides the family's ``packing_attention``). Families add what their forward derives
        from the whole row (Qwen2-VL: M-RoPE ids; PaliGemma: prefix-LM token types)."""
        self.check_packing()
        mode = attention or self.packing_attention
        if mode not in ("position_ids", "mask"):
            raise ValueError(f"packing attention {mode!r}: expected 'position_ids' or 'mask'")
        impl = self._attn_implementation()
        if "flash" in impl:  # flash kernels take no 4-D mask; they run varlen from the position ids
            mode = "position_ids"
        out: dict[str, Any] = {"position_ids": self._packed_position_ids(input_ids, segment_ids, mm)}
        if mode == "mask":
            dtype = None if impl != "eager" else next(self.model.parameters()).dtype
            out["attention_mask"] = block_diagonal_mask(segment_ids, dtype)
        else:
            out["attention_mask"] = None
        return out

    def _attn_implementation(self) -> str:
        cfg = self.model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return str(getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", "") or "")

    def _packed_position_ids(self, input_ids, segment_ids, mm) -> torch.Tensor:
        """(B, T) position ids of packed rows: 0, 1, ... from each sample's first token."""
        return segment_positions(segment_ids)

    def _extra_forward_kwargs(self, input_ids, attention_mask, mm) -> dict:
        """Family kwargs derived from the ids for a forward or generate with ``mm`` (e.g.
        Qwen2-VL's ``mm_token_type_ids``)."""
        return {}

    def _mm_inputs(self, input_ids, attention_mask, encoded, image_indices) -> dict[str, Any]:
        """``mm_kwargs`` of the rows' images plus the family's extra kwargs."""
        flat = [i for row in image_indices for i in row]
        mm = self.mm_kwargs(encoded, flat)
        mm.update(self._extra_forward_kwargs(input_ids, attention_mask, mm))
        return mm

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     encoded: EncodedImages | None = None,
                     image_indices: Sequence[Sequence[int]] = ()) -> torch.Tensor | None:
        """Position ids of (left-)padded rows as ``generate`` computes them, for a forward that
        must score them at the same positions (a plain forward counts padding).

        HF's own rule from the attention mask: ``cumsum - 1`` for 1-D positions; Qwen2-VL's
        (4, B, L) text + M-RoPE t/h/w ids from the mask, ``image_grid_thw`` and
        ``mm_token_type_ids``. None where the model's forward takes no ``position_ids``.
        """
        model = self.model
        if "position_ids" not in inspect.signature(model.forward).parameters:
            return None
        fn = getattr(model, "_prepare_position_ids_for_generation", None)
        if fn is None:  # not a GenerationMixin: the 1-D rule
            return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        mm = self._mm_inputs(input_ids, attention_mask, encoded, image_indices)
        return fn(input_ids, {"attention_mask": attention_mask, **mm})

    def kv_cache(self, output):
        """The key/value cache a ``forward(..., use_cache=True)`` returned (None if none)."""
        return getattr(output, "cache", None)

    def prompt_cache(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, next_ids: torch.Tensor, *,
                     encoded: EncodedImages | None = None, image_indices: Sequence[Sequence[int]] = (),
                     position_ids: torch.Tensor | None = None):
        """Prefix sharing's first half: the distinct prompts ``ids`` (P, L) without their last token
        (``next_ids``, (P,)) run once, images included, and their key/value cache indexed out to the
        R rows that continue them (``rows[r]``: row r's prompt), differentiably. The caller runs
        each row's ``[its next_id] + completion`` on top. Raises :class:`PrefixNotShared` where
        that would not be exact: a prompt of fewer than 2 tokens, one whose last token is an
        image token, a model whose cache is not a plain dynamic one (:func:`is_dynamic_cache`)."""
        if int(mask.sum(1).min()) < 1:
            raise PrefixNotShared("a prompt has fewer than 2 tokens")
        if self.image_token_id is not None and bool((next_ids == self.image_token_id).any()):
            raise PrefixNotShared("a prompt ends with an image token")
        out = self.forward(ids, mask, encoded=encoded, image_indices=image_indices, position_ids=position_ids,
                           use_cache=True, logits_to_keep=1)
        cache = self.kv_cache(out)
        if cache is None or not is_dynamic_cache(cache):
            raise PrefixNotShared(f"the model returned no plain dynamic key/value cache ({type(cache).__name__})")
        cache.batch_select_indices(rows)                                   # (P, ...) -> (R, ...)
        return cache

    def prefix_sharing_problem(self) -> str | None:
        """Why a prompt's key/value cache cannot be continued exactly for several completions with
        this model as it is set up (None: it can): the family's positions or attention depend on
        the whole sequence, or activation checkpointing is on (no cache in training). Callers add
        what they know beyond the model (FSDP2 sharding with gradients)."""
        if not self.prefix_sharing:
            return (f"{self.family}: prefix sharing is not exact for this family "
                    f"({self.prefix_sharing_note or 'not supported'})")
        on = getattr(self.model, "is_activation_checkpointing", None)   # transformers >= 5.x name
        if on is None:
            on = getattr(self.model, "is_gradient_checkpointing", False)
        if on:
            return "activation checkpointing is on (the model returns no key/value cache in training)"
        return None

    def stop_token_ids(self) -> list[int]:
        """Ids that end a generated answer: the generation config's EOS ids and the tokenizer's."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 encoded: EncodedImages | None = None, image_indices: Sequence[Sequence[int]] = (),
                 **generate_kwargs) -> torch.Tensor:
        """``model.generate`` from already-encoded images (``image_indices`` as in ``forward``).
        Returns prompt + new token ids, like HF generate for decoder-only models. With
        ``cache`` (a key/value cache of every prompt column but the last, computed by the
        caller: rollouts prefill each prompt once for its k samples) the images are already in the
        cache and their features are not passed again."""
        if generate_kwargs.get("cache") is not None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        mm = self._mm_inputs(input_ids, attention_mask, encoded, image_indices)
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **mm, **generate_kwargs)

    def new_tokens(self, output: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The generated ids of a ``generate`` output: the columns after ``input_ids`` where the
        output starts with them (the contract), else the whole output (a custom ``generate``
        that returns new ids only)."""
        Lp = input_ids.shape[1]
        return output[:, Lp:] if output.shape[1] >= Lp and torch.equal(output[:, :Lp], input_ids) else output

    # ------------------------------------------------------------------ text
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        hf = to_hf_messages(messages)
        return self._text_memo.get(
            ("render", add_generation_prompt, repr(hf)),
            lambda: self.processor.apply_chat_template(hf, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt))

    def _assistant_spans(self, messages: Sequence[Message], full: str) -> list[tuple[int, int]]:
        """Character spans of each assistant turn in ``full`` (content + end-of-turn marker)."""
        spans = []
        for j, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before = self.render(messages[:j], add_generation_prompt=True)
            # the last turn's render is ``full`` itself (one template render fewer per record)
            upto = full if j + 1 == len(messages) else self.render(messages[: j + 1])
            if not (full.startswith(upto) and upto.startswith(before)):
                raise ModelError(f"{self.family}: the chat template is not prefix-stable, so assistant "
                                 "turns cannot be located for the loss mask")
            end = len(upto.rstrip())
            spans.append((len(before), end))
        return spans

    def _encode_text(self, text: str):
        """(ids, offsets) of ``text`` as tuples (shared by every caller: never mutated)."""
        def encode():
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return tuple(enc["input_ids"]), tuple(map(tuple, enc["offset_mapping"]))
        return self._text_memo.get(("encode", text), encode)

    def _expand(self, ids: list[int], labels: list[int], images: Sequence[ImageInputs]):
        """Replace each placeholder id by its image's expansion (labels there: ignored)."""
        n_ph = sum(1 for t in ids if t == self.placeholder_id)
        if n_ph != len(images):
            raise DataError(f"placeholder count {n_ph} differs from image count {len(images)}",
                            field="images")
        out_ids, out_labels, k = [], [], 0
        for t, lab in zip(ids, labels):
            if t == self.placeholder_id:
                exp = images[k].expansion
                out_ids.extend(exp)
                out_labels.extend([IGNORE_INDEX] * len(exp))
                k += 1
            else:
                out_ids.append(t)
                out_labels.append(lab)
        return out_ids, out_labels

    def _ends_turn(self, token_id: int) -> bool:
        """True for a token that ends an answer (EOS or a family end-of-turn token)."""
        return token_id in self.stop_token_ids()

    def _ensure_eos(self, ids, offsets, spans):
        """Make every assistant span end with an end-of-turn token: templates like llava-hf's
        omit it, and a model trained without it never learns to stop. Where the template's
        answer already ends with one (EOS, Idefics3's ``<end_of_utterance>``), nothing is
        inserted. Returns ids, offsets and the token spans to supervise."""
        eos = self.tokenizer.eos_token_id
        out_ids, out_off, tok_spans = list(ids), list(offsets), []
        for (s, e) in reversed(spans):
            inside = [i for i, (a, b) in enumerate(out_off) if a >= s and b <= e and b > a]
            if not inside:
                raise DataError("empty assistant response", field="messages")
            first, last = inside[0], inside[-1]
            if self._ends_turn(out_ids[last]):
                tok_spans.append((first, last + 1))
                continue
            out_ids.insert(last + 1, eos)
            out_off.insert(last + 1, (e, e))
            # spans recorded so far lie to the right of this insertion: shift them by one
            tok_spans = [(a + 1, b + 1) for a, b in tok_spans]
            tok_spans.append((first, last + 2))
        return out_ids, out_off, list(reversed(tok_spans))

    def tokenize_messages(self, messages: Sequence[Message], images: Sequence[ImageInputs], *,
                          add_generation_prompt: bool = False, max_length: int | None = None) -> Tokenized:
        """Chat-template the messages; labels on assistant turns only (each ending with EOS)."""
        full = self.render(messages, add_generation_prompt=add_generation_prompt)
        ids, offsets = map(list, self._encode_text(full))   # the memo's tuples stay as they are
        spans = self._assistant_spans(messages, full) if not add_generation_prompt else []
        if any(m.role == "assistant" for m in messages) and not add_generation_prompt:
            ids, offsets, tok_spans = self._ensure_eos(ids, offsets, spans)
        else:
            tok_spans = []
        labels = [IGNORE_INDEX] * len(ids)
        for a, b in tok_spans:
            labels[a:b] = ids[a:b]
        ids, labels = self._expand(ids, labels, images)
        out = Tokenized(ids, labels, len(images), [im.num_tokens for im in images])
        self._check_length(len(out), out.image_token_counts, max_length)
        return out

    @staticmethod
    def _check_length(n: int, counts: Sequence[int], max_length: int | None, what: str = "sample"):
        if max_length is not None and n > max_length:
            raise LengthError(
                f"{what} is {n} tokens (images: {sum(counts)} tokens for {len(counts)} image(s)), over "
                f"max_length {max_length}; cutting it would drop image or response tokens")

    def tokenize_prompt(self, prompt: Sequence[Message], images: Sequence[ImageInputs], *,
                        max_length: int | None = None) -> Tokenized:
        """A prompt ready for generation (ends with the assistant turn opener)."""
        return self.tokenize_messages(prompt, images, add_generation_prompt=True, max_length=max_length)

    def tokenize_completion(self, prompt: Sequence[Message], completion: str,
                            images: Sequence[ImageInputs], *, max_length: int | None = None):
        """(prompt_ids, completion_ids) where prompt_ids end with the assistant opener and
        completion_ids are the supervised tokens (response + EOS)."""
        t = self.tokenize_messages([*prompt, Message.assistant(completion)], images, max_length=max_length)
        first = next(i for i, lab in enumerate(t.labels) if lab != IGNORE_INDEX)
        if any(lab == IGNORE_INDEX for lab in t.labels[first:]):
            # tokens after the response that are not supervised (template tail): keep them out
            last = max(i for i, lab in enumerate(t.labels) if lab != IGNORE_INDEX)
            return t.input_ids[:first], t.input_ids[first:last + 1], t
        return t.input_ids[:first], t.input_ids[first:], t

    def tokenize_preference(self, pair: PreferencePair, images: Sequence[ImageInputs], *,
                            max_length: int | None = None) -> TokenizedPair:
        """Shared prompt + chosen/rejected completions (each with EOS).

        ``max_length`` applies to prompt + the longer completion.
        """
        p_c, c_ids, _ = self.tokenize_completion(pair.prompt, pair.chosen, images)
        p_r, r_ids, _ = self.tokenize_completion(pair.prompt, pair.rejected, images)
        if p_c != p_r:
            raise ModelError(f"{self.family}: prompt tokens differ between chosen and rejected "
                             "(tokenizer merges across the prompt/response boundary)")
        counts = [im.num_tokens for im in images]
        self._check_length(len(p_c) + max(len(c_ids), len(r_ids)), counts, max_length, "preference pair")
        return TokenizedPair(p_c, c_ids, r_ids, len(images), counts)

    # ------------------------------------------------------------------ records
    def tokenize_record(self, record: Record, images: Sequence[ImageInputs], *,
                        max_length: int | None = None):
        """Tokenize any schema record the way training would (errors name the record)."""
        try:
            if isinstance(record, Conversation):
                return self.tokenize_messages(record.messages, images, max_length=max_length)
            if isinstance(record, PreferencePair):
                return self.tokenize_preference(record, images, max_length=max_length)
            if isinstance(record, RankedList):
                return [self.tokenize_completion(record.prompt, r, images, max_length=max_length)[2]
                        for r in record.responses]
            if isinstance(record, UnpairedExample):
                return self.tokenize_completion(record.prompt, record.completion, images,
                                                max_length=max_length)[2]
            if isinstance(record, RLPrompt):
                return self.tokenize_prompt(record.prompt, images, max_length=max_length)
        except DataError as e:
            raise e.located(file=record.source, index=record.index) from None
        raise TypeError(f"unknown record type {type(record).__name__}")

    def check_length(self, record: Record, images: Sequence, max_length: int) -> None:
        """Raise LengthError if ``record`` cannot be trained at ``max_length`` without cutting
        image or response tokens. ``images`` are PIL images in record order."""
        inputs = [self.preprocess_image(im) for im in images]
        self.tokenize_record(record, inputs, max_length=max_length)

    def image_token_count(self, image) -> int:
        """How many text tokens this (PIL) image becomes in this model's sequence."""
        return self.preprocess_image(image).num_tokens
