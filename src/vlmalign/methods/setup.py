"""Model setup every method shares: seeding, building or loading the model, freezing, LoRA / QLoRA."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..engine.scaling import check_optimizer
from ..errors import ModelError, VlmalignError
from ..models.loading import resolve_dtype

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def start_run(cfg, adapter=None, *, data_needed: str = "data.train_file is required"):
    """What every method's run does first: check the config (choices, ranges, each section's
    rules), seed, require ``data.train_file`` (``data_needed``: the error), and build the policy
    adapter from ``cfg.model`` unless one is given. Returns the adapter."""
    from ..config import validate_config
    validate_config(cfg)
    check_optimizer(cfg.optim.name)   # before any data or weights are loaded
    seed_everything(cfg.train.seed)
    if not cfg.data.train_file:
        raise VlmalignError(data_needed)
    return adapter or build_adapter(cfg.model, seed=cfg.train.seed, lora_cfg=cfg.lora)


def check_qlora(model_cfg, lora_cfg) -> None:
    """Refuse QLoRA early (before any data or model is loaded) where it cannot run."""
    if not lora_cfg.qlora:
        return
    if not lora_cfg.enabled:
        raise ModelError("lora.qlora=true needs lora.enabled=true (QLoRA trains LoRA adapters on a 4-bit base)")
    if not torch.cuda.is_available():
        raise ModelError("QLoRA needs a CUDA GPU and bitsandbytes (4-bit weights); this machine has no "
                         "CUDA device. Use lora.enabled=true without lora.qlora.")
    if model_cfg.tiny:
        raise ModelError("QLoRA quantizes weights while loading them: use model.path, not model.tiny")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("QLoRA needs bitsandbytes: pip install 'vlmalign[gpu]'") from None


def build_adapter(model_cfg, *, seed: int = 0, lora_cfg=None):
    """Load ``model.path`` (or build ``model.tiny``) and wrap it in its family adapter.

    With ``lora.qlora`` the language model is loaded in 4-bit NF4 (bitsandbytes); the vision
    tower and projector stay in the compute dtype.
    """
    from ..models import adapter_for, build_tiny, load_adapter
    if bool(model_cfg.path) == bool(model_cfg.tiny):
        raise VlmalignError("set exactly one of model.path and model.tiny")
    if lora_cfg is not None:
        check_qlora(model_cfg, lora_cfg)
    if model_cfg.tiny:
        model, processor = build_tiny(model_cfg.tiny, seed=seed)
        return with_alignment_levels(adapter_for(model, processor), model_cfg, seed)
    kwargs = {}
    dtype = resolve_dtype(model_cfg.dtype)
    if lora_cfg is not None and lora_cfg.qlora:
        from transformers import BitsAndBytesConfig

        from ..models.loading import read_config
        from ..models.registry import adapter_class
        # read config.json once: for the family's module names here and for loading below
        kwargs["config"] = read_config(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
        cls = adapter_class(kwargs["config"].model_type)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
            llm_int8_skip_modules=[p.rstrip(".").split(".")[-1] for p in
                                   (*cls.vision_prefixes, *cls.projector_prefixes, *cls.head_prefixes)])
    adapter = load_adapter(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code, dtype=dtype, **kwargs)
    return with_alignment_levels(adapter, model_cfg, seed)


def with_alignment_levels(adapter, model_cfg, seed: int = 0):
    """``model.alignment_levels`` N > 0: the adapter of the model with N AlignGPT alignment levels
    added (models/aligngpt.py), unless the model has its own already."""
    n = getattr(model_cfg, "alignment_levels", 0)
    if not n or getattr(adapter.model.config, "alignment_levels", None):
        return adapter
    if n < 2:
        raise ModelError(f"model.alignment_levels {n}: at least 2 (local levels + the global one), or 0 for off")
    if getattr(adapter.model, "is_quantized", False):
        raise ModelError("model.alignment_levels cannot convert a quantized (QLoRA) model: add the levels first "
                         "(vlmalign models compose --alignment-levels, or a pretraining run without QLoRA) and "
                         "start from that directory")
    from ..models import adapter_for
    from ..models.aligngpt import add_alignment_levels
    model, processor = add_alignment_levels(adapter.model, adapter.processor, levels=n, seed=seed)
    return adapter_for(model.to(adapter.device, next(adapter.model.parameters()).dtype), processor)


def prepare_trainable(adapter, cfg, stage: str = "finetune"):
    """Every trainer's last step before the loop: returns ``(module to train, projector names,
    vision names)``. ``stage`` (``pretrain`` for projector pretraining, else ``finetune``)
    becomes ``adapter.stage``, which families with stage rules read (AlignGPT freezes its
    indicators in fine-tuning).

    LoRA on a model built in memory (no ``model.path``) first saves its base under
    ``train.output_dir/base_model`` so the adapter can be reloaded and exported; group parameter
    names are taken before LoRA wrapping renames them (for per-group learning rates); then the
    chosen groups are made trainable (:func:`configure_trainable`).
    """
    from ..config import validate_config
    from ..engine.run_dir import claim_output_dir
    validate_config(cfg)
    claim_output_dir(cfg.train)  # refuse an earlier run's directory before writing anything into it
    adapter.stage = stage
    if cfg.lora.enabled and not cfg.model.path:
        base = Path(cfg.train.output_dir) / "base_model"
        if cfg.train.overwrite or not (base / "config.json").exists():
            adapter.save_pretrained(str(base))
        adapter.model.config._name_or_path = str(base.resolve())
        adapter.model.name_or_path = str(base.resolve())  # what PEFT records as the base
    groups = adapter.param_groups()
    projector = {n for n, _ in groups["projector"]}
    vision = {n for n, _ in groups["vision"]}
    return configure_trainable(adapter, cfg.model, cfg.lora), projector, vision


def configure_trainable(adapter, model_cfg, lora_cfg):
    """Freeze groups per config; wrap with LoRA if enabled. Returns the module to train."""
    check_qlora(model_cfg, lora_cfg)
    if lora_cfg.enabled and lora_cfg.qlora:
        # casts norms to fp32 and enables input grads; it freezes everything, so it runs first
        from peft import prepare_model_for_kbit_training
        prepare_model_for_kbit_training(adapter.model, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
    adapter.set_trainable(vision=model_cfg.train_vision, projector=model_cfg.train_projector,
                          language=model_cfg.train_language and not lora_cfg.enabled)
    if model_cfg.gradient_checkpointing:
        if hasattr(adapter.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            adapter.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            adapter.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        adapter.model.config.use_cache = False
    if not lora_cfg.enabled:
        return adapter.model
    from peft import LoraConfig, get_peft_model
    targets = lora_cfg.targets or adapter.lora_target_modules(include_vision=lora_cfg.include_vision)
    _check_lora_targets(adapter.model, targets, bool(lora_cfg.targets))
    # groups trained in full next to the adapters (projector, maybe the tower) are saved with the
    # adapter (PEFT modules_to_save), so an adapter checkpoint is complete and exports cleanly
    full = [g for g, on in (("projector", model_cfg.train_projector),
                            ("vision", model_cfg.train_vision and not lora_cfg.include_vision)) if on]
    owners = {_module_of(n, adapter, g) for g in full for n, _ in adapter.param_groups()[g]}
    modules = {o for o in owners if isinstance(_get(adapter.model, o), torch.nn.Module)}
    bare = {n for g in full for n, _ in adapter.param_groups()[g] if _module_of(n, adapter, g) not in modules}
    pcfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=targets, modules_to_save=sorted(modules) or None, bias="none")
    peft_model = get_peft_model(adapter.model, pcfg)
    # parameters that are not modules (e.g. LLaVA-Next's image_newline) cannot be modules_to_save:
    # keep them trainable; checkpoints store them in extra_params.safetensors beside the adapter
    for n, p in peft_model.base_model.model.named_parameters():
        if n in bare:
            p.requires_grad_(True)
    # what the family keeps frozen stays frozen in PEFT's trainable copies (modules_to_save)
    frozen = adapter.frozen_parameter_names()
    for n, p in peft_model.base_model.model.named_parameters():
        if n.replace(".modules_to_save.default.", ".").replace(".original_module.", ".") in frozen:
            p.requires_grad_(False)
    return peft_model


def _check_lora_targets(model, targets, given: bool) -> None:
    """Refuse LoRA targets that match no Linear layer (PEFT's own error names no option)."""
    if isinstance(targets, str):
        return  # a regular expression: PEFT matches it against full names
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    missing = [t for t in targets if t not in leaves and not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not targets:
        where = "lora.targets" if given else "the family's default LoRA targets"
        raise ModelError(f"{where}: {', '.join(missing) or '(none)'} match no Linear layer of the model; "
                         f"Linear layer names include {', '.join(sorted(leaves)[:12])}")


def _get(model, dotted: str):
    obj = model
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _module_of(param_name: str, adapter, group: str) -> str:
    """The top module of ``group`` that owns ``param_name`` (e.g. model.multi_modal_projector)."""
    prefixes = {"projector": adapter.projector_prefixes, "vision": adapter.vision_prefixes}[group]
    for p in prefixes:
        if param_name.startswith(p):
            return p.rstrip(".")
    return param_name.rsplit(".", 1)[0]
