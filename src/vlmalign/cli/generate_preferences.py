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

from .args import add_limit, at_least_two, nonneg_float, nonneg_int, positive_int, refuse_output_over_input
from .generate import add_model_args, add_sampling_args, load_for_inference


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
    p.add_argument("--n", type=at_least_two, default=4, help="responses sampled per prompt")
    add_sampling_args(p, max_new_tokens=64, temperature=1.0)
    p.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed (and the pair-budget draw)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="prompts per sampling call (images encoded once per call)")
    p.add_argument("--max-prompt-length", type=positive_int, default=None,
                   help="refuse longer prompts (tokens; never cut)")
    p.add_argument("--drop-unfinished", action="store_true", help="drop responses that hit --max-new-tokens")
    g = p.add_argument_group("judge mode (default)")
    g.add_argument("--judge", default="self", help="'self' (the model judges its own responses) or a model "
                                                   "directory")
    g.add_argument("--judge-template", help="text file with the judge prompt; fields {question} {response_a} "
                                            "{response_b} {reference}")
    g.add_argument("--judge-system", help="system message for the judge")
    g.add_argument("--judge-max-new-tokens", type=positive_int, default=8, help="tokens of each verdict")
    g.add_argument("--judge-batch-size", type=positive_int, default=32, help="judge prompts per generate call")
    g.add_argument("--max-pairs", type=nonneg_int, default=0, help="pairs judged per prompt, drawn with --seed "
                                                            "(0: all n(n-1)/2)")
    r = p.add_argument_group("reward-model mode")
    r.add_argument("--reward-model", help="reward-model directory (from `vlmalign train rm`); replaces the judge")
    r.add_argument("--rm-pairs", default="best_worst", choices=("best_worst", "best_each"),
                   help="best vs worst response, or best vs each other response")
    r.add_argument("--tie-margin", type=nonneg_float, default=0.0, help="score differences <= this are ties (skipped)")
    r.add_argument("--rm-batch-size", type=positive_int, default=16, help="responses per reward-model batch")
    r.add_argument("--best-of-n", help="also write the best response per prompt as conversations (SFT data)")
    p.add_argument("--summary", help="summary JSON (default: <OUT without suffix>.summary.json)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..config import ConfigError
    from ..data.batching import ImageLoader
    from ..methods.self_critique import SelfCritiqueConfig, VLMJudge, generate_preferences, load_prompts
    if args.reward_model and args.judge != "self":
        raise ConfigError("give either --judge or --reward-model, not both")
    if args.best_of_n and not args.reward_model:
        raise ConfigError("--best-of-n needs --reward-model")
    refuse_output_over_input(args.out, args.data)
    if args.best_of_n:
        refuse_output_over_input(args.best_of_n, args.data, args.out, what="--best-of-n")
    cfg = SelfCritiqueConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                             max_prompt_length=args.max_prompt_length, drop_unfinished=args.drop_unfinished,
                             max_pairs=args.max_pairs, rm_pairs=args.rm_pairs, tie_margin=args.tie_margin)
    cfg.check()
    template = None
    if args.judge_template:
        with open(args.judge_template, encoding="utf-8") as f:
            template = f.read()
    prompts = load_prompts(args.data, format=args.format, limit=args.limit)
    root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    ad = load_for_inference(args)
    judge = source = None
    if args.reward_model:
        from ..rewards import RewardModelSource
        source = RewardModelSource(args.reward_model, image_root=root, batch_size=args.rm_batch_size,
                                   device=ad.device, trust_remote_code=args.trust_remote_code)
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
