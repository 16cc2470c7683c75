"""`vlmalign score --model DIR --data FILE [--out FILE.jsonl]`: reward-model scores.

One JSON line per (image, prompt, response): preference pairs give two (chosen, rejected),
ranked lists one per response, unpaired examples their completion, conversations their last
assistant turn. For pairs and ranked lists the pairwise accuracy is printed at the end.
"""

from __future__ import annotations

import json
import os
import sys

from .args import add_limit, positive_int, refuse_output_over_input


def register(sub) -> None:
    p = sub.add_parser("score", help="score responses with a reward model (JSONL out)",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="reward-model directory (from `vlmalign train rm`: "
                                                  "checkpoints/step-N/model)")
    p.add_argument("--data", required=True, help="pairs, ranked lists, unpaired examples or conversations")
    p.add_argument("--out", help="output JSONL (default: standard output)")
    p.add_argument("--base", help="base model of a LoRA reward model (default: the one it names)")
    p.add_argument("--image-root", help="directory image paths are confined to (default: the data file's)")
    p.add_argument("--format", default="auto", help="data format (default: detected)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="records per batch")
    p.add_argument("--max-length", type=positive_int, default=None, help="refuse samples longer than this (tokens)")
    add_limit(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import torch

    from ..data.batching import ImageLoader
    from ..data.readers import read_file
    from ..rewards.scoring import score_records
    from ..models.scalar_head import load_scalar_model
    if args.out:
        refuse_output_over_input(args.out, args.data)
    recs = read_file(args.data, format=args.format)
    recs = recs[: args.limit] if args.limit else recs
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_scalar_model(args.model, dtype=args.dtype, device=dev, base=args.base,
                              trust_remote_code=args.trust_remote_code)
    root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    rows = score_records(model, recs, ImageLoader(model.adapter, root), batch_size=args.batch_size,
                         max_length=args.max_length)
    out = open(args.out + ".tmp", "w") if args.out else sys.stdout
    n = wins = pairs = 0
    group: list[dict] = []

    def close_group():
        nonlocal wins, pairs
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                pairs += 1
                wins += group[i]["score"] > group[j]["score"]

    try:
        for row in rows:
            out.write(json.dumps(row) + "\n")
            n += 1
            if row["rank"] == 0:
                close_group()
                group = []
            group.append(row)  # a record's candidates, best first (one candidate: no pairs)
        close_group()
    finally:
        if args.out:
            out.close()
    if args.out:
        os.replace(args.out + ".tmp", args.out)
    msg = f"scored {n} responses of {len(recs)} records"
    if pairs:
        msg += f"; pairwise accuracy {wins / pairs:.4f} over {pairs} pairs (better listed first in the data)"
    print(msg + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 0
