"""`vlmalign train METHOD --config FILE [key=value ...]`."""

from __future__ import annotations

import argparse

from ..config import describe, load_config

def _methods():
    """method -> (default-config factory, config class, runner); imported lazily."""
    from ..methods import dpo, kto, rm, sft
    from ..methods import grpo
    from ..methods import ppo
    return {
        "pretrain": (sft.pretrain_config, sft.SFTConfig, sft.train_sft),
        "sft": (sft.SFTConfig, sft.SFTConfig, sft.train_sft),
        "rm": (rm.RMConfig, rm.RMConfig, rm.train_rm),
        "dpo": (dpo.dpo_config, dpo.DPOConfig, dpo.train_dpo),
        "kto": (kto.kto_config, kto.KTOConfig, kto.train_kto),
        "grpo": (grpo.grpo_config, grpo.GRPOConfig, grpo.train_grpo),
        "ppo": (ppo.ppo_config, ppo.PPOConfig, ppo.train_ppo),
    }


METHOD_HELP = {"pretrain": "projector pretraining on captions (LLaVA stage 1)",
               "sft": "supervised fine-tuning (full, LoRA or QLoRA)",
               "rm": "reward model: scalar head on any family, pairs or ranked lists",
               "dpo": "DPO family (sigmoid, cDPO, IPO, hinge, SimPO, ORPO, token-weighted, mDPO) on preference "
                      "pairs; listwise DPO on ranked lists",
               "kto": "KTO on unpaired examples (prompt, completion, desirable/undesirable label)",
               "grpo": "online RL without a critic: GRPO, Dr. GRPO, RLOO, REINFORCE++ (k samples per prompt, "
                       "reward functions / reward models / VLM judges)",
               "ppo": "PPO with a critic: value model from the policy or a reward model, KL to a frozen reference, "
                      "GAE, minibatch epochs, critic warm-up"}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model with a recipe")
    tsub = p.add_subparsers(dest="method", metavar="METHOD")
    tsub.required = True
    for name, help_text in METHOD_HELP.items():
        m = tsub.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=f"{help_text}\n\noverrides: key=value with dotted keys, e.g. "
                                        "optim.lr=1e-4 train.max_steps=100",
                            epilog=_options_help(name))
        m.add_argument("--config", help="YAML recipe (defaults apply to keys it leaves out)")
        m.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        m.set_defaults(func=_run)


def _options_help(name: str) -> str:
    try:
        factory, cls, _ = _methods()[name]
    except Exception:  # pragma: no cover - help must never crash
        return ""
    return "options (key = default: help):\n" + "\n".join(describe(cls))


def _run(args) -> int:
    factory, cls, runner = _methods()[args.method]
    cfg = load_config(cls, args.config, args.overrides, base=factory())
    result, _ = runner(cfg)
    print(f"done: {result.step} steps; checkpoint {result.checkpoint}")
    for k, v in sorted(result.metrics.items()):
        if isinstance(v, float):
            print(f"  {k}: {v:.4f}")
    return 0
