"""PaliGemma (``paligemma``): SigLIP vision tower -> linear projector -> Gemma, trained as a
prefix-LM.

PaliGemma has no chat format. Its processor builds ``<image>*N <bos> prompt \\n`` (the *prefix*)
and, for training, appends ``suffix <eos>``; ``token_type_ids`` are 0 on the prefix and 1 on the
suffix, and the model attends bidirectionally within the prefix and causally elsewhere. How this
adapter maps conversations onto that (the layout ``render`` shows, and the tiny processor's chat
template renders identically)::

    <image>...<image> <bos> [system ]user_1 \\n | answer_1 <eos> user_2 \\n answer_2 <eos> ...
    '------------------- prefix -------------' '--------------- suffix -----------------'

* Images always come first (PaliGemma cannot place them in the text), in message order.
* The prefix is the first user turn (system text, if any, joined in front with a space); every
  later turn is suffix. A supervised answer must never sit in the bidirectional prefix (its
  tokens would see their own future), so only the first prompt is prefix; later user turns are
  causal, which is also what generation sees. Loss is on answers + their ``<eos>`` only.
* Token ids equal the processor's ``processor(text=<images + first prompt>, images=...,
  suffix=<rest without the final eos>)`` (:meth:`PaliGemmaAdapter.processor_inputs`): the prefix
  and the suffix are tokenized separately, as the processor does with ``text`` / ``text_pair``.
  The generic "processor on the rendered text" comparison cannot hold for this family: the
  processor treats any ``text`` as prefix (it inserts ``<bos>`` after the last image and appends
  ``\\n``), so a rendered conversation with answers is not a valid ``text`` for it.
* The prefix is one line, as in PaliGemma's own prompts ("answer en ..."): newlines inside the
  first prompt (with the whitespace around them) become one space, e.g. LLaVA's
  ``"What?\\nAnswer the question using a single word or phrase."``. This is what lets the
  prefix be found from the ids alone (next paragraph). Later turns are kept verbatim.

``token_type_ids`` (prefix-LM): forward and generate take them explicitly when given; otherwise
:meth:`PaliGemmaAdapter.token_type_ids` derives them from the ids alone, because trainers pass
ids and masks, not prompt lengths: 0 up to and including the first token after ``<bos>`` whose
text contains a newline (the separator that ends the one-line prefix), 1 after it, 0 on padding
(as the processor pads). For everything this adapter tokenizes that is exactly the processor's
split; training, evaluation and generation all derive it the same way. For ids made elsewhere
whose prompt has a newline, the derived prefix stops at that newline: it can only get shorter,
never take in an answer token. ``prompt_lengths`` gives the exact split for such ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..data.schema import ImagePart, Message
from ..errors import DataError, ModelError
from .adapter import (IGNORE_INDEX, EncodedImages, ImageInputs, Tokenized, VLMAdapter, segment_spans,
                      unpack_segments)
from .registry import register, register_tiny
from .tiny_tokenizer import build_tiny_tokenizer

# Renders the layout above (kept equal to PaliGemmaAdapter.render by a test). eos_token closes
# every answer; a user turn ends with a newline, which is also the generation prompt.
PALIGEMMA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(images='', system='', prompt=none, rest='') -%}"
    "{%- for message in messages -%}"
    "{%- set t = namespace(v='') -%}"
    "{%- if message['content'] is string -%}{%- set t.v = message['content'] -%}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{%- set ns.images = ns.images + '<image>' -%}"
    "{%- elif c['type'] == 'text' -%}{%- set t.v = t.v + c['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + t.v + ' ' -%}"
    "{%- elif message['role'] == 'user' and ns.prompt is none -%}{%- set p = ns.system + t.v -%}"
    "{%- if '\\n' in p -%}{%- set p = p.split('\\n') | map('trim') | reject('equalto', '') | join(' ') -%}{%- endif -%}"
    "{%- set ns.prompt = p + '\\n' -%}"
    "{%- elif message['role'] == 'user' -%}{%- set ns.rest = ns.rest + t.v + '\\n' -%}"
    "{%- else -%}{%- set ns.rest = ns.rest + t.v + eos_token -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.images + bos_token + (ns.prompt if ns.prompt is not none else '\\n') + ns.rest -}}"
)


def _one_line(text: str) -> str:
    """Lines stripped and joined by one space (the chat template does the same); text without
    newlines unchanged."""
    if "\n" not in text:
        return text
    return " ".join(line.strip() for line in text.split("\n") if line.strip())


@dataclass
class _Layout:
    n_images: int
    prompt: str                      # first user turn (+ system), WITHOUT the final "\n"
    rest: str                        # everything after the prefix
    spans: list[tuple[int, int]] = field(default_factory=list)  # answer + eos char spans in rest


@register
class PaliGemmaAdapter(VLMAdapter):
    family = "paligemma"
    model_types = ("paligemma",)
    placeholder_token = "<image>"
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.",)
    head_prefixes = ("lm_head.",)
    encoder_keys = ("pixel_values",)
    prefix_sharing = False
    prefix_sharing_note = "prefix-LM attention follows token_type_ids over the whole sequence"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        tok = self.tokenizer
        if tok.bos_token_id is None or tok.eos_token_id is None:
            raise ModelError("paligemma: the tokenizer needs a BOS (starts the text) and an EOS (ends answers)")
        self._newline_ids: torch.Tensor | None = None

    # ------------------------------------------------------------------ layout + text
    def _layout(self, messages: Sequence[Message]) -> _Layout:
        eos = self.tokenizer.eos_token
        n_images, system, prompt, rest, spans = 0, "", None, "", []
        for m in messages:
            text = "".join(p.text for p in m.content if not isinstance(p, ImagePart))
            n_images += sum(1 for p in m.content if isinstance(p, ImagePart))
            if m.role == "system":
                if prompt is not None:
                    raise DataError("paligemma: system messages must come before the first user turn",
                                    field="messages")
                system += text + " "
            elif m.role == "user":
                if prompt is None:
                    prompt = _one_line(system + text)
                else:
                    rest += text + "\n"
            else:
                if prompt is None:
                    raise DataError("paligemma: the conversation must start with a user turn", field="messages")
                if not text.strip():
                    raise DataError("empty assistant response", field="messages")
                spans.append((len(rest), len(rest) + len(text) + len(eos)))
                rest += text + eos
        if prompt is None:  # no user turn (the template renders no system text then either)
            prompt = ""
        return _Layout(n_images, prompt, rest, spans)

    def _prefix_text(self, lay: _Layout) -> str:
        return self.placeholder_token * lay.n_images + self.tokenizer.bos_token + lay.prompt + "\n"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The whole sequence as text, one placeholder per image (``add_generation_prompt`` changes
        nothing: a user turn always ends with the newline PaliGemma generates after)."""
        lay = self._layout(messages)
        return self._prefix_text(lay) + lay.rest

    def processor_inputs(self, messages: Sequence[Message], images: Sequence | None = None) -> dict[str, Any]:
        """Arguments for the stock ``PaliGemmaProcessor`` that give exactly our ids: ``text`` =
        placeholders + first prompt (the processor adds ``<bos>`` and ``\\n``), ``suffix`` = the
        rest without its final ``<eos>`` (the processor appends it)."""
        lay = self._layout(messages)
        out: dict[str, Any] = {"text": self.placeholder_token * lay.n_images + lay.prompt, "images": images}
        if lay.rest:
            eos = self.tokenizer.eos_token
            if not lay.rest.endswith(eos):
                raise ModelError("paligemma: the processor's suffix always ends with EOS; this conversation "
                                 "ends with a user turn after answers, which it cannot express")
            out["suffix"] = lay.rest[: -len(eos)]
        return out

    def tokenize_messages(self, messages: Sequence[Message], images: Sequence[ImageInputs], *,
                          add_generation_prompt: bool = False, max_length: int | None = None) -> Tokenized:
        """Prefix and suffix tokenized separately (as the processor does); labels on answers + EOS."""
        lay = self._layout(messages)
        ids = self.tokenizer(self._prefix_text(lay), add_special_tokens=False)["input_ids"]
        labels = [IGNORE_INDEX] * len(ids)
        if lay.rest:
            enc = self.tokenizer(lay.rest, add_special_tokens=False, return_offsets_mapping=True)
            for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
                sup = b > a and any(s <= a and b <= e for s, e in lay.spans)
                ids.append(t)
                labels.append(t if sup else IGNORE_INDEX)
            eos = self.tokenizer.eos_token_id
            n_eos = sum(1 for t, lab in zip(ids, labels) if lab == eos)
            if n_eos != len(lay.spans):
                raise ModelError(f"paligemma: {n_eos} supervised EOS tokens for {len(lay.spans)} answers "
                                 "(an answer merged with its EOS in tokenization?)")
        ids, labels = self._expand(ids, labels, images)
        out = Tokenized(ids, labels, len(images), [im.num_tokens for im in images])
        self._check_length(len(out), out.image_token_counts, max_length)
        return out

    # ------------------------------------------------------------------ prefix-LM types
    def _newlines(self, device) -> torch.Tensor:
        """Ids of every vocabulary token whose text contains a newline (computed once)."""
        if self._newline_ids is None:
            tok = self.tokenizer
            n = len(tok)
            texts = tok.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
            self._newline_ids = torch.tensor([i for i, s in enumerate(texts) if "\n" in s], dtype=torch.long)
        return self._newline_ids.to(device)

    def token_type_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       prompt_lengths: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) prefix-LM types: 0 = prefix (bidirectional), 1 = suffix (causal), 0 on padding.

        With ``prompt_lengths`` (per row, counted from the first non-padding token) the split is
        exact; otherwise the prefix ends at the first newline token after ``<bos>`` (module doc).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        pos = torch.arange(T, device=dev).unsqueeze(0).expand(B, T)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        if prompt_lengths is not None:
            start = valid.long().argmax(dim=1, keepdim=True)  # left padding offset
            end = start + torch.as_tensor(prompt_lengths, device=dev).view(B, 1)  # first suffix position
        else:
            after_bos = torch.cumsum((input_ids == self.tokenizer.bos_token_id).long(), dim=1) > 0
            no_bos = ~after_bos.any(dim=1, keepdim=True)
            cand = torch.isin(input_ids, self._newlines(dev)) & (after_bos | no_bos) & valid
            found = cand.any(dim=1, keepdim=True)
            first = cand.long().argmax(dim=1, keepdim=True)
            end = torch.where(found, first + 1, torch.full_like(first, T))
        types = (pos >= end).long()
        return types.masked_fill(~valid, 0)

    def _extra_forward_kwargs(self, input_ids, attention_mask, mm) -> dict:
        if "token_type_ids" in mm:  # given (processor output passed as pixel_inputs)
            return {}
        return {"token_type_ids": self.token_type_ids(input_ids, attention_mask)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                encoded: EncodedImages | None = None, image_indices: Sequence[Sequence[int]] = (),
                pixel_inputs: dict[str, torch.Tensor] | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs):
        """As :meth:`VLMAdapter.forward`; ``token_type_ids`` may be given, else they are derived."""
        if token_type_ids is not None:
            # hand them over the way a processor output would come: _extra_forward_kwargs keeps them
            if pixel_inputs is None:
                flat = [i for row in image_indices for i in row]
                pixel_inputs = self.mm_kwargs(encoded, flat)
            pixel_inputs = {**pixel_inputs, "token_type_ids": token_type_ids}
        return super().forward(input_ids, attention_mask, encoded=encoded, image_indices=image_indices,
                               pixel_inputs=pixel_inputs, **kwargs)

    def packed_inputs(self, input_ids, segment_ids, mm, *, attention=None) -> dict[str, Any]:
        """Packed rows: positions 1, 2, ... from each sample's first token (PaliGemma counts from
        1) and each sample's own prefix-LM token types. Attention stays transformers' (restarting
        positions): its mask ORs the bidirectional prefix block into the causal one, then keeps
        both inside each sample; a 4-D mask of ours would lose the prefix block."""
        if (attention or self.packing_attention) != "position_ids":
            raise ValueError("paligemma packs through position ids only (its prefix-LM mask is transformers')")
        out = super().packed_inputs(input_ids, segment_ids, mm, attention="position_ids")
        out["position_ids"] = out["position_ids"] + 1
        # derived per sample from its ids (a row-level split would end at the first sample's prefix)
        spans = segment_spans(segment_ids)
        ids, mask = unpack_segments(input_ids, spans, fill=self.tokenizer.pad_token_id)
        per = self.token_type_ids(ids, mask)
        types = torch.zeros_like(input_ids)
        for s, (r, a, b) in enumerate(spans):
            types[r, a:b] = per[s, : b - a]
        out["token_type_ids"] = types
        return out

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 encoded: EncodedImages | None = None, image_indices: Sequence[Sequence[int]] = (),
                 token_type_ids: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Generation with the prompt as prefix; new tokens are suffix (the model appends 1s)."""
        flat = [i for row in image_indices for i in row]
        mm = self.mm_kwargs(encoded, flat)
        if token_type_ids is None:
            token_type_ids = self.token_type_ids(input_ids, attention_mask)
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                   **mm, **generate_kwargs)

    # ------------------------------------------------------------------ images
    def mm_kwargs(self, encoded: EncodedImages | None, indices: Sequence[int]) -> dict[str, Any]:
        out = super().mm_kwargs(encoded, indices)
        if out:
            # PaliGemmaModel calls .to() on pooler_output: one (n_images, seq, hidden) tensor
            pooled = out["mm_encoder_outputs"]["image"]
            pooled.pooler_output = torch.stack(list(pooled.pooler_output), dim=0)
        return out


# ---------------------------------------------------------------------- tiny builder
def tiny_siglip_image_processor(image_size: int, image_seq_length: int):
    from transformers import SiglipImageProcessorPil
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size},
                                   image_seq_length=image_seq_length)


@register_tiny("paligemma")
def build_tiny_paligemma(image_size: int = 32, patch_size: int = 8, hidden: int = 64, vision_hidden: int = 32,
                         layers: int = 2, seed: int = 0):
    """Random-init PaliGemma-architecture model (SigLIP + Gemma, tied output head as in the real
    model) + the stock PaliGemmaProcessor, fully offline. An image becomes
    ``(image_size / patch)^2`` = 16 tokens."""
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipVisionConfig)

    tok = build_tiny_tokenizer(["<image>"], bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                               unk_token="<unk>", chat_template=PALIGEMMA_CHAT_TEMPLATE)
    seq = (image_size // patch_size) ** 2
    # the processor adds PaliGemma's 1024 <locNNNN> + 128 <segNNN> tokens to the tokenizer
    processor = PaliGemmaProcessor(image_processor=tiny_siglip_image_processor(image_size, seq), tokenizer=tok,
                                   chat_template=PALIGEMMA_CHAT_TEMPLATE)
    vocab = len(tok)
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                                num_hidden_layers=layers, num_attention_heads=2, image_size=image_size,
                                patch_size=patch_size, vision_use_head=False)
    text = GemmaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=hidden // 4,
                       max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                             vocab_size=vocab, projection_dim=hidden, hidden_size=hidden, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, processor
