"""`vlmalign data judge-sft`: preference pairs as SFT examples of the judge prompt that
`vlmalign generate-preferences` asks (each pair in both orders, answered "A" or "B"),
optionally appended to an SFT mix, so that the model trained on them can judge its own samples.

    vlmalign data judge-sft --pairs data/shapesworld/hallucination_train.json --limit 1500 \\
        --mix data/shapesworld/sft_train.json --out data/shapesworld/sft_judge_train.jsonl

The output is native JSON Lines; `vlmalign train sft data.train_file=OUT` reads it. See
docs/PREFERENCE.md, "Self-critique pipeline".
"""

from __future__ import annotations

import json

from .args import add_limit, refuse_output_over_input
from .generate_preferences import add_judge_prompt_args, read_judge_template


def register(data_subparsers) -> None:
    p = data_subparsers.add_parser("judge-sft", help="preference pairs as judge-prompt SFT examples (self-critique)",
                                   description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--pairs", required=True, help="preference pairs (any readable format)")
    p.add_argument("--out", required=True, help="output SFT file (vlmalign JSON Lines)")
    p.add_argument("--mix", help="SFT data whose records come first in the output")
    p.add_argument("--image-root", help="directory image paths are resolved in and confined to "
                                        "(default: the pairs file's)")
    add_limit(p, "pairs")
    add_judge_prompt_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..methods.judge_sft import write_judge_sft
    refuse_output_over_input(args.out, args.pairs, args.mix)
    counts = write_judge_sft(args.pairs, args.out, mix=args.mix, limit=args.limit, image_root=args.image_root,
                             template=read_judge_template(args), system=args.judge_system)
    print(json.dumps(counts))
    return 0
