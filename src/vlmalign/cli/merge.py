"""`vlmalign merge`: average or merge full checkpoints of one architecture, or LoRA adapters."""

from __future__ import annotations

import argparse

from ..merge.methods import METHODS
from .args import nonneg_int, refuse_output_over_input


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge or average models of one architecture, or LoRA adapters (as weight "
                                     "updates); see docs/MERGING.md")
    p.add_argument("inputs", nargs="+", metavar="IN", help="model directories, or LoRA adapter directories")
    p.add_argument("--method", required=True, choices=METHODS, help="how to combine them")
    p.add_argument("--out", required=True, help="output directory (a model, or with --lora-out rank:R an adapter)")
    p.add_argument("--weights", type=_numbers, help="one weight per input, comma-separated (weighted: required, "
                                                    "normalised to sum 1; task methods: default 1 each)")
    p.add_argument("--base", help="task-arithmetic/ties/dare: the checkpoint the inputs were fine-tuned from; "
                                  "LoRA adapters: where their base model is (default: the one they name)")
    p.add_argument("--density", type=_number, help="ties/dare: share of each difference kept, in (0, 1] "
                                                   "(default 0.5)")
    p.add_argument("--t", type=_number, help="slerp: position between the 2 inputs, 0 = the first (default 0.5)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of dare's random drops")
    p.add_argument("--lora-out", help="LoRA adapters: merged (into the base: a full model; default) or rank:R "
                                      "(a LoRA of rank R by truncated SVD; its error is reported)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import os

    from ..errors import VlmalignError
    from ..merge import MergeSpec, merge
    from ..models.peft import adapter_base, is_adapter_dir
    base = args.base
    if base is None and is_adapter_dir(args.inputs[0]):
        base = adapter_base(args.inputs[0])   # the model the adapters are merged into is an input too
    refuse_output_over_input(args.out, *args.inputs, base if base and os.path.exists(base) else None,
                             directory=True)
    if os.path.isfile(args.out):
        raise VlmalignError(f"--out {args.out} is a file: name a directory")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise VlmalignError(f"--out {args.out} exists: choose another directory, or pass --overwrite to replace it")
    spec = MergeSpec(args.method, weights=args.weights, density=args.density, t=args.t, seed=args.seed)
    report = merge(args.inputs, args.out, spec, base=args.base, lora_out=args.lora_out,
                   trust_remote_code=args.trust_remote_code)
    print(report.summary())
    return 0
