"""`vlmalign generate`: batch inference over a dataset file to JSONL."""

from __future__ import annotations

import json
import os


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
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--image-root", help="directory image paths are confined to (default: the data file's)")
    p.add_argument("--format", default="auto", help="data format (default: detected)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per response")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--num-samples", type=int, default=1, help="responses per prompt")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import torch

    from ..data.batching import ImageLoader
    from ..data.readers import read_file
    from ..rollout.generate import SamplingConfig, generate
    torch.manual_seed(args.seed)
    recs = read_file(args.data, format=args.format, kind="rl_prompt")[: args.limit]
    ad = load_for_inference(args)
    root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, num_samples=args.num_samples)
    outs = generate(ad, recs, ImageLoader(ad, root), cfg, batch_size=args.batch_size)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        for r, o in zip(recs, outs):
            f.write(json.dumps({"id": r.id, "index": r.index, "prompt": r.prompt[-1].text,
                                "images": [im.to_json() for im in r.images], "reference": r.reference,
                                "responses": o}) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {len(recs)} records to {args.out}")
    return 0
