"""AlignGPT alignment levels (Zhao et al. 2024, "AlignGPT: Multi-modal Large Language Models with
Adaptive Alignment Capability") as an option of LLaVA and composed models.

The model (``vlmalign_aligngpt``, registered with the Auto classes like ``vlmalign_resampler``)
is a LLaVA model (LLaVA's MLP projector or our perceiver / Q-Former resampler) with

* ``N`` learned indicator embeddings ``H_1..H_N`` (``model.alignment.indicators``, default
  N = 8: ``H_1..H_{N-1}`` local levels, ``H_N`` the global one), and
* a gate ``MLP: R^T -> R^{N-1}`` (T = image tokens per image; Linear, GELU, Linear).

One position per sequence, right after BOS (at the start where the template has no BOS), holds
the special token ``<align>``; the chat template puts it there, so every tokenization path
(training, prompts, generation) has it, lengths and labels stay those of the ids, and a key/value
cache continues normally. The model replaces that token's embedding:

* with ``alignment_level`` (one integer per row: the record's ``similarity`` bucket, passed by
  pretraining): ``H_align = H_{level+1}`` (levels are 0-based in data, 1-based in the paper);
* without it (fine-tuning, inference): ``alpha = softmax(MLP(H_I . h_T))``, where ``H_I``
  (T x d) are the row's projected image tokens, ``h_T`` the mean input embedding of the row's
  text tokens (not BOS, ``<align>``, image tokens or padding) and ``.`` the dot product of each
  image token with it; then ``H_align = H_N + sum_i alpha_i H_i``. A row with several images
  averages their T dot products first; a row without images gets ``H_N``.

docs/MODELS.md ("AlignGPT alignment levels") has the equations and what the adapter freezes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel
from transformers.models.llava.modeling_llava import (LlavaForConditionalGeneration, LlavaModel,
                                                      LlavaModelOutputWithPast, LlavaMultiModalProjector,
                                                      LlavaPreTrainedModel)

from ..errors import ModelError
from .llava import LlavaAdapter
from .registry import register, register_tiny
from .resampler import PROJECTORS as RESAMPLERS
from .resampler import Resampler, VlmalignResamplerConfig

MODEL_TYPE = "vlmalign_aligngpt"
ALIGN_TOKEN = "<align>"
PROJECTORS = ("llava", *RESAMPLERS)


class VlmalignAlignGPTConfig(VlmalignResamplerConfig):
    """A LLaVA config with the alignment-level fields; ``projector_type`` ``llava`` is LLaVA's
    ``linear_1 -> act -> linear_2`` (``projector_hidden_act``), the others our resampler's."""

    model_type = MODEL_TYPE
    projector_type: str = "llava"
    alignment_levels: int = 8          # N indicators: N - 1 local levels + 1 global
    alignment_gate_hidden: int = 256   # the gate MLP's hidden width
    alignment_image_tokens: int = 0    # T: image tokens per image (the gate's input width)
    alignment_token_id: int = -1       # id of <align> in the tokenizer

    def __post_init__(self, **kwargs):
        super(VlmalignResamplerConfig, self).__post_init__(**kwargs)
        if self.projector_type not in PROJECTORS:
            raise ValueError(f"projector_type {self.projector_type!r}: choose from {', '.join(PROJECTORS)}")
        if self.alignment_levels < 2:
            raise ValueError(f"alignment_levels {self.alignment_levels}: at least 2 (local levels + the global one)")


class AlignmentLevels(nn.Module):
    """The indicator embeddings and the gate."""

    def __init__(self, config: VlmalignAlignGPTConfig):
        super().__init__()
        width = config.text_config.hidden_size
        self.indicators = nn.Parameter(torch.zeros(config.alignment_levels, width))
        self.gate = nn.Sequential(nn.Linear(max(config.alignment_image_tokens, 1), config.alignment_gate_hidden),
                                  nn.GELU(), nn.Linear(config.alignment_gate_hidden, config.alignment_levels - 1))

    def by_level(self, levels: torch.Tensor) -> torch.Tensor:
        """(B,) 0-based levels -> (B, d): the level's indicator (pretraining)."""
        n = self.indicators.shape[0]
        if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) >= n):
            raise ModelError(f"alignment_level {levels.tolist()}: levels must lie in 0..{n - 1} "
                             f"(the model has {n} indicators)")
        return self.indicators[levels]

    def weights(self, dots: torch.Tensor) -> torch.Tensor:
        """(B, T) image-token . mean-text dot products -> (B, N-1) softmax weights of the local levels."""
        return self.gate(dots.to(self.gate[0].weight.dtype)).softmax(dim=-1)

    def mixed(self, alpha: torch.Tensor) -> torch.Tensor:
        """(B, N-1) weights -> (B, d): H_N + sum_i alpha_i H_i."""
        return alpha @ self.indicators[:-1] + self.indicators[-1]


def _projector(config):
    return LlavaMultiModalProjector(config) if config.projector_type == "llava" else Resampler(config)


class _Init:
    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        from transformers import initialization as init
        if isinstance(module, AlignmentLevels):   # skipped where loaded from a checkpoint
            init.xavier_uniform_(module.indicators)
        elif isinstance(module, Resampler):
            init.normal_(module.queries, std=module.queries.shape[-1] ** -0.5)


class VlmalignAlignGPTModel(_Init, LlavaModel):
    config_class = VlmalignAlignGPTConfig

    def __init__(self, config: VlmalignAlignGPTConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = _projector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.alignment = AlignmentLevels(config)
        self.post_init()

    def _alignment_rows(self, input_ids, attention_mask, text_embeds, image_mask, inputs_embeds, levels):
        """(B, d) indicator of each row."""
        if levels is not None:
            levels = torch.as_tensor(levels, device=input_ids.device).long().view(-1)
            if levels.shape[0] != input_ids.shape[0]:
                raise ModelError(f"alignment_level has {levels.shape[0]} values for {input_ids.shape[0]} rows")
            return self.alignment.by_level(levels)
        cfg = self.config
        T = cfg.alignment_image_tokens
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        text = mask & ~image_mask & (input_ids != cfg.alignment_token_id)
        bos = cfg.text_config.bos_token_id
        if bos is not None:
            text &= input_ids != bos
        t = text.unsqueeze(-1).to(text_embeds.dtype)
        mean_text = (text_embeds * t).sum(1) / t.sum(1).clamp_min(1.0)            # (B, d)
        alpha = []
        has_image = []
        for b in range(input_ids.shape[0]):
            feats = inputs_embeds[b][image_mask[b]]                               # (k*T, d)
            has_image.append(feats.shape[0] > 0)
            if not feats.shape[0]:
                alpha.append(None)
                continue
            if feats.shape[0] % T:
                raise ModelError(f"row {b}: {feats.shape[0]} image tokens, not a multiple of the gate's "
                                 f"{T} tokens per image")
            dots = (feats.view(-1, T, feats.shape[-1]) @ mean_text[b]).mean(0)  # (T,)
            alpha.append(dots)
        out = self.alignment.indicators[-1].unsqueeze(0).repeat(input_ids.shape[0], 1)
        rows = [b for b, h in enumerate(has_image) if h]
        if rows:
            w = self.alignment.weights(torch.stack([alpha[b] for b in rows]))
            out = out.index_put((torch.tensor(rows, device=out.device),), self.alignment.mixed(w))
        return out

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None,
                image_sizes=None, mm_encoder_outputs=None, alignment_level=None, **kwargs):
        if input_ids is None:
            raise ModelError(f"{MODEL_TYPE}: the forward needs input_ids (the <align> position is found in them)")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        text_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds = text_embeds
        mm_encoder_outputs = dict(mm_encoder_outputs) if mm_encoder_outputs is not None else {}
        if mm_encoder_outputs.get("image") is None and pixel_values is not None:
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes,
                return_dict=True, **kwargs)
        image_mask = input_ids == self.config.image_token_id
        if mm_encoder_outputs.get("image") is not None:
            feats = torch.cat(mm_encoder_outputs["image"].pooler_output, dim=0).to(text_embeds.device,
                                                                                   text_embeds.dtype)
            mask3 = self.get_placeholder_mask(input_ids, inputs_embeds=text_embeds, image_features=feats)
            inputs_embeds = text_embeds.masked_scatter(mask3, feats)
        align_at = input_ids == self.config.alignment_token_id
        if align_at.any():
            if (align_at.sum(1) > 1).any():
                raise ModelError(f"a row holds more than one {ALIGN_TOKEN} token")
            rows = self._alignment_rows(input_ids, attention_mask, text_embeds, image_mask, inputs_embeds,
                                        alignment_level)
            # each row's <align> position takes its row's indicator
            which = align_at.any(1)
            inputs_embeds = inputs_embeds.masked_scatter(align_at.unsqueeze(-1),
                                                         rows[which].to(inputs_embeds.dtype))
        elif alignment_level is not None and input_ids.shape[1] > 1:
            raise ModelError(f"alignment_level was given but no row holds the {ALIGN_TOKEN} token (the chat "
                             "template puts it after BOS)")
        outputs = self.language_model(attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                      inputs_embeds=inputs_embeds, **kwargs)
        return LlavaModelOutputWithPast(**outputs, image_outputs=mm_encoder_outputs.get("image"))


class VlmalignAlignGPTForConditionalGeneration(_Init, LlavaForConditionalGeneration):
    config_class = VlmalignAlignGPTConfig

    def __init__(self, config: VlmalignAlignGPTConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = VlmalignAlignGPTModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


def register_auto() -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaProcessor
    AutoConfig.register(MODEL_TYPE, VlmalignAlignGPTConfig, exist_ok=True)
    AutoModel.register(VlmalignAlignGPTConfig, VlmalignAlignGPTModel, exist_ok=True)
    AutoModelForImageTextToText.register(VlmalignAlignGPTConfig, VlmalignAlignGPTForConditionalGeneration,
                                         exist_ok=True)
    # the processor class is saved by name in processor_config.json (LlavaProcessor or ours)
    AutoProcessor.register(VlmalignAlignGPTConfig, LlavaProcessor, exist_ok=True)


# ---------------------------------------------------------------------------------- conversion
def align_chat_template(template: str) -> str:
    """``template`` with ``<align>`` right after its first ``{{ bos_token }}`` (or first of all)."""
    if ALIGN_TOKEN in template:
        return template
    for bos in ("{{ bos_token }}", "{{bos_token}}", "{{- bos_token }}", "{{ bos_token -}}"):
        if bos in template:
            return template.replace(bos, bos + ALIGN_TOKEN, 1)
    return ALIGN_TOKEN + template


def _image_tokens_per_image(processor) -> int:
    from PIL import Image
    _, reps = processor._process_images([Image.new("RGB", (64, 64))], return_tensors="pt")
    return reps[0].count(processor.image_token)


def add_alignment_levels(model, processor, levels: int = 8, gate_hidden: int = 256, seed: int = 0):
    """(model, processor): a LLaVA (``llava``) or composed (``llava`` / ``vlmalign_resampler``)
    model as a ``vlmalign_aligngpt`` model holding the same weights plus fresh indicators (Xavier
    uniform) and gate; the tokenizer gains ``<align>`` (its embedding row is never read) and the
    chat template puts it after BOS. The processor is changed in place."""
    from tokenizers import AddedToken
    mt = model.config.model_type
    if mt == MODEL_TYPE:
        raise ModelError("the model already has alignment levels")
    if mt not in ("llava", "vlmalign_resampler"):
        raise ModelError(f"alignment levels are an option of LLaVA and composed models (model_type llava or "
                         f"vlmalign_resampler); this model is {mt!r}")
    if levels < 2:
        raise ModelError(f"alignment levels {levels}: at least 2 (local levels + the global one)")
    tok = processor.tokenizer
    if ALIGN_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(ALIGN_TOKEN, special=True, normalized=False)], special_tokens=True)
    template = align_chat_template(processor.chat_template or tok.chat_template)
    processor.chat_template = template
    tok.chat_template = template
    d = model.config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "auto_map"):
        d.pop(k, None)
    d["projector_type"] = d.get("projector_type", "llava") if mt == "vlmalign_resampler" else "llava"
    config = VlmalignAlignGPTConfig(**d, alignment_levels=levels, alignment_gate_hidden=gate_hidden,
                                    alignment_image_tokens=_image_tokens_per_image(processor),
                                    alignment_token_id=tok.convert_tokens_to_ids(ALIGN_TOKEN))
    torch.manual_seed(seed)
    new = VlmalignAlignGPTForConditionalGeneration(config)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("model.alignment.") for k in missing):
        raise ModelError(f"converting the model: unexpected {unexpected[:3]}, missing "
                         f"{[k for k in missing if not k.startswith('model.alignment.')][:3]}")
    if config.tie_word_embeddings:
        new.tie_weights()
    if len(tok) != new.get_input_embeddings().weight.shape[0]:
        new.resize_token_embeddings(len(tok), mean_resizing=True)
    new.generation_config = model.generation_config
    return new.eval(), processor


# ------------------------------------------------------------------------ adapter, tiny builder
@register
class AlignGPTAdapter(LlavaAdapter):
    """LLaVA's layout with one ``<align>`` position per sequence. In pretraining each record's
    ``similarity`` (its alignment bucket, see ``vlmalign data align-levels``) goes to the model as
    ``alignment_level``; in fine-tuning (every other method) the gate mixes the indicators, which
    stay frozen; outside training (stage None) nothing is frozen by this class."""

    family = MODEL_TYPE
    model_types = (MODEL_TYPE,)
    projector_prefixes = ("model.multi_modal_projector.", "model.alignment.")
    record_field = "similarity"
    # read by sequence packing where the engine has it (data.packing): a row holds one <align>
    # position and one alignment level, so several samples cannot share a row
    packing_refused = ("a row holds one <align> position and one alignment level (AlignGPT), so samples "
                       "cannot be packed together")

    def record_inputs(self, record, *, stage: str) -> dict[str, int]:
        if stage != "pretrain":
            return {}
        n = self.model.config.alignment_levels
        value = record.meta.get(self.record_field) if record.meta else None
        if value is None:
            raise record.error(f"missing: this model has alignment levels, and pretraining needs each record's "
                               f"alignment bucket (an integer 0..{n - 1}; vlmalign data align-levels writes it)",
                               self.record_field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise record.error(f"expected an integer bucket 0..{n - 1}, got {value!r}", self.record_field)
        if not 0 <= value < n:
            raise record.error(f"bucket {value} is out of range: the model has {n} alignment levels (0..{n - 1})",
                               self.record_field)
        return {"alignment_level": value}

    def frozen_parameter_names(self) -> set[str]:
        # AlignGPT: the indicators learn in pretraining only; fine-tuning trains the gate
        return {"model.alignment.indicators"} if self.stage == "finetune" else set()

    def shard_units(self) -> list[nn.Module]:
        # The alignment levels run inside the model's forward through AlignmentLevels' methods,
        # never through its forward, so a unit of their own would stay sharded when read (FSDP2
        # gathers a unit in its forward): they are left to the root unit, gathered for the
        # model's forward (tests/integration/test_fsdp2.py).
        alignment = self.model.get_submodule("model.alignment")
        return [u for u in super().shard_units() if u is not alignment]


@register_tiny(MODEL_TYPE)
def build_tiny_aligngpt(seed: int = 0, levels: int = 8, gate_hidden: int = 16, base: str = "llava", **kwargs):
    """A tiny random-init LLaVA (``base="llava"``) or composed resampler model with alignment levels."""
    from .registry import tiny_builders
    model, processor = tiny_builders()[base](seed=seed, **kwargs)
    return add_alignment_levels(model, processor, levels=levels, gate_hidden=gate_hidden, seed=seed)
