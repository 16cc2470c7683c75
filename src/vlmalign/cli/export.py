"""`vlmalign export`: merge a LoRA adapter into a standalone Hugging Face directory."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("export", help="merge a LoRA adapter into its base and save a standalone model")
    p.add_argument("--model", required=True, help="LoRA adapter directory (e.g. a checkpoint's model/)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", help="base model (default: the one the adapter names)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..models.peft import adapter_base, export_merged, is_adapter_dir
    from .args import refuse_output_over_input
    base = adapter_base(args.model, args.base) if is_adapter_dir(args.model) else args.base
    # the merged model would replace the adapter or the base it is merged into
    refuse_output_over_input(args.out, args.model, base if base and os.path.exists(base) else None,
                             directory=True)
    export_merged(args.model, args.out, base=args.base, trust_remote_code=args.trust_remote_code)
    print(f"wrote merged model to {args.out}")
    return 0
