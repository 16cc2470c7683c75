"""DPO training throughput: vlmalign's DPO against TRL 1.16's ``DPOTrainer``.

Same LLaVA-architecture model (random init, saved once to disk and loaded by both sides), same
preference pairs, same batch size, same optimizer (AdamW, same learning rate, constant schedule,
gradient clipping 1.0), same trainable parameters (the language model in full or through LoRA;
vision tower and projector frozen), fp32 on CPU by default.

Each side runs in its own process (so peak resident memory is that side's alone), and the
rounds alternate the order (ours, trl | trl, ours | ...). In each process:

1. load the model and data the way that trainer does, then train ``warmup + steps`` optimizer
   steps; step 1 runs under ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs per pair), the
   remaining warm-up steps are not timed;
2. the timed window is the wall time from the end of the last warm-up step to the end of the
   last step (data loading, collation, forward, backward, optimizer: everything the trainer does
   per step); vision-tower forwards are counted in that window by wrapping the vision tower
   class's ``forward`` (plus, for ours, the adapter's own counters as a cross-check);
3. peak memory is ``getrusage(RUSAGE_SELF).ru_maxrss`` at exit.

Our side precomputes the reference log-probs before training (TRL refuses
``precompute_ref_log_probs`` for vision data and runs a live reference every step). That pass
is timed and counted separately (``precompute_*``), and reported two ways: training steps only
(``pairs_per_s``, the steady state) and one epoch including the precompute pass amortised over
it (``epoch_pairs_per_s``; the run's pairs are exactly one epoch).

    .venv/bin/python benchmarks/dpo_throughput.py --json bench.json   # CPU, ~3 min on 2 shared cores
    .venv/bin/python benchmarks/dpo_throughput.py --preset smoke --rounds 1 --warmup 1 --steps 1
    # GPU (not run by us yet): LLaVA-1.5-7B shapes, bf16, MFU against a peak of 989 TFLOP/s
    python benchmarks/dpo_throughput.py --device cuda --preset llava-1.5-7b --dtype bf16 \
        --lora --peak-tflops 989 --json h100.json

See docs/BENCHMARKS.md for the measured numbers and how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402  (model, measuring, TRL setup and process harness shared with sft_throughput.py)
from _harness import PRESETS  # noqa: E402,F401  (model and sequence shapes of each preset)

SIDES = ("ours", "trl")


@dataclass
class Spec(harness.Spec):
    """Everything both sides must agree on (written to spec.json for the child processes)."""

    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    beta: float = 0.1
    prefix_sharing: bool = True
    precompute_ref: bool = True

    @property
    def pairs(self) -> int:
        return self.total_steps * self.batch_size


# ------------------------------------------------------------------------------------ data
_PROMPT_TEXT = ("Describe the image in detail. Say which shape is in each part of the picture, "
                "what colour it is and where it is, then say how many objects there are. ")


def build_data(arch: dict, model_dir: Path, out_dir: Path, n_pairs: int, seed: int = 0) -> Path:
    """ShapesWorld scenes as ``plain_dpo`` records: the chosen answer describes the scene, the
    rejected one hallucinates (wrong colour/shape/extra object), both cut to
    ``completion_tokens`` tokens (plus EOS); the prompt is ``prompt_tokens`` tokens of text."""
    import numpy as np
    from transformers import AutoTokenizer

    from vlmalign.data.synthetic import ShapesConfig, caption, corrupted_captions, render, sample_scene

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    size = max(16, arch["image_size"])
    cfg = ShapesConfig(seed=seed, image_size=size, grid=2, max_objects=3, train_images=n_pairs, eval_images=1)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prompt = harness.fit_text(tok, _PROMPT_TEXT, arch["prompt_tokens"], lead=" ").strip()
    records = []
    for i in range(n_pairs):
        scene = sample_scene(rng, cfg)
        rel = f"images/{i:05d}.png"
        render(scene).save(out_dir / rel)
        good = caption(scene)
        bad = corrupted_captions(scene, rng, cfg, ["colour", "shape"])[-1][0]
        # the template renders " " + answer after "ASSISTANT:"
        n = arch["completion_tokens"] - 1  # EOS closes each answer
        records.append({"id": f"pair-{i:05d}", "image": rel, "prompt": prompt,
                        "chosen": harness.fit_text(tok, good, n, lead=" ").strip(),
                        "rejected": harness.fit_text(tok, bad, n, lead=" ").strip()})
    return harness.write_records(out_dir, "pairs.json", records)


def sequence_stats(model_dir: str, data_file: str) -> dict:
    """Token counts of the data under our tokenization (image tokens, prompt text, completions)."""
    ad, recs, loader = harness.records_for_stats(model_dir, data_file, "preference")
    p, c, r, img = [], [], [], []
    for rec in recs:
        ims = [loader.inputs(ref) for ref in rec.images]
        t = ad.tokenize_preference(rec, ims)
        img.append(sum(t.image_token_counts))
        p.append(len(t.prompt_ids) - img[-1])
        c.append(len(t.chosen_ids))
        r.append(len(t.rejected_ids))
    seq = [len_p + i + max(a, b) for len_p, i, a, b in zip(p, img, c, r)]
    return {"image_tokens": statistics.mean(img), "prompt_text_tokens": statistics.mean(p),
            "chosen_tokens": statistics.mean(c), "rejected_tokens": statistics.mean(r),
            "sequence_tokens": statistics.mean(seq)}


# ------------------------------------------------------------------------------------ our side
def run_ours(spec: Spec) -> dict:
    """vlmalign's ``train_dpo`` with encode-once, prefix sharing and precomputed reference
    log-probs; steps and the reference pass timed by an engine callback (:class:`OursClock`)."""
    vision = harness.setup_child(spec)
    base_mb = harness.rss_mb()
    from vlmalign.config import load_config
    from vlmalign.methods import dpo

    clock = harness.StepClock(spec, vision, "pair")
    watch = OursClock(spec, clock, vision)
    overrides = [
        f"model.path={spec.model_dir}", f"model.dtype={spec.dtype}",
        "model.train_vision=false", "model.train_projector=false", "model.train_language=true",
        f"lora.enabled={str(spec.lora).lower()}", f"lora.r={spec.lora_r}", f"lora.alpha={spec.lora_alpha}",
        f"data.train_file={spec.data_file}", "data.max_length=100000",
        f"optim.lr={spec.lr}", "optim.schedule=constant", "optim.warmup_steps=0", "optim.warmup_ratio=0",
        "optim.weight_decay=0", "optim.max_grad_norm=1.0",
        # each round's run replaces the last one's (the engine refuses a run directory it did not claim)
        f"train.output_dir={spec.work_dir}/run-ours", "train.overwrite=true", f"train.batch_size={spec.batch_size}",
        f"train.max_steps={spec.total_steps}", f"train.seed={spec.seed}", "train.progress=false",
        f"train.precision={spec.dtype}",
        f"dpo.beta={spec.beta}", f"dpo.precompute_ref_logps={str(spec.precompute_ref).lower()}",
        f"dpo.prefix_sharing={str(spec.prefix_sharing).lower()}",
        # a fresh cache per run: every run computes (and is timed computing) the reference pass
        f"dpo.ref_cache_dir={spec.work_dir}/ref-cache-{os.getpid()}",
    ]
    cfg = load_config(dpo.DPOConfig, None, overrides)
    result, adapter = dpo.train_dpo(cfg, callbacks=[watch])
    pre = watch.precompute
    pre_s = pre.get("seconds")
    pre_pairs = pre.get("pairs", 0)
    if spec.precompute_ref and pre_s is None:
        raise RuntimeError("dpo.precompute_ref_logps=true but no reference pass ran (loaded from a cache?)")
    counters = watch.counters
    timed_pairs = spec.steps * spec.batch_size
    return harness.side_result(
        clock, base_mb, watch.marks["first_step"] - watch.marks["start"], result.metrics.get("loss"), adapter.model,
        flop_breakdown_per_pair=_flop_breakdown(clock),
        adapter_encodes_per_pair=(counters["adapter_images_window_end"]
                                  - counters["adapter_images_window_start"]) / timed_pairs,
        precompute_s=pre_s,
        precompute_pairs=pre_pairs,
        precompute_encodes_per_pair=pre["images"] / pre_pairs if pre_pairs else 0.0,
        precompute_flops_per_pair=pre["flops"] / pre_pairs if pre_pairs else 0.0,
    )


def _flop_breakdown(clock: harness.StepClock) -> dict:
    """FLOPs per pair of the first step by aten op."""
    return {str(k): int(v) / clock.spec.batch_size for k, v in clock.flop_counts.get("Global", {}).items()}


class OursClock(harness.EngineClock):
    """The engine callback that times our side: each optimizer step (``step``: the first one under
    the FLOP counter, the adapters' image-encode counters at the timed window's ends) and the
    reference log-prob pass before training (``reference_precompute``: seconds, FLOPs,
    vision-tower images, pairs). ``setup_s`` (start to first step) includes that pass."""

    def __init__(self, spec: Spec, clock: harness.StepClock, vision: harness.VisionCounter):
        super().__init__(spec, clock)
        self.vision = vision
        self.counters: dict[str, int] = {}
        self.precompute: dict = {}

    def wrap(self, engine, name: str, **info):
        if name == "reference_precompute":
            return self._precompute(info["examples"])
        return super().wrap(engine, name, **info)

    @contextlib.contextmanager
    def _step(self, engine):
        clock, spec = self.clock, self.spec
        if len(clock.ends) == spec.warmup:
            self.counters["adapter_images_window_start"] = sum(a.encoded_images for a in engine.adapters)
        with super()._step(engine):
            yield
        if len(clock.ends) == spec.total_steps:
            self.counters["adapter_images_window_end"] = sum(a.encoded_images for a in engine.adapters)

    @contextlib.contextmanager
    def _precompute(self, pairs: int):
        images0 = self.vision.images
        t0 = time.perf_counter()
        with harness.flop_mode() as mode:  # the counter's overhead is below the run-to-run noise here
            yield
        self.precompute.update(seconds=time.perf_counter() - t0, flops=int(mode.get_total_flops()),
                               images=self.vision.images - images0, pairs=pairs)


# ------------------------------------------------------------------------------------ TRL side
def run_trl(spec: Spec) -> dict:
    """TRL 1.16 ``DPOTrainer`` on the same directory and records (its vision collator, live
    reference: a second copy of the model for full training, the adapter disabled for LoRA)."""
    vision = harness.setup_child(spec)
    base_mb = harness.rss_mb()
    import trl
    from trl import DPOConfig, DPOTrainer

    marks = {"start": time.perf_counter()}  # setup_s: load, data, trainer construction
    model, processor = harness.trl_model(spec)
    model.model.multi_modal_projector.requires_grad_(False)
    peft_config = None
    if spec.lora:
        from peft import LoraConfig

        from vlmalign.models import adapter_for
        targets = adapter_for(model, processor).lora_target_modules()
        peft_config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                 target_modules=targets, bias="none")
    dataset = harness.trl_dataset(spec, spec.pairs, lambda r: {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}]})

    clock = harness.StepClock(spec, vision, "pair")
    seen = {"tokens": [], "completion": []}

    def inspect(inputs):
        seen["tokens"].append(float(inputs["attention_mask"].sum(1).float().mean()))
        seen["completion"].append(float(inputs["completion_mask"].sum(1).float().mean()))

    args = DPOConfig(**harness.trl_args(spec, beta=spec.beta, precompute_ref_log_probs=False))
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config, callbacks=[harness.trl_step_callback(clock)])
    harness.time_trl_steps(trainer, clock, marks, inspect)
    result = trainer.train()
    return harness.side_result(
        clock, base_mb, marks["first_step"] - marks["start"], result.training_loss, trainer.model,
        flop_breakdown_per_pair=_flop_breakdown(clock),
        precompute_s=None, precompute_pairs=0, precompute_encodes_per_pair=0.0, precompute_flops_per_pair=0.0,
        trl_version=trl.__version__, trl_mean_row_tokens=statistics.mean(seen["tokens"]),
        trl_mean_completion_tokens=statistics.mean(seen["completion"]),
    )


# ------------------------------------------------------------------------------------ report
def _aggregate(runs: list[dict]) -> dict:
    """Median throughput over rounds, max memory; per-pair counts from the rounds (equal)."""
    agg = harness.aggregate(runs, "pair")
    agg["flop_breakdown_per_pair"] = runs[0]["flop_breakdown_per_pair"]
    pre = [r["precompute_s"] for r in runs if r.get("precompute_s")]
    if pre:
        pairs = runs[0]["precompute_pairs"]
        agg["precompute_pairs_per_s"] = pairs / statistics.median(pre)
        agg["precompute_encodes_per_pair"] = runs[0]["precompute_encodes_per_pair"]
        agg["precompute_flops_per_pair"] = runs[0]["precompute_flops_per_pair"]
        # one epoch = the precompute pass over every pair + one training step per batch
        agg["epoch_pairs_per_s"] = 1.0 / (1.0 / agg["pairs_per_s"] + 1.0 / agg["precompute_pairs_per_s"])
        agg["epoch_encodes_per_pair"] = agg["vision_encodes_per_pair"] + agg["precompute_encodes_per_pair"]
        agg["epoch_flops_per_pair"] = agg["flops_per_pair"] + agg["precompute_flops_per_pair"]
    else:
        agg["epoch_pairs_per_s"] = agg["pairs_per_s"]
        agg["epoch_encodes_per_pair"] = agg["vision_encodes_per_pair"]
        agg["epoch_flops_per_pair"] = agg["flops_per_pair"]
    for k in ("adapter_encodes_per_pair", "trl_mean_row_tokens", "trl_mean_completion_tokens", "trl_version"):
        if k in runs[0]:
            agg[k] = runs[0][k] if isinstance(runs[0][k], str) else max(r[k] for r in runs)
    return agg


def _table(report: dict) -> str:
    o, t, m = report["ours"], report["trl"], report["setup"]
    pre = "precomputed once per epoch" if m["precompute_ref"] else "live, every step"

    def row(name, a, b, fmt="{:.3f}", ratio=None):
        ra = "" if ratio is None else ratio
        sa = "-" if a is None else fmt.format(a)
        sb = "-" if b is None else fmt.format(b)
        return f"{name:<44s}{sa:>12s}{sb:>12s}{ra:>10s}"

    lines = [
        f"DPO throughput: vlmalign vs TRL {t.get('trl_version', '?')} DPOTrainer  "
        f"(preset {m['preset']}, {m['dtype']} on {m['device']}, {m['threads']} threads)",
        harness.model_line(m),
        f"tokens  image {m['seq']['image_tokens']:.0f} + prompt text {m['seq']['prompt_text_tokens']:.0f} + "
        f"completion {m['seq']['chosen_tokens']:.0f}/{m['seq']['rejected_tokens']:.0f} (chosen/rejected) = "
        f"{m['seq']['sequence_tokens']:.0f} per row; TRL rows: {t.get('trl_mean_row_tokens', 0):.0f} tokens",
        f"train   {m['trained']}; AdamW lr {m['lr']}, constant, clip 1.0; beta {m['beta']}; "
        f"{m['batch_size']} pairs/step",
        f"runs    {m['rounds']} interleaved rounds per side (own process each), {m['warmup']} warm-up + "
        f"{m['steps']} timed steps; medians over rounds",
        f"ours    encode once per pair, prefix sharing {'on' if m['prefix_sharing'] else 'off'}, "
        f"reference log-probs {pre}",
        "",
        f"{'':<44s}{'ours':>12s}{'trl':>12s}{'ratio':>10s}",
        row("pairs/s, training steps", o["pairs_per_s"], t["pairs_per_s"],
            ratio=f"{report['speedup']:.2f}x"),
        row("pairs/s, one epoch incl. ref precompute", o["epoch_pairs_per_s"], t["epoch_pairs_per_s"],
            ratio=f"{report['speedup_epoch']:.2f}x"),
        row("CPU s/pair, training steps (all threads)", o["cpu_s_per_pair"], t["cpu_s_per_pair"], "{:.2f}",
            ratio=f"{t['cpu_s_per_pair'] / o['cpu_s_per_pair']:.2f}x"),
        row("vision encodes/pair, training step", o["vision_encodes_per_pair"], t["vision_encodes_per_pair"],
            "{:.2f}"),
        row("vision encodes/pair, ref precompute", o.get("precompute_encodes_per_pair"), None, "{:.2f}"),
        row("GFLOPs/pair, training step", o["flops_per_pair"] / 1e9, t["flops_per_pair"] / 1e9, "{:.2f}",
            ratio=f"{report['flops_ratio']:.2f}x"),
        *[row(f"  of which {part}", o["flops_by_part_per_pair"].get(part, 0) / 1e9,
              t["flops_by_part_per_pair"].get(part, 0) / 1e9, "{:.2f}") for part in (*harness.PARTS, "other")],
        row("GFLOPs/pair, ref precompute", (o.get("precompute_flops_per_pair") or 0) / 1e9 or None, None, "{:.2f}"),
        row("peak RSS MB (whole process)", o["peak_mem_mb"], t["peak_mem_mb"], "{:.0f}",
            ratio=f"{o['peak_mem_mb'] / t['peak_mem_mb']:.2f}x"),
        row("RSS MB after imports", o["base_mem_mb"], t["base_mem_mb"], "{:.0f}"),
        row("trainable parameters (M)", o["trainable_params"] / 1e6, t["trainable_params"] / 1e6, "{:.2f}"),
        row("setup s (load, data, ref precompute)", o["setup_s"], t["setup_s"], "{:.1f}"),
    ]
    if "peak_gpu_mem_mb" in o:
        lines.append(row("peak GPU MB", o["peak_gpu_mem_mb"], t["peak_gpu_mem_mb"], "{:.0f}"))
    if "mfu" in o:
        lines.append(row("MFU, training steps", o["mfu"], t["mfu"], "{:.3f}"))
    lines.append("")
    lines.append("pairs/s per round  ours: " + ", ".join(f"{x:.3f}" for x in o["rounds_pairs_per_s"])
                 + "   trl: " + ", ".join(f"{x:.3f}" for x in t["rounds_pairs_per_s"]))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dpo_throughput.py",
        description="Train DPO with vlmalign and with TRL's DPOTrainer on the same random-init "
                    "LLaVA-architecture model and the same ShapesWorld preference pairs; print a table "
                    "of pairs/s, vision encodes/pair, FLOPs/pair (torch FlopCounterMode) and peak "
                    "memory (each side in its own process), and write it as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="model and sequence shapes (llava-1.5-7b: the real model's shapes, for a GPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides train")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="weights and compute dtype on both sides")
    p.add_argument("--lora", action="store_true",
                   help="train LoRA adapters on the language model's Linear layers on both sides "
                        "(off: the full language model)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (unset: the preset's)")
    harness.add_step_options(p, steps=6, rounds=3, lr=1e-6, who="both sides")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta on both sides")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (0: torch's default; unset: 1 on CPU, 0 on CUDA). One on "
                        "CPU because on a shared 2-core "
                        "machine two-thread ops stall whenever a thread is descheduled (measured 4-11x "
                        "slower per pair under load), which buries the work each side does")
    p.add_argument("--no-prefix-sharing", action="store_true", help="ours: one full row per completion")
    p.add_argument("--live-ref", action="store_true", help="ours: live reference instead of precomputed")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="accelerator peak TFLOP/s for the dtype; adds MFU = FLOPs/pair x pairs/s / peak")
    harness.add_run_options(p, SIDES)
    return harness.parse(p, argv)


def _run(side: str, spec: Spec) -> dict:
    return (run_ours if side == "ours" else run_trl)(spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        return harness.child(Spec, _run, args._child, args._spec, args._out)
    sides = harness.chosen_sides(args.sides, SIDES)
    arch = dict(PRESETS[args.preset])
    batch = args.batch_size or arch["pairs_per_step"]
    with harness.work_dir(args.work_dir, "dpo-bench-") as work:
        spec = Spec(preset=args.preset, device=args.device, dtype=args.dtype, lora=args.lora, batch_size=batch,
                    warmup=args.warmup, steps=args.steps, lr=args.lr, beta=args.beta, threads=harness.threads(args),
                    prefix_sharing=not args.no_prefix_sharing, precompute_ref=not args.live_ref, arch=arch,
                    work_dir=str(work))
        if not args.quiet:
            print(f"building model and {spec.pairs} pairs in {work}", flush=True)
        model_dir = harness.build_model(arch, work / "model", dtype=args.dtype)
        data_file = build_data(arch, model_dir, work / "data", spec.pairs)
        spec.model_dir, spec.data_file = str(model_dir), str(data_file)
        seq = sequence_stats(str(model_dir), str(data_file))

        runs = harness.run_rounds(__file__, sides, spec, work, args.rounds, args.quiet,
                                  {s: f"{s:4s}" for s in sides}, "pair")
        report: dict = {s: _aggregate(runs[s]) for s in sides}
        report["setup"] = harness.setup_report(
            args, spec, seq, beta=args.beta, prefix_sharing=spec.prefix_sharing, precompute_ref=spec.precompute_ref,
            trained=("LoRA adapters on the language model" if args.lora else "full language model + output head")
            + "; vision tower and projector frozen",
            timing="pairs_per_s: wall time of the timed training steps only; epoch_pairs_per_s adds our "
                   "reference precompute pass amortised over one epoch (the run's pairs)")
        if args.peak_tflops:
            for s in sides:
                report[s]["mfu"] = report[s]["flops_per_pair"] * report[s]["pairs_per_s"] / (args.peak_tflops * 1e12)
        if "ours" in report and "trl" in report:
            o, t = report["ours"], report["trl"]
            report["speedup"] = o["pairs_per_s"] / t["pairs_per_s"]
            report["speedup_epoch"] = o["epoch_pairs_per_s"] / t["epoch_pairs_per_s"]
            report["flops_ratio"] = t["flops_per_pair"] / o["flops_per_pair"] if o["flops_per_pair"] else None
            report["flops_ratio_epoch"] = (t["epoch_flops_per_pair"] / o["epoch_flops_per_pair"]
                                           if o["epoch_flops_per_pair"] else None)
            print(_table(report))
        else:
            print(json.dumps(report, indent=1))
        harness.write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
