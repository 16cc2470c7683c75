"""`vlmalign export`: merge a LoRA adapter into a standalone Hugging Face directory."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="merge a LoRA adapter into its base and save a standalone model")
    p.add_argument("--model", required=True, help="LoRA adapter directory (e.g. a checkpoint's model/)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", help="base model (default: the one the adapter names)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..models.peft import export_merged
    export_merged(args.model, args.out, base=args.base, trust_remote_code=args.trust_remote_code)
    print(f"wrote merged model to {args.out}")
    return 0
