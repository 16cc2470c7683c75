"""`vlmalign generate`: batch inference over a dataset file to JSONL."""

from __future__ import annotations

import json
import logging
import os

from ..config import with_defaults
from ..rollout.generate import SamplingConfig
from .args import add_limit, config_flags, config_from_flags, nonneg_int, positive_int, refuse_output_over_input

log = logging.getLogger("vlmalign.generate")

# the sampling options (rollout.generate.SamplingConfig) that are flags of generate and chat
SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k")
GenerateSampling = with_defaults(SamplingConfig, "GenerateSampling", max_new_tokens=64)


def add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="model directory, or a LoRA adapter directory")
    p.add_argument("--base", help="base model of a LoRA adapter (default: the one it names)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")


def load_for_inference(args):
    import torch

    from ..models.peft import load_any
    ad = load_any(args.model, base=args.base, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ad.model.to(dev).eval()
    return ad


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate responses for every prompt of a data file (JSONL out)")
    add_model_args(p)
    p.add_argument("--data", required=True, help="data file; every record's prompt is answered")
    p.add_argument("--out", required=True, help="output JSONL (never one of the inputs)")
    p.add_argument("--image-root", help="directory image paths are confined to (default: the data file's)")
    p.add_argument("--format", default="auto", help="data format (default: detected)")
    config_flags(p, GenerateSampling, SAMPLING + ("num_samples",))
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per batch")
    p.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed")
    p.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                   help="a record with a missing or corrupt image or an over-long prompt: stop naming file, "
                        "record and field, or skip it (counted and reported)")
    add_image_position(p)
    add_limit(p)
    p.set_defaults(func=_run)


def add_image_position(p) -> None:
    p.add_argument("--image-position", choices=("data", "model", "before", "after"), default="data",
                   help="where each prompt's images go relative to its text: as the data file has them, as the "
                        "model's training prompts had them (its vlmalign_prompt.json), or before / after; "
                        "a file that differs from the model is warned about")


def _run(args) -> int:
    import torch

    from ..config.sections import DataSection
    from ..data.loading import load_examples
    from ..models.prompt_layout import place_records
    from ..rollout.generate import generate
    refuse_output_over_input(args.out, args.data)
    torch.manual_seed(args.seed)
    ad = load_for_inference(args)
    data = DataSection(image_root=args.image_root, format=args.format, on_error=args.on_error)

    def tok(rec, imgs):  # images loaded and the prompt tokenized now: a bad record is found before generating
        return {"input_ids": ad.tokenize_prompt(rec.prompt, imgs).input_ids}

    examples, loader, rep = load_examples(args.data, data, ad, tok, kind="rl_prompt", limit=args.limit)
    recs, note = place_records([e.record for e in examples], args.model, args.image_position)
    if note:
        log.warning("%s: %s", args.data, note)
    cfg = config_from_flags(GenerateSampling, args, SAMPLING + ("num_samples",))
    outs = generate(ad, recs, loader, cfg, batch_size=args.batch_size)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        for r, o in zip(recs, outs):
            f.write(json.dumps({"id": r.id, "index": r.index, "prompt": r.prompt[-1].text,
                                "images": [im.to_json() for im in r.images], "reference": r.reference,
                                "responses": o}) + "\n")
    os.replace(tmp, args.out)
    skipped = f" (skipped {rep.count} of {rep.total} records: see above)" if rep.count else ""
    print(f"wrote {len(recs)} records to {args.out}{skipped}")
    return 0
