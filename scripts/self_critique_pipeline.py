"""The self-critique pipeline of the LLaVA-1.5 self-critique study on ShapesWorld, as one command:
several LoRA SFT members (different seeds, optionally learning rates) -> `vlmalign merge` into an
ensemble (the mean of the members' LoRA updates B·A, merged into the base) -> `vlmalign
generate-preferences` with the ensemble as its own judge (every pair asked in both orders) ->
`vlmalign train dpo` -> `vlmalign eval` of every member, the ensemble and the DPO model.

    python scripts/self_critique_pipeline.py --out runs/self_critique [--members 4] [--lrs 2e-3,3e-3,...]
        [--steps-scale 0.01] [--start MODEL_DIR] [--overwrite]

Every stage is a `vlmalign` command (run in this process; each is written to OUT/commands.sh as
it runs, so any stage can be rerun by hand); the recipes are recipes/self_critique/ (members,
DPO, the judge prompt) and recipes/quickstart/pretrain.yaml. The members' SFT data is the
quickstart's ShapesWorld SFT mix with judge examples appended (`vlmalign data judge-sft`:
description pairs rendered as the judge prompt, both orders, answered "A" or "B"), since a model
that never saw the judge prompt cannot answer it (--judge-pairs 0 leaves them out). Before
sampling, each member and the ensemble judge the held-out description pairs
(hallucination_eval.json) in both orders: how often they agree with the known answer.

Writes OUT/report.json and OUT/report.md (a table: VQA accuracy, POPE F1 and yes-ratio, CHAIR_i,
CHAIR_s, held-out judge accuracy per model; the preference counts). When the ensemble keeps no
pair, DPO is not trained: the report says so and the command exits with status 3.
docs/PREFERENCE.md, "Self-critique pipeline", has the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "self_critique"
TEMPLATE = RECIPES / "judge_template.txt"
EVAL_TASKS = ("vqa", "pope", "chair")          # of recipes/quickstart/sft.yaml's eval.tasks
METRICS = ("vqa_accuracy", "pope_f1", "pope_yes_ratio", "chair_i", "chair_s")
NO_PAIRS = 3                                   # exit status when the judge kept no pair


def recipe_steps(path: Path) -> int:
    return yaml.safe_load(path.read_text())["train"]["max_steps"]


def scaled(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


class Pipeline:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.data = self.out / "data"
        self.commands = self.out / "commands.sh"
        self.report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args), "stages": {}}

    def vlmalign(self, *argv, stage: str) -> int:
        """Run one `vlmalign` command in this process; log it; return its exit status."""
        from vlmalign.cli.main import main
        argv = [str(a) for a in argv]
        line = "vlmalign " + " ".join(shlex.quote(a) for a in argv)
        print(f"\n[self-critique] {stage}: {line}", flush=True)
        with open(self.commands, "a") as f:
            f.write(line + "\n")
        t = time.time()
        rc = main(argv)
        self.report["stages"][stage] = {"seconds": round(time.time() - t, 1), "status": rc}
        return rc

    def must(self, *argv, stage: str) -> None:
        rc = self.vlmalign(*argv, stage=stage)
        if rc:
            self.finish()
            raise SystemExit(f"[self-critique] stage {stage} failed (exit status {rc}); see the error above")

    # ------------------------------------------------------------------ stages
    def synth(self) -> None:
        from vlmalign.quickstart.plan import PLAN
        flags = []
        for k, v in PLAN["data"].items():
            if k not in ("seed", "train_images", "eval_images"):
                flags += [f"--{k.replace('_', '-')}", ",".join(v) if isinstance(v, list) else v]
        self.must("data", "synth", "shapes", "--out", self.data, "--seed", self.args.seed,
                  "--train", self.args.train_images, "--eval", self.args.eval_images, *flags, stage="data")

    def start_model(self) -> Path:
        if self.args.start:
            return Path(self.args.start)
        from vlmalign.quickstart.plan import tiny_settings
        tiny = self.out / "tiny"
        extra = [x for k, v in tiny_settings("llava").items() for x in (f"--{k.replace('_', '-')}", v)]
        self.must("models", "tiny", "llava", "--out", tiny, "--seed", self.args.seed, *extra, stage="tiny")
        recipe = ROOT / "recipes" / "quickstart" / "pretrain.yaml"
        steps = scaled(recipe_steps(recipe), self.args.steps_scale)
        self.must("train", "pretrain", "--config", recipe, f"model.path={tiny}",
                  f"data.train_file={self.data / 'captions_train.json'}", f"train.output_dir={self.out / 'pretrain'}",
                  f"train.seed={self.args.seed}", f"train.max_steps={steps}", *self.common(), stage="pretrain")
        return self.out / "pretrain" / "checkpoints" / f"step-{steps}" / "model"

    def sft_data(self) -> Path:
        if self.args.judge_pairs == 0:
            return self.data / "sft_train.json"
        out = self.data / "sft_judge_train.jsonl"
        self.must("data", "judge-sft", "--pairs", self.data / "hallucination_train.json", "--limit",
                  self.args.judge_pairs, "--mix", self.data / "sft_train.json", "--out", out, "--judge-template",
                  TEMPLATE, stage="judge_sft")
        return out

    def members(self, start: Path, train_file: Path) -> list[Path]:
        recipe = RECIPES / "sft_lora_member.yaml"
        steps = scaled(recipe_steps(recipe), self.args.steps_scale)
        lrs = self.args.lrs or [None] * self.args.members
        dirs = []
        for i, lr in enumerate(lrs):
            run = self.out / f"member{i}"
            self.must("train", "sft", "--config", recipe, f"model.path={start}", f"data.train_file={train_file}",
                      f"train.output_dir={run}", f"train.seed={self.args.seed + i}", f"train.max_steps={steps}",
                      *([f"optim.lr={lr}"] if lr is not None else []), *self.common(), stage=f"member{i}")
            dirs.append(run / "checkpoints" / f"step-{steps}" / "model")
        return dirs

    def merge(self, members: list[Path]) -> Path:
        out = self.out / "ensemble"
        self.must("merge", "--method", "mean", *members, "--out", out,
                  *(["--overwrite"] if self.args.overwrite else []), stage="merge")
        return out

    def judge_check(self, name: str, model: Path) -> dict:
        """The model's verdicts on the held-out description pairs, both orders (library call)."""
        from vlmalign.data.readers import read_file
        from vlmalign.methods.judge_sft import judge_accuracy
        from vlmalign.methods.self_critique import VLMJudge
        pairs = read_file(self.data / "hallucination_eval.json", kind="preference")
        judge = VLMJudge(str(model), TEMPLATE.read_text(), image_root=self.data, max_new_tokens=4)
        acc = judge_accuracy(judge, pairs)
        print(f"[self-critique] {name} judges held-out pairs: {json.dumps(acc)}", flush=True)
        return acc

    def preferences(self, ensemble: Path) -> tuple[Path, dict]:
        out = self.data / "self_critique.jsonl"   # inside the data folder: image paths resolve as written
        a = self.args
        rc = self.vlmalign("generate-preferences", "--model", ensemble, "--data", self.data / "captions_train.json",
                           "--limit", a.prompts, "--out", out, "--n", a.n, "--temperature", a.temperature,
                           "--max-new-tokens", 40, "--batch-size", 32, "--seed", a.seed, "--judge", "self",
                           "--judge-template", TEMPLATE, "--judge-max-new-tokens", 4, stage="preferences")
        path = out.with_suffix(".summary.json")
        summary = json.loads(path.read_text()) if path.exists() else {}
        if rc and (not summary or summary.get("pairs", 0) != 0):   # failed for another reason than no pair
            self.finish()
            raise SystemExit(f"[self-critique] generate-preferences failed (exit status {rc})")
        return out, summary

    def dpo(self, ensemble: Path, pairs: Path) -> Path:
        recipe = RECIPES / "dpo.yaml"
        steps = scaled(recipe_steps(recipe), self.args.steps_scale)
        run = self.out / "dpo"
        self.must("train", "dpo", "--config", recipe, f"model.path={ensemble}", f"data.train_file={pairs}",
                  f"data.eval_file={self.data / 'hallucination_eval.json'}", f"train.output_dir={run}",
                  f"train.seed={self.args.seed}", f"train.max_steps={steps}",
                  f"train.eval_every={max(steps // 2, 1)}", f"dpo.ref_cache_dir={self.out / 'ref_cache'}",
                  *self.common(), stage="dpo")
        return run / "checkpoints" / f"step-{steps}" / "model"

    def evaluate(self, name: str, model: Path) -> dict:
        """`vlmalign eval` of the quickstart sft recipe's vqa, pope and chair tasks."""
        from vlmalign.quickstart.plan import stage_config
        from vlmalign.quickstart.run import task_metrics
        tasks = [t for t in stage_config("sft", self.out).eval.tasks if t["task"] in EVAL_TASKS]
        metrics = {}
        for t in tasks:
            run = self.out / "eval" / name / t["name"]
            flags = {"task": t["task"], "data": t["data"], "image-root": t.get("image_root"),
                     "max-new-tokens": t.get("max_new_tokens"), "batch-size": t.get("batch_size"),
                     "vocabulary": t.get("vocabulary"), "model": model, "out": run}
            argv = [x for k, v in flags.items() if v is not None for x in (f"--{k}", v)]
            keys = [f"{k}={t[k]}" for k in ("instruction", "image_position") if k in t]
            self.must("eval", *argv, "--overwrite", *keys, stage=f"eval_{name}_{t['name']}")
            found = json.loads((run / "metrics.json").read_text())
            metrics.update(task_metrics({f"eval/{t['name']}/{k}": v for k, v in found.items()}, [t]))
        return metrics

    def common(self) -> list[str]:
        return ["train.progress=false", *(["train.overwrite=true"] if self.args.overwrite else [])]

    # ------------------------------------------------------------------ report
    def finish(self) -> None:
        self.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        (self.out / "report.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out / "report.md").write_text(render(self.report))
        print("\n" + render(self.report), flush=True)

    def run(self) -> int:
        a = self.args
        if self.out.exists() and any(self.out.iterdir()) and not a.overwrite:
            raise SystemExit(f"{self.out} is not empty: pass --overwrite or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.commands.write_text("# the commands scripts/self_critique_pipeline.py ran, in order\n")
        self.synth()
        start = self.start_model()
        members = self.members(start, self.sft_data())
        ensemble = self.merge(members)
        models = {f"member{i}": m for i, m in enumerate(members)} | {"ensemble": ensemble}
        rows = self.report["models"] = {}
        for name, model in models.items():
            rows[name] = {"judge": self.judge_check(name, model)}
        pairs, summary = self.preferences(ensemble)
        self.report["preferences"] = {k: summary.get(k) for k in ("prompts", "samples", "unique", "duplicates",
                                                                  "judged_pairs", "inconsistent", "unparsable",
                                                                  "pairs")}
        if summary.get("pairs", 0) > 0:
            models["dpo"] = self.dpo(ensemble, pairs)
            rows["dpo"] = {}
        else:
            self.report["dpo"] = "not trained: the ensemble kept no preference pair"
        for name, model in models.items():
            rows[name].update(self.evaluate(name, model), path=str(model))
        self.finish()
        return 0 if "dpo" in models else NO_PAIRS


def render(report: dict) -> str:
    lines = ["| model | " + " | ".join(METRICS) + " | judge accuracy (held-out pairs, both orders) |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for name, row in report.get("models", {}).items():
        cells = [f"{row[k]:.3f}" if isinstance(row.get(k), float) else "-" for k in METRICS]
        j = row.get("judge")
        cells.append(f"{j['accuracy']:.3f} (wrong {j['wrong']:.3f}, inconsistent {j['inconsistent']:.3f})" if j
                     else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    p = report.get("preferences")
    if p:
        lines.append(f"\npreference pairs kept: {p['pairs']} (prompts {p['prompts']}, samples {p['samples']}, "
                     f"distinct {p['unique']}, judged pairs {p['judged_pairs']}, inconsistent {p['inconsistent']}, "
                     f"unparsable answers {p['unparsable']})")
    if "dpo" in report:
        lines.append(f"\nDPO {report['dpo']}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/self_critique", help="output directory (default: %(default)s)")
    ap.add_argument("--members", type=int, default=4, help="LoRA SFT members, >= 2 (seeds SEED..SEED+N-1; default 4)")
    ap.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")],
                    help="one learning rate per member, comma-separated (default: the recipe's for all)")
    ap.add_argument("--seed", type=int, default=0, help="data, model, first member's and sampling seed")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's steps (a smoke run)")
    ap.add_argument("--start", help="model directory the members start from (default: build the tiny model "
                                    "and pretrain its projector)")
    ap.add_argument("--train-images", type=int, default=6000, help="ShapesWorld training images")
    ap.add_argument("--eval-images", type=int, default=100, help="ShapesWorld held-out images")
    ap.add_argument("--judge-pairs", type=int, default=1500, help="description pairs turned into judge examples "
                                                                  "(x2 orders) in the members' SFT data; 0: none")
    ap.add_argument("--prompts", type=int, default=600, help="training images the ensemble describes")
    ap.add_argument("--n", type=int, default=4, help="descriptions sampled per image")
    ap.add_argument("--temperature", type=float, default=0.5,
                    help="sampling temperature of the descriptions (at 1.0 the tiny model's samples were mostly "
                         "broken text; docs/PREFERENCE.md)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    args = ap.parse_args(argv)
    if args.lrs is not None and len(args.lrs) != args.members:
        ap.error(f"--lrs gives {len(args.lrs)} learning rates for {args.members} members")
    if (args.members < 2 or args.temperature < 0 or args.steps_scale <= 0 or args.judge_pairs < 0
            or args.prompts < 1 or args.n < 2):
        ap.error("--members must be >= 2 (a merge averages), --prompts >= 1, --n >= 2, --temperature >= 0, "
                 "--steps-scale > 0, --judge-pairs >= 0")
    return args


def main(argv=None) -> int:
    return Pipeline(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
