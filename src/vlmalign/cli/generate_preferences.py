"""`vlmalign generate-preferences`: sample n responses per prompt, keep the pairs a judge prefers
in both orders (default: the model judges itself) or that a reward model ranks, and write a
preference file `vlmalign train dpo` reads (data.train_file=OUT).

    vlmalign generate-preferences --model runs/sft/checkpoints/step-300/model \\
        --data data/shapesworld/rl_train.json --out data/shapesworld/self_critique.jsonl --n 4
    vlmalign train dpo --config recipes/quickstart/dpo_self_critique.yaml

A summary (counts of samples, duplicates, pairs kept, inconsistent verdicts, ties, ...) is
written next to OUT as <OUT without suffix>.summary.json. See docs/PREFERENCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..methods.self_critique import SelfCritiqueConfig
from .args import add_limit, config_flags, config_from_flags, positive_int, refuse_output_over_input
from .generate import add_model_args, load_for_inference

# the options of SelfCritiqueConfig, flags of the same names (--max-new-tokens, ...)
SAMPLING = ("n", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "batch_size", "max_prompt_length",
            "drop_unfinished")
OPTIONS = SAMPLING + ("max_pairs", "rm_pairs", "tie_margin")


def register(sub) -> None:
    p = sub.add_parser("generate-preferences", help="self-critique preference pairs for DPO (judge or reward model)",
                       description=__doc__.split("\n\n", 1)[1])
    add_model_args(p)
    p.add_argument("--data", required=True, help="prompts: RL prompts, VQA, conversations (first user turn), "
                                                 "pairs (their prompt); any readable format")
    p.add_argument("--out", required=True, help="output preference file (vlmalign JSON Lines)")
    p.add_argument("--image-root", help="directory image paths are resolved in and confined to "
                                        "(default: the data file's)")
    p.add_argument("--format", default="auto", help="data format (default: detected)")
    add_limit(p, "prompts")
    config_flags(p, SelfCritiqueConfig, SAMPLING)
    g = p.add_argument_group("judge mode (default)")
    g.add_argument("--judge", default="self", help="'self' (the model judges its own responses) or a model "
                                                   "directory")
    add_judge_prompt_args(g)
    g.add_argument("--judge-max-new-tokens", type=positive_int, default=8, help="tokens of each verdict")
    g.add_argument("--judge-batch-size", type=positive_int, default=32, help="judge prompts per generate call")
    config_flags(g, SelfCritiqueConfig, ("max_pairs",))
    r = p.add_argument_group("reward-model mode")
    r.add_argument("--reward-model", help="reward-model directory (from `vlmalign train rm`); replaces the judge")
    config_flags(r, SelfCritiqueConfig, ("rm_pairs", "tie_margin"))
    r.add_argument("--reward-function", help="rank with a reward function (a built-in such as caption_errors, "
                                             "the ShapesWorld description verifier, or package.module:function) "
                                             "instead of a reward model; the prompts' reference answers are its "
                                             "references")
    r.add_argument("--rm-batch-size", type=positive_int, default=16, help="responses per reward-model batch")
    r.add_argument("--best-of-n", help="also write the best response per prompt as conversations (SFT data)")
    p.add_argument("--summary", help="summary JSON (default: <OUT without suffix>.summary.json)")
    p.set_defaults(func=_run)


def add_judge_prompt_args(g) -> None:
    """--judge-template and --judge-system: the judge prompt (also `vlmalign data judge-sft`'s)."""
    g.add_argument("--judge-template", help="text file with the judge prompt; fields {question} {response_a} "
                                            "{response_b} {reference}")
    g.add_argument("--judge-system", help="system message for the judge")


def read_judge_template(args) -> str | None:
    if not args.judge_template:
        return None
    with open(args.judge_template, encoding="utf-8") as f:
        return f.read()


def _run(args) -> int:
    from ..config import ConfigError
    from ..data.batching import ImageLoader
    from ..methods.self_critique import VLMJudge, generate_preferences, load_prompts
    ranker = args.reward_model or args.reward_function
    if args.reward_model and args.reward_function:
        raise ConfigError("give either --reward-model or --reward-function, not both")
    if ranker and args.judge != "self":
        raise ConfigError(f"give either --judge or {'--reward-model' if args.reward_model else '--reward-function'}, "
                          "not both")
    if args.best_of_n and not ranker:
        raise ConfigError("--best-of-n needs --reward-model or --reward-function")
    refuse_output_over_input(args.out, args.data)
    if args.best_of_n:
        refuse_output_over_input(args.best_of_n, args.data, args.out, what="--best-of-n")
    cfg = config_from_flags(SelfCritiqueConfig, args, OPTIONS)
    template = read_judge_template(args)
    prompts = load_prompts(args.data, format=args.format, limit=args.limit)
    root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    ad = load_for_inference(args)
    judge = source = None
    if args.reward_model:
        from ..rewards import RewardModelSource
        source = RewardModelSource(args.reward_model, image_root=root, batch_size=args.rm_batch_size,
                                   device=ad.device, trust_remote_code=args.trust_remote_code)
    elif args.reward_function:
        from ..rewards import FunctionReward
        source = FunctionReward(args.reward_function)
    else:
        judge_ad = ad
        if args.judge != "self":
            judge_ad = load_for_inference(argparse_like(args, model=args.judge, base=None))
        judge = VLMJudge(judge_ad, template, image_root=root, max_new_tokens=args.judge_max_new_tokens,
                         batch_size=args.judge_batch_size, system=args.judge_system)
    summary = generate_preferences(ad, prompts, ImageLoader(ad, root), cfg, out=args.out, image_root=root,
                                   judge=judge, reward_model=source, best_of_n_out=args.best_of_n,
                                   summary_out=args.summary)
    keys = ("prompts", "samples", "duplicates", "judged_pairs", "inconsistent", "unparsable", "ties", "pairs")
    print(json.dumps({k: summary[k] for k in keys}), file=sys.stderr)
    print(f"wrote {summary['pairs']} pairs to {args.out}; train with: {summary['train']}")
    return 0


def argparse_like(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})
