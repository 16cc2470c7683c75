"""SFT training throughput: vlmalign's SFT, unpacked and packed, against TRL 1.16's ``SFTTrainer``.

Same LLaVA-architecture model (random init, saved once and loaded by every side; the DPO
benchmark's model of the preset, built by ``_harness.py``), same records, same batch size
(samples per optimizer step), same optimizer (AdamW, same learning rate, constant schedule, no
weight decay, clipping 1.0), same trainable parameters (projector + language model + output
head; vision tower frozen), fp32 on CPU by default. Three sides, each in its own process, in one run:

* ``ours``: ``train_sft`` with ``data.packing=false``: right-padded rows, one per sample;
* ``packed``: ``train_sft`` with ``data.packing=true``: each micro-batch's samples packed into
  rows of at most ``--pack-length`` tokens, whole, attention kept inside each sample;
* ``trl``: ``SFTTrainer`` with prompt-completion records (completion-only loss, the labels of
  ours: tests/integration/test_sft_parity_trl.py), its own vision collator, right-padded rows.
  TRL 1.16 refuses ``packing=True`` and ``padding_free=True`` for vision datasets; the TRL
  process tries both and records the refusal (``trl_packing``), so the table says so.

The records are ShapesWorld scenes with answers of very different lengths (a mix of one-word
answers and long descriptions, as in LLaVA-style instruction data), which is where padding
costs and packing helps. Rounds alternate the side order. In each process: load the model and
data the way that trainer does, train ``warmup + steps`` optimizer steps (the first under
``torch.utils.flop_counter.FlopCounterMode``), time the steps after the warm-up (data,
collation, forward, backward, optimizer: everything the trainer does per step); peak memory is
``getrusage(RUSAGE_SELF).ru_maxrss`` at exit. Token slots per sample (rows x row length /
samples) and real tokens per sample show the padding each side computes.

    .venv/bin/python benchmarks/sft_throughput.py --json sft.json     # CPU, ~3 min on 2 shared cores
    .venv/bin/python benchmarks/sft_throughput.py --preset smoke --rounds 1 --warmup 1 --steps 1

See docs/BENCHMARKS.md for the measured numbers and how to read them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as harness  # noqa: E402  (model, measuring, TRL setup and process harness shared with dpo_throughput.py)

SIDES = ("ours", "packed", "trl")
LABELS = {"ours": "ours", "packed": "ours packed", "trl": "trl"}

# Sequence shapes per preset (the model of _harness.PRESETS[preset]): prompt text tokens and
# answer tokens drawn uniformly from these ranges; a share ``long_share`` of the answers is long
# (descriptions), the rest short (VQA words). ``max_length``: data.max_length of our sides (>= every
# sample); ``pack_length``: the packed side's default budget, data.pack_length's own default (the
# max_length). On the CPU a longer row costs more attention per token (the block-diagonal mask is
# applied to a dense L x L product): with the cpu preset 1024-token rows did about the same FLOPs
# per sample as 512-token ones (less padding, more attention; docs/BENCHMARKS.md).
SHAPES: dict[str, dict] = {
    "smoke": dict(prompt=(3, 6), short=(1, 2), long=(6, 12), long_share=0.5, batch_size=4,
                  max_length=64, pack_length=64),
    "cpu": dict(prompt=(8, 40), short=(1, 6), long=(40, 160), long_share=0.5, batch_size=8,
                max_length=512, pack_length=512),
    "llava-1.5-7b": dict(prompt=(16, 96), short=(1, 8), long=(100, 500), long_share=0.5, batch_size=16,
                         max_length=2048, pack_length=2048),
}


@dataclass
class Spec(harness.Spec):
    """Everything the sides must agree on (written to spec.json for the child processes)."""

    batch_size: int = 8
    steps: int = 5
    lr: float = 2e-5
    max_length: int = 512
    pack_length: int = 1024

    @property
    def samples(self) -> int:
        return self.total_steps * self.batch_size


# ------------------------------------------------------------------------------------ data
_QUESTIONS = ("What colour is the shape in the top left part of the picture? Answer with one word. ",
              "Describe everything you can see in the image, one object after another. ")


def build_data(arch: dict, shapes: dict, model_dir: Path, out_dir: Path, n: int, seed: int = 0) -> Path:
    """ShapesWorld scenes as LLaVA-JSON records (``<image>\\n`` + question, one answer) whose
    prompt and answer token counts are drawn from the preset's ranges."""
    import numpy as np
    from transformers import AutoTokenizer

    from vlmalign.data.synthetic import ShapesConfig, caption, render, sample_scene

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    size = max(16, arch["image_size"])
    cfg = ShapesConfig(seed=seed, image_size=size, grid=2, max_objects=3, train_images=n, eval_images=1)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        scene = sample_scene(rng, cfg)
        rel = f"images/{i:05d}.png"
        render(scene).save(out_dir / rel)
        long = bool(rng.random() < shapes["long_share"])
        lo, hi = shapes["long" if long else "short"]
        n_answer = int(rng.integers(lo, hi + 1))
        n_prompt = int(rng.integers(shapes["prompt"][0], shapes["prompt"][1] + 1))
        question = harness.fit_text(tok, _QUESTIONS[long], n_prompt).strip()
        answer = harness.fit_text(tok, caption(scene), n_answer, lead=" ").strip() or "red"
        records.append({"id": f"sft-{i:05d}", "image": rel,
                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                          {"from": "gpt", "value": answer}]})
    return harness.write_records(out_dir, "sft.json", records)


def sequence_stats(model_dir: str, data_file: str) -> dict:
    """Token counts of the records under our tokenization."""
    from vlmalign.models import IGNORE_INDEX

    ad, recs, loader = harness.records_for_stats(model_dir, data_file, "conversation")
    lengths, answers, images = [], [], []
    for rec in recs:
        ims = [loader.inputs(ref) for ref in rec.images]
        t = ad.tokenize_record(rec, ims)
        lengths.append(len(t.input_ids))
        answers.append(sum(1 for x in t.labels if x != IGNORE_INDEX))
        images.append(sum(t.image_token_counts))
    return {"sample_tokens_mean": statistics.mean(lengths), "sample_tokens_min": min(lengths),
            "sample_tokens_max": max(lengths), "supervised_tokens_mean": statistics.mean(answers),
            "image_tokens": statistics.mean(images)}


# ------------------------------------------------------------------------------------ measuring
class StepClock(harness.StepClock):
    """The shared step clock plus token slots, real tokens and rows of every micro-batch."""

    def __init__(self, spec: Spec, vision: harness.VisionCounter):
        super().__init__(spec, vision, "sample")
        self.slots: list[int] = []     # per micro-batch: rows x row length
        self.tokens: list[int] = []    # per micro-batch: real tokens
        self.rows: list[int] = []

    def record_batch(self, input_ids, attention_mask) -> None:
        self.slots.append(int(input_ids.numel()))
        self.tokens.append(int(attention_mask.sum()))
        self.rows.append(int(input_ids.shape[0]))

    def summary(self) -> dict:
        s = self.spec
        total = s.total_steps * s.batch_size
        return {**super().summary(),
                "token_slots_per_sample": sum(self.slots) / total,
                "real_tokens_per_sample": sum(self.tokens) / total,
                "rows_per_step": sum(self.rows) / s.total_steps}


# ------------------------------------------------------------------------------------ our sides
def run_ours(spec: Spec, packing: bool) -> dict:
    """vlmalign's ``train_sft``, with or without ``data.packing``."""
    vision = harness.setup_child(spec)
    base_mb = harness.rss_mb()
    from vlmalign.config import load_config
    from vlmalign.data import batching
    from vlmalign.methods import sft

    clock = StepClock(spec, vision)
    watch = harness.EngineClock(spec, clock)
    collate = batching.SFTCollator.__call__

    def counted(self, examples):  # token slots and rows of every micro-batch the engine builds
        batch = collate(self, examples)
        clock.record_batch(batch.tensors["input_ids"], batch.tensors["attention_mask"])
        return batch

    batching.SFTCollator.__call__ = counted
    name = "packed" if packing else "ours"
    overrides = [
        f"model.path={spec.model_dir}", f"model.dtype={spec.dtype}",
        "model.train_vision=false", "model.train_projector=true", "model.train_language=true",
        f"data.train_file={spec.data_file}", f"data.max_length={spec.max_length}",
        f"data.packing={str(packing).lower()}", f"data.pack_length={spec.pack_length}",
        f"optim.lr={spec.lr}", "optim.schedule=constant", "optim.warmup_steps=0", "optim.warmup_ratio=0",
        "optim.weight_decay=0", "optim.max_grad_norm=1.0",
        f"train.output_dir={spec.work_dir}/run-{name}", "train.overwrite=true", f"train.batch_size={spec.batch_size}",
        f"train.max_steps={spec.total_steps}", f"train.seed={spec.seed}", "train.progress=false",
        f"train.precision={spec.dtype}",
    ]
    cfg = load_config(sft.SFTConfig, None, overrides)
    result, adapter = sft.train_sft(cfg, callbacks=[watch])
    return harness.side_result(clock, base_mb, watch.marks["first_step"] - watch.marks["start"],
                               result.metrics.get("loss"), adapter.model)


# ------------------------------------------------------------------------------------ TRL side
def _trl_refuses_packing(model, processor, dataset, args_kw: dict) -> dict:
    """What TRL says to ``packing=True`` and to ``padding_free=True`` on this vision dataset."""
    from trl import SFTConfig, SFTTrainer

    out = {}
    for key in ("packing", "padding_free"):
        try:
            SFTTrainer(model=model, args=SFTConfig(**args_kw, **{key: True}), train_dataset=dataset,
                       processing_class=processor)
        except (ValueError, NotImplementedError) as e:
            out[key] = f"refused: {e}"
        else:
            out[key] = "accepted"
    return out


def run_trl(spec: Spec) -> dict:
    """TRL 1.16 ``SFTTrainer`` on the same directory and records (prompt-completion format,
    completion-only loss, its vision collator)."""
    vision = harness.setup_child(spec)
    base_mb = harness.rss_mb()
    import trl
    from trl import SFTConfig, SFTTrainer

    marks = {"start": time.perf_counter()}
    model, processor = harness.trl_model(spec)
    dataset = harness.trl_dataset(spec, spec.samples, lambda r: {
        "prompt": [{"role": "user", "content": r["conversations"][0]["value"].replace("<image>\n", "")}],
        "completion": [{"role": "assistant", "content": r["conversations"][1]["value"]}]})
    clock = StepClock(spec, vision)
    args_kw = harness.trl_args(spec, activation_checkpointing=False)
    refusals = _trl_refuses_packing(model, processor, dataset, args_kw)
    trainer = SFTTrainer(model=model, args=SFTConfig(**args_kw), train_dataset=dataset, processing_class=processor,
                         callbacks=[harness.trl_step_callback(clock)])
    harness.time_trl_steps(trainer, clock, marks,
                           lambda inputs: clock.record_batch(inputs["input_ids"], inputs["attention_mask"]))
    result = trainer.train()
    return harness.side_result(clock, base_mb, marks["first_step"] - marks["start"], result.training_loss,
                               trainer.model, trl_version=trl.__version__, trl_packing=refusals)


# ------------------------------------------------------------------------------------ report
def _aggregate(runs: list[dict]) -> dict:
    """Median throughput over rounds, max memory; per-sample counts from the rounds."""
    agg = harness.aggregate(runs, "sample", medians=("token_slots_per_sample", "real_tokens_per_sample",
                                                     "rows_per_step"))
    for k in ("trl_version", "trl_packing"):
        if k in runs[0]:
            agg[k] = runs[0][k]
    return agg


def ratios(report: dict) -> dict:
    """samples/s and peak memory of each pair of sides present (a / b)."""
    out = {}
    for a, b in (("ours", "trl"), ("packed", "trl"), ("packed", "ours")):
        if a in report and b in report:
            out[f"{a}_vs_{b}"] = {"samples_per_s": report[a]["samples_per_s"] / report[b]["samples_per_s"],
                                  "peak_mem": report[a]["peak_mem_mb"] / report[b]["peak_mem_mb"],
                                  "flops_per_sample": (report[a]["flops_per_sample"] / report[b]["flops_per_sample"]
                                                       if report[b]["flops_per_sample"] else None)}
    return out


def _table(report: dict, sides: list[str]) -> str:
    m = report["setup"]
    seq = m["seq"]
    cols = [s for s in SIDES if s in sides]

    def row(name, key, fmt="{:.3f}", scale=1.0):
        vals = [report[s].get(key) for s in cols]
        cells = ["-" if v is None else fmt.format(v * scale) for v in vals]
        return f"{name:<40s}" + "".join(f"{c:>13s}" for c in cells)

    trl = report.get("trl", {})
    lines = [
        f"SFT throughput: vlmalign {' and '.join(LABELS[s] for s in cols if s != 'trl')}"
        + (f" vs TRL {trl.get('trl_version', '?')} SFTTrainer" if trl else "")
        + f"  (preset {m['preset']}, {m['dtype']} on {m['device']}, {m['threads']} threads)",
        harness.model_line(m),
        f"tokens  per sample {seq['sample_tokens_mean']:.0f} on average ({seq['sample_tokens_min']}-"
        f"{seq['sample_tokens_max']}): image {seq['image_tokens']:.0f}, supervised "
        f"{seq['supervised_tokens_mean']:.0f}",
        f"train   projector + language model + head (vision frozen); AdamW lr {m['lr']}, constant, clip 1.0; "
        f"{m['batch_size']} samples/step; packed: rows of at most {m['pack_length']} tokens",
        f"runs    {m['rounds']} interleaved rounds per side (own process each), {m['warmup']} warm-up + "
        f"{m['steps']} timed steps; medians over rounds; load average {m['load_avg'][0]:.1f} at the end",
        "",
        f"{'':<40s}" + "".join(f"{LABELS[s]:>13s}" for s in cols),
        row("samples/s, training steps", "samples_per_s"),
        row("CPU s/sample (all threads)", "cpu_s_per_sample", "{:.3f}"),
        row("token slots/sample (rows x length)", "token_slots_per_sample", "{:.0f}"),
        row("real tokens/sample", "real_tokens_per_sample", "{:.0f}"),
        row("rows per step", "rows_per_step", "{:.1f}"),
        row("GFLOPs/sample, first step", "flops_per_sample", "{:.2f}", 1e-9),
        row("vision encodes/sample", "vision_encodes_per_sample", "{:.2f}"),
        row("peak RSS MB (whole process)", "peak_mem_mb", "{:.0f}"),
        row("RSS MB after imports", "base_mem_mb", "{:.0f}"),
        row("trainable parameters (M)", "trainable_params", "{:.2f}", 1e-6),
        row("setup s (load, data)", "setup_s", "{:.1f}"),
        "",
    ]
    for key, r in report["ratios"].items():
        a, b = key.split("_vs_")
        fl = "" if r["flops_per_sample"] is None else f", FLOPs/sample {r['flops_per_sample']:.2f}x"
        lines.append(f"{LABELS[a]} / {LABELS[b]}: samples/s {r['samples_per_s']:.2f}x, "
                     f"peak memory {r['peak_mem']:.2f}x{fl}")
    lines.append("samples/s per round  " + "   ".join(
        f"{LABELS[s]}: " + ", ".join(f"{x:.3f}" for x in report[s]["rounds_samples_per_s"]) for s in cols))
    if "trl_packing" in trl:
        for k, v in trl["trl_packing"].items():
            lines.append(f"TRL {k}=True on this vision dataset: {v.splitlines()[0][:160]}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sft_throughput.py",
        description="Train SFT with vlmalign (data.packing off and on) and with TRL's SFTTrainer on the same "
                    "random-init LLaVA-architecture model and the same ShapesWorld records of mixed lengths; "
                    "print samples/s, token slots per sample, FLOPs per sample and peak memory (each side in "
                    "its own process) with the ratios, and write it as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="cpu",
                   help="model and sequence shapes (llava-1.5-7b: the real model's shapes, for a GPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every side trains")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="weights and compute dtype on every side")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (unset: the preset's)")
    p.add_argument("--pack-length", type=int, default=None,
                   help="the packed side's data.pack_length (unset: the preset's)")
    harness.add_step_options(p, steps=5, rounds=2, lr=2e-5, who="every side")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (0: torch's default; unset: 1 on CPU, 0 on CUDA; see "
                        "dpo_throughput.py --help for why one on a shared CPU)")
    harness.add_run_options(p, SIDES)
    return harness.parse(p, argv)


def _run(side: str, spec: Spec) -> dict:
    return run_trl(spec) if side == "trl" else run_ours(spec, packing=side == "packed")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        return harness.child(Spec, _run, args._child, args._spec, args._out)
    sides = harness.chosen_sides(args.sides, SIDES)
    arch = dict(harness.PRESETS[args.preset])
    shapes = SHAPES[args.preset]
    with harness.work_dir(args.work_dir, "sft-bench-") as work:
        spec = Spec(preset=args.preset, device=args.device, dtype=args.dtype,
                    batch_size=args.batch_size or shapes["batch_size"], warmup=args.warmup, steps=args.steps,
                    lr=args.lr, threads=harness.threads(args), max_length=shapes["max_length"],
                    pack_length=args.pack_length or shapes["pack_length"], arch=arch, work_dir=str(work))
        if spec.pack_length < spec.max_length:
            raise SystemExit(f"--pack-length must be at least the preset's data.max_length ({spec.max_length})")
        if not args.quiet:
            print(f"building model and {spec.samples} samples in {work}", flush=True)
        model_dir = harness.build_model(arch, work / "model", dtype=args.dtype)
        data_file = build_data(arch, shapes, model_dir, work / "data", spec.samples)
        spec.model_dir, spec.data_file = str(model_dir), str(data_file)
        seq = sequence_stats(str(model_dir), str(data_file))
        if seq["sample_tokens_max"] > spec.max_length:
            raise SystemExit(f"a sample has {seq['sample_tokens_max']} tokens, over data.max_length "
                             f"{spec.max_length}")

        runs = harness.run_rounds(__file__, sides, spec, work, args.rounds, args.quiet,
                                  {s: f"{LABELS[s]:11s}" for s in sides}, "sample")
        report: dict = {s: _aggregate(runs[s]) for s in sides}
        report["setup"] = harness.setup_report(
            args, spec, seq, shapes=shapes, max_length=spec.max_length, pack_length=spec.pack_length,
            timing="samples_per_s: timed samples over the wall time of the timed training steps")
        report["ratios"] = ratios(report)
        print(_table(report, sides))
        harness.write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
