"""GRPO training throughput: vlmalign's GRPO against TRL 1.16's ``GRPOTrainer``.

Same LLaVA-architecture model (random init, the DPO benchmark's model of the preset, built by
``_harness.py``), same prompts with their images, same group size (``rollout.k`` =
``num_generations``), same completion length on both sides, same work per optimizer step:

* one step = ``prompts`` prompts x ``k`` sampled completions (the samples), scored by the same
  reward function, one optimizer update over all of them (``update.epochs=1``, whole-rollout
  minibatch | ``num_iterations=1``, ``steps_per_generation = gradient_accumulation_steps``), in
  forwards of ``micro`` rows (``train.batch_size`` | ``per_device_train_batch_size``, accumulated);
* no reference model, no KL (``kl.coef=0, kl.track=false`` | ``beta=0``); the ratio's denominator
  is the policy's own detached log-probs on both sides (one update per rollout, so neither side
  runs an "old" forward); clip 0.2; group-std-scaled advantages; per-sequence token-mean loss
  (``grpo.estimator=grpo`` with ``seq_mean_token_mean`` | ``loss_type="grpo"``,
  ``scale_rewards="group"``);
* sampling at temperature 1, no top-k / top-p; the completion length is FIXED: every completion
  is exactly ``max_new_tokens`` tokens (TRL: ``min_new_tokens = max_new_tokens``, which masks EOS
  until the budget; ours: the stop ids are added to the ids the sampler never draws, as it
  already does for the image placeholder). Both sides check the lengths they got;
* AdamW, same learning rate, constant schedule, clipping 1.0, no weight decay; the language
  model and output head train, vision tower and projector frozen; no gradient checkpointing
  (TRL's default is on: turned off here, as ours has it off);
* fp32 on CPU (``--preset cpu``, the default), bf16 + LoRA on CUDA (``--preset gpu``).

The difference under test: TRL repeats each prompt row once per completion, so its vision tower
runs once per completion in generation and again in the training forward; vlmalign encodes each
image once per prompt group and reuses the features for sampling and the update.

Each side runs in its own process (peak resident memory is that side's alone); rounds alternate
the order. In each process: load model and data the way that trainer does, run ``warmup +
steps`` optimizer steps; the timed window is the wall time from the end of the last warm-up step
to the end of the last step (generation, rewards, forwards, backward, optimizer: everything). In
that window: vision-tower images (the tower class's ``forward`` wrapped), and where the time
went, in wall and CPU time (``generate``, ``Tensor.backward`` and the optimizer's ``step``
wrapped; the rest, ``other``, is mostly the training forward, plus rewards and bookkeeping; the
vision tower's ``forward``, which runs inside generate and the forward, is timed apart). Peak memory is
``getrusage(RUSAGE_SELF).ru_maxrss`` (plus torch's max allocated on CUDA).

    .venv/bin/python benchmarks/grpo_throughput.py --json grpo.json          # CPU, ~5 min on 2 shared cores
    .venv/bin/python benchmarks/grpo_throughput.py --preset smoke --rounds 1 --warmup 1 --steps 1
    python benchmarks/grpo_throughput.py --preset gpu --json gpu.json        # CUDA (not run by us yet)

See docs/BENCHMARKS.md for the measured numbers and how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402  (model, measuring, TRL setup and process harness shared with the others)

SIDES = ("ours", "trl")

# Per preset: the model (``_harness.PRESETS[arch]``), where and how it trains, and the GRPO
# shapes: prompts per step, k completions each, completion tokens (fixed), rows per forward.
# cpu: the DPO benchmark's CPU model (144 image tokens, ~36 prompt-text tokens), 2 prompts x 4
# completions of 32 tokens, the whole rollout in one forward. gpu: LLaVA-1.5-7B shapes (576
# image tokens, CLIP ViT-L/14-336), bf16 + LoRA (full 7B training with AdamW does not fit one
# card next to the rollout), 4 prompts x 8 completions of 128 tokens, forwards of 8 rows.
GRPO_PRESETS: dict[str, dict] = {
    "smoke": dict(arch="smoke", device="cpu", dtype="fp32", lora=False, prompts=2, k=2, max_new_tokens=4, micro=4),
    "cpu": dict(arch="cpu", device="cpu", dtype="fp32", lora=False, prompts=2, k=4, max_new_tokens=32, micro=8),
    "gpu": dict(arch="llava-1.5-7b", device="cuda", dtype="bf16", lora=True, prompts=4, k=8, max_new_tokens=128,
                micro=8),
}


@dataclass
class Spec(harness.Spec):
    """Everything both sides must agree on (written to spec.json for the child processes).
    ``batch_size`` (the harness's unit count per step) is prompts x k: samples per step."""

    prompts: int = 2
    k: int = 4
    max_new_tokens: int = 32
    micro: int = 8
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    max_length: int = 100000

    @property
    def n_prompts(self) -> int:
        return self.total_steps * self.prompts


# ------------------------------------------------------------------------------------ data
_QUESTION = ("Look at the picture and describe it: say which shape is in each part, what colour it is "
             "and where it is, then say how many objects there are. ")


def build_data(arch: dict, model_dir: Path, out_dir: Path, n: int, seed: int = 0) -> Path:
    """``n`` ShapesWorld scenes as LLaVA-JSON records (``<image>\\n`` + a question of
    ``prompt_tokens`` tokens; the answer is the scene's caption, unused by the reward)."""
    import numpy as np
    from transformers import AutoTokenizer

    from vlmalign.data.synthetic import ShapesConfig, caption, render, sample_scene

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = ShapesConfig(seed=seed, image_size=max(16, arch["image_size"]), grid=2, max_objects=3, train_images=n,
                       eval_images=1)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    question = harness.fit_text(tok, _QUESTION, arch["prompt_tokens"]).strip()
    records = []
    for i in range(n):
        scene = sample_scene(rng, cfg)
        rel = f"images/{i:05d}.png"
        render(scene).save(out_dir / rel)
        records.append({"id": f"rl-{i:05d}", "image": rel,
                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                          {"from": "gpt", "value": caption(scene)}]})
    return harness.write_records(out_dir, "prompts.json", records)


def prompt_stats(model_dir: str, data_file: str) -> dict:
    """Prompt token counts under our tokenization (image tokens included)."""
    ad, recs, loader = harness.records_for_stats(model_dir, data_file, "rl_prompt")
    lengths, images = [], []
    for rec in recs:
        t = ad.tokenize_prompt(rec.prompt, [loader.inputs(r) for m in rec.prompt for r in m.images])
        lengths.append(len(t.input_ids))
        images.append(sum(t.image_token_counts))
    return {"prompt_tokens": statistics.mean(lengths), "image_tokens": statistics.mean(images)}


def reward_of(text: str) -> float:
    """The reward both sides use: distinct words in the completion (cheap, varies within a group)."""
    return float(len(set(text.split())))


# ------------------------------------------------------------------------------------ measuring
# timed parts that run inside the others (the vision tower runs in generate and in the training forward)
NESTED = ("vision_tower",)


class Clock(harness.StepClock):
    """The harness's step clock plus where each step's time went (a :class:`harness.CallTimer`)
    and the completion lengths each side reports."""

    def __init__(self, spec: Spec, vision: harness.VisionCounter, model_cls):
        super().__init__(spec, vision, "sample")
        import torch
        from transformers.models.clip.modeling_clip import CLIPVisionModel
        self.timer = harness.CallTimer({"generate": (model_cls, "generate"), "backward": (torch.Tensor, "backward"),
                                        "optimizer": (torch.optim.AdamW, "step"),
                                        "vision_tower": (CLIPVisionModel, "forward")})
        self.time_at: dict[int, dict] = {0: self.timer.mark()}
        self.completion_tokens: list[float] = []
        self.prompt_tokens: list[float] = []

    def step_done(self) -> None:
        super().step_done()
        self.time_at[len(self.ends)] = self.timer.mark()

    def summary(self) -> dict:
        out = super().summary()
        s = self.spec
        units = s.steps * s.batch_size
        a, b = self.time_at[s.warmup], self.time_at[s.total_steps]
        for kind in ("wall", "cpu"):   # seconds per sample in each part; other = the step's rest
            parts = {k: (b[kind][k] - a[kind][k]) / units for k in a[kind]}
            total = parts.pop("_all")
            parts["other"] = total - sum(v for k, v in parts.items() if k not in NESTED)
            out[f"{kind}_s_per_sample_by_part"] = parts
        out["completion_tokens"] = statistics.mean(self.completion_tokens) if self.completion_tokens else None
        out["prompt_tokens"] = statistics.mean(self.prompt_tokens) if self.prompt_tokens else None
        return out


def _check_length(clock: Clock, spec: Spec, side: str) -> None:
    got = clock.completion_tokens
    if not got or min(got) != spec.max_new_tokens or max(got) != spec.max_new_tokens:
        raise RuntimeError(f"{side}: completions were not all {spec.max_new_tokens} tokens long: {got}")


# ------------------------------------------------------------------------------------ our side
class OursClock:
    """The engine callback that times our optimizer steps (the engine's ``step`` phase: rollout,
    rewards, update) and reads each step's mean response length."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.marks: dict[str, float] = {"start": time.perf_counter()}

    def wrap(self, engine, name: str, **info):
        @contextlib.contextmanager
        def step():
            self.marks.setdefault("first_step", time.perf_counter())
            yield
            self.clock.step_done()
        return step() if name == "step" else contextlib.nullcontext()

    def on_step_end(self, engine, metrics: dict) -> None:
        self.clock.completion_tokens.append(float(metrics["response_length"]))


def _fixed_length_sampling() -> None:
    """Never sample a stop token (as the sampler never samples the image placeholder): every
    response runs to ``rollout.max_new_tokens``, as TRL's with ``min_new_tokens`` set."""
    import importlib
    ro = importlib.import_module("vlmalign.rollout.rollout")   # the module (the package exports a function so named)

    banned = ro.banned_token_ids

    def with_stops(adapter):
        return sorted(set(banned(adapter)) | set(adapter.stop_token_ids()))

    ro.banned_token_ids = with_stops


def run_ours(spec: Spec) -> dict:
    """vlmalign's ``train_grpo``: images encoded once per prompt group, the features reused for
    sampling and the update (vision tower and projector frozen)."""
    vision = harness.setup_child(spec)
    base_mb = harness.rss_mb()
    from transformers import LlavaForConditionalGeneration

    from vlmalign.config import load_config
    from vlmalign.methods import grpo

    _fixed_length_sampling()
    clock = Clock(spec, vision, LlavaForConditionalGeneration)
    watch = OursClock(clock)
    overrides = [
        f"model.path={spec.model_dir}", f"model.dtype={spec.dtype}",
        "model.train_vision=false", "model.train_projector=false", "model.train_language=true",
        f"lora.enabled={str(spec.lora).lower()}", f"lora.r={spec.lora_r}", f"lora.alpha={spec.lora_alpha}",
        f"data.train_file={spec.data_file}", f"data.max_length={spec.max_length}",
        f"optim.lr={spec.lr}", "optim.schedule=constant", "optim.warmup_steps=0", "optim.warmup_ratio=0",
        "optim.weight_decay=0", "optim.max_grad_norm=1.0",
        f"train.output_dir={spec.work_dir}/run-ours", "train.overwrite=true", f"train.batch_size={spec.micro}",
        f"train.max_steps={spec.total_steps}", f"train.seed={spec.seed}", "train.progress=false",
        f"train.precision={spec.dtype}",
        f"rollout.prompts_per_step={spec.prompts}", f"rollout.k={spec.k}",
        f"rollout.max_new_tokens={spec.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=0", "kl.coef=0", "kl.track=false", "update.epochs=1", "update.minibatch_size=0",
        "update.clip_eps=0.2", "grpo.estimator=grpo", "grpo.loss_agg=seq_mean_token_mean",
    ]
    cfg = load_config(grpo.GRPOConfig, None, overrides)

    def reward(inputs):
        import torch
        scores = torch.tensor([reward_of(x.response) for x in inputs])
        return scores, {"distinct_words": scores}

    result, adapter = grpo.train_grpo(cfg, reward=reward, callbacks=[watch])
    _check_length(clock, spec, "ours")
    return harness.side_result(clock, base_mb, watch.marks["first_step"] - watch.marks["start"],
                               result.metrics.get("loss"), adapter.model)


# ------------------------------------------------------------------------------------ TRL side
def run_trl(spec: Spec) -> dict:
    """TRL 1.16 ``GRPOTrainer`` on the same directory and prompts (its own data path: each
    prompt row repeated ``num_generations`` times, images with it)."""
    vision = harness.setup_child(spec)
    base_mb = harness.rss_mb()
    import trl
    from transformers import LlavaForConditionalGeneration
    from trl import GRPOConfig, GRPOTrainer

    marks = {"start": time.perf_counter()}
    model, processor = harness.trl_model(spec)
    model.model.multi_modal_projector.requires_grad_(False)
    peft_config = None
    if spec.lora:
        from peft import LoraConfig

        from vlmalign.models import adapter_for
        peft_config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, bias="none",
                                 target_modules=adapter_for(model, processor).lora_target_modules())
    dataset = harness.trl_dataset(spec, spec.n_prompts, lambda r: {
        "prompt": [{"role": "user", "content": r["conversations"][0]["value"].replace("<image>\n", "")}]})
    clock = Clock(spec, vision, LlavaForConditionalGeneration)

    def reward(prompts, completions, **kw):
        return [reward_of(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    rows = spec.prompts * spec.k
    kw = harness.trl_args(spec)
    kw.update(per_device_train_batch_size=spec.micro, gradient_accumulation_steps=rows // spec.micro,
              num_generations=spec.k, max_completion_length=spec.max_new_tokens,
              generation_kwargs={"min_new_tokens": spec.max_new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
              beta=0.0, num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group",
              gradient_checkpointing=False, log_completions=False, shuffle_dataset=False)
    kw.pop("max_length", None)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**kw), train_dataset=dataset,
                          processing_class=processor, peft_config=peft_config,
                          callbacks=[harness.trl_step_callback(clock)])
    if trainer.args.generation_batch_size != rows or trainer.args.steps_per_generation != rows // spec.micro:
        raise RuntimeError(f"TRL generation batch {trainer.args.generation_batch_size} != {rows} samples per step")

    step = trainer.training_step
    score = trainer._generate_and_score_completions

    def training_step(*a, **k):
        marks.setdefault("first_step", time.perf_counter())
        return step(*a, **k)

    def generate_and_score(*a, **k):
        out = score(*a, **k)
        clock.completion_tokens.extend(out["completion_mask"].sum(1).float().tolist())
        clock.prompt_tokens.append(float(out["prompt_mask"].sum(1).float().mean()))
        return out

    trainer.training_step = training_step
    trainer._generate_and_score_completions = generate_and_score
    result = trainer.train()
    _check_length(clock, spec, "trl")
    return harness.side_result(clock, base_mb, marks["first_step"] - marks["start"], result.training_loss,
                               trainer.model, trl_version=trl.__version__)


# ------------------------------------------------------------------------------------ report
def _aggregate(runs: list[dict]) -> dict:
    agg = harness.aggregate(runs, "sample")
    for k in ("flops_per_sample", "flops_by_part_per_sample"):
        agg.pop(k, None)   # not counted here (FlopCounterMode over a KV-cached generate is mostly its overhead)
    for kind in ("wall", "cpu"):
        key = f"{kind}_s_per_sample_by_part"
        agg[key] = {k: statistics.median(r[key][k] for r in runs) for k in runs[0][key]}
    for k in ("completion_tokens", "prompt_tokens", "trl_version"):
        if runs[0].get(k) is not None:
            agg[k] = runs[0][k]
    return agg


def ratios(o: dict, t: dict) -> dict:
    """vlmalign / TRL."""
    out = {"samples_per_s": o["samples_per_s"] / t["samples_per_s"], "peak_mem": o["peak_mem_mb"] / t["peak_mem_mb"],
           "vision_encodes_per_sample": (o["vision_encodes_per_sample"] / t["vision_encodes_per_sample"]
                                         if t["vision_encodes_per_sample"] else None)}
    if "peak_gpu_mem_mb" in o and "peak_gpu_mem_mb" in t:
        out["peak_gpu_mem"] = o["peak_gpu_mem_mb"] / t["peak_gpu_mem_mb"]
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else ""


def _table(report: dict) -> str:
    o, t, m, r = report["ours"], report["trl"], report["setup"], report["ratios"]

    def row(name, a, b, fmt="{:.3f}", ratio=""):
        return f"{name:<40s}{fmt.format(a):>12s}{fmt.format(b):>12s}{ratio:>10s}"

    lines = [
        f"GRPO throughput: vlmalign vs TRL {t.get('trl_version', '?')} GRPOTrainer  "
        f"(preset {m['preset']}, {m['dtype']} on {m['device']}, {m['threads']} threads)",
        harness.model_line(m),
        f"rollout {m['prompts']} prompts x k={m['k']} = {m['batch_size']} samples/step, {m['max_new_tokens']} "
        f"completion tokens each (fixed), prompt {m['seq']['prompt_tokens']:.0f} tokens "
        f"({m['seq']['image_tokens']:.0f} image); forwards of {m['micro']} rows",
        f"train   {m['trained']}; one AdamW update per rollout, lr {m['lr']}, constant, clip 1.0; "
        "no reference / KL (beta 0)",
        f"runs    {m['rounds']} interleaved rounds per side (own process each), {m['warmup']} warm-up + "
        f"{m['steps']} timed steps; medians over rounds",
        "",
        f"{'':<40s}{'ours':>12s}{'trl':>12s}{'ours/trl':>10s}",
        row("samples/s", o["samples_per_s"], t["samples_per_s"], ratio=f"{r['samples_per_s']:.2f}x"),
        row("vision encodes/sample", o["vision_encodes_per_sample"], t["vision_encodes_per_sample"], "{:.2f}",
            ratio=f"{r['vision_encodes_per_sample']:.2f}x" if r["vision_encodes_per_sample"] is not None else ""),
        row("peak RSS MB (whole process)", o["peak_mem_mb"], t["peak_mem_mb"], "{:.0f}", ratio=f"{r['peak_mem']:.2f}x"),
        row("RSS MB after imports", o["base_mem_mb"], t["base_mem_mb"], "{:.0f}"),
    ]
    if "peak_gpu_mem" in r:
        lines.append(row("peak GPU MB", o["peak_gpu_mem_mb"], t["peak_gpu_mem_mb"], "{:.0f}",
                         ratio=f"{r['peak_gpu_mem']:.2f}x"))
    lines += [
        row("CPU s/sample (all threads)", o["cpu_s_per_sample"], t["cpu_s_per_sample"], "{:.3f}",
            ratio=_ratio(o["cpu_s_per_sample"], t["cpu_s_per_sample"])),
        *[line for kind in ("wall", "cpu") for line in (
            f"{kind} ms/sample, by part of the step:",
            *[row(f"  {k}", o[f"{kind}_s_per_sample_by_part"][k] * 1e3, t[f"{kind}_s_per_sample_by_part"][k] * 1e3,
                  "{:.1f}", ratio=_ratio(o[f"{kind}_s_per_sample_by_part"][k], t[f"{kind}_s_per_sample_by_part"][k]))
              for k in ("generate", "backward", "optimizer", "other")],
            row("  vision tower forward (inside the above)", o[f"{kind}_s_per_sample_by_part"]["vision_tower"] * 1e3,
                t[f"{kind}_s_per_sample_by_part"]["vision_tower"] * 1e3, "{:.1f}"))],
        row("trainable parameters (M)", o["trainable_params"] / 1e6, t["trainable_params"] / 1e6, "{:.2f}"),
        row("setup s (load, data, trainer)", o["setup_s"], t["setup_s"], "{:.1f}"),
        "",
        "samples/s per round  ours: " + ", ".join(f"{x:.3f}" for x in o["rounds_samples_per_s"])
        + "   trl: " + ", ".join(f"{x:.3f}" for x in t["rounds_samples_per_s"]),
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="grpo_throughput.py",
        description="Train GRPO with vlmalign and with TRL's GRPOTrainer on the same random-init "
                    "LLaVA-architecture model, prompts and images, group size and (fixed) completion length; "
                    "print samples/s, vision encodes/sample, peak memory and where the step time went "
                    "(each side in its own process), and write it as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(GRPO_PRESETS), default="cpu",
                   help="model, device, dtype and rollout shapes (gpu: LLaVA-1.5-7B shapes, bf16, LoRA, CUDA)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (unset: the preset's)")
    p.add_argument("--k", type=int, default=None, help="completions per prompt, the group size (unset: the preset's)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="completion tokens, fixed on both sides (unset: the preset's)")
    p.add_argument("--micro", type=int, default=None,
                   help="rows per forward, accumulated to one update per rollout (unset: the preset's)")
    harness.add_step_options(p, steps=6, rounds=3, lr=1e-6, who="both sides")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (0: torch's default; unset: 1 on CPU, 0 on CUDA)")
    harness.add_run_options(p, SIDES)
    args = harness.parse(p, argv)
    pre = GRPO_PRESETS[args.preset]
    for k in ("prompts", "k", "max_new_tokens", "micro"):
        if getattr(args, k) is None:
            setattr(args, k, pre[k])
    args.device = pre["device"]
    if args.k < 2 or args.prompts < 1 or args.max_new_tokens < 1 or args.micro < 1:
        p.error("--k must be at least 2, --prompts, --max-new-tokens and --micro at least 1")
    if (args.prompts * args.k) % args.micro:
        p.error(f"--micro ({args.micro}) must divide the samples per step (prompts x k = {args.prompts * args.k})")
    return args


def _run(side: str, spec: Spec) -> dict:
    return (run_ours if side == "ours" else run_trl)(spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        return harness.child(Spec, _run, args._child, args._spec, args._out)
    sides = harness.chosen_sides(args.sides, SIDES)
    pre = GRPO_PRESETS[args.preset]
    arch = dict(harness.PRESETS[pre["arch"]])
    with harness.work_dir(args.work_dir, "grpo-bench-") as work:
        spec = Spec(preset=args.preset, device=pre["device"], dtype=pre["dtype"], lora=pre["lora"],
                    batch_size=args.prompts * args.k, prompts=args.prompts, k=args.k,
                    max_new_tokens=args.max_new_tokens, micro=args.micro, warmup=args.warmup, steps=args.steps,
                    lr=args.lr, threads=harness.threads(args), arch=arch, work_dir=str(work))
        if not args.quiet:
            print(f"building model and {spec.n_prompts} prompts in {work}", flush=True)
        model_dir = harness.build_model(arch, work / "model", dtype=spec.dtype)
        data_file = build_data(arch, model_dir, work / "data", spec.n_prompts)
        spec.model_dir, spec.data_file = str(model_dir), str(data_file)
        seq = prompt_stats(str(model_dir), str(data_file))

        runs = harness.run_rounds(__file__, sides, spec, work, args.rounds, args.quiet,
                                  {s: f"{s:4s}" for s in sides}, "sample")
        report: dict = {s: _aggregate(runs[s]) for s in sides}
        report["setup"] = harness.setup_report(
            args, spec, seq, prompts=spec.prompts, k=spec.k, max_new_tokens=spec.max_new_tokens, micro=spec.micro,
            trained=("LoRA adapters on the language model" if spec.lora else "full language model + output head")
            + "; vision tower and projector frozen",
            timing="samples_per_s: completions per second over the timed optimizer steps (generation, rewards, "
                   "forward, backward, optimizer)")
        if "ours" in report and "trl" in report:
            report["ratios"] = ratios(report["ours"], report["trl"])
            print(_table(report))
        else:
            print(json.dumps(report, indent=1))
        harness.write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
