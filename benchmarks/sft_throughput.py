"""SFT training throughput: vlmalign's SFT, unpacked and packed, against TRL 1.16's ``SFTTrainer``.

Same LLaVA-architecture model (random init, saved once and loaded by every side; the model of
``dpo_throughput.py``'s preset), same records, same batch size (samples per optimizer step),
same optimizer (AdamW, same learning rate, constant schedule, no weight decay, clipping 1.0),
same trainable parameters (projector + language model + output head; vision tower frozen),
fp32 on CPU by default. Three sides, each in its own process, in one run:

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
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_throughput as common  # noqa: E402  (model builder and measuring helpers shared with the DPO benchmark)

SIDES = ("ours", "packed", "trl")
LABELS = {"ours": "ours", "packed": "ours packed", "trl": "trl"}

# Sequence shapes per preset (the model of dpo_throughput.PRESETS[preset]): prompt text tokens and
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
class Spec:
    """Everything the sides must agree on (written to spec.json for the child processes)."""

    preset: str = "cpu"
    model_dir: str = ""
    data_file: str = ""
    work_dir: str = ""
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int = 8
    warmup: int = 2
    steps: int = 5
    lr: float = 2e-5
    seed: int = 0
    threads: int = 1
    max_length: int = 512
    pack_length: int = 1024
    arch: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

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
        question = common._fit(tok, _QUESTIONS[long], n_prompt).strip()
        answer = common._fit(tok, caption(scene), n_answer, lead=" ").strip() or "red"
        records.append({"id": f"sft-{i:05d}", "image": rel,
                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                          {"from": "gpt", "value": answer}]})
    path = out_dir / "sft.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def sequence_stats(model_dir: str, data_file: str) -> dict:
    """Token counts of the records under our tokenization."""
    from vlmalign.config.sections import DataSection
    from vlmalign.data.batching import ImageLoader
    from vlmalign.data.loading import read_records
    from vlmalign.models import IGNORE_INDEX, load_adapter

    ad = load_adapter(model_dir)
    recs, _ = read_records(data_file, DataSection(), kind="conversation")
    loader = ImageLoader(ad, os.path.dirname(data_file))
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
class StepClock:
    """End-of-step timestamps, CPU time, FLOPs of the first step, vision images and token slots
    per step."""

    def __init__(self, spec: Spec, vision):
        self.spec, self.vision = spec, vision
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.flops: int | None = None
        self.flop_parts: dict = {}
        self.images_at: dict[int, int] = {}
        self.slots: list[int] = []     # per micro-batch: rows x row length
        self.tokens: list[int] = []    # per micro-batch: real tokens
        self.rows: list[int] = []

    def record_batch(self, input_ids, attention_mask) -> None:
        self.slots.append(int(input_ids.numel()))
        self.tokens.append(int(attention_mask.sum()))
        self.rows.append(int(input_ids.shape[0]))

    def record_flops(self, mode) -> None:
        self.flops = int(mode.get_total_flops())
        self.flop_parts = common.flops_by_part(mode.get_flop_counts(), self.flops)

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.images_at[len(self.ends)] = self.vision.images

    def summary(self) -> dict:
        s = self.spec
        w, n = s.warmup, s.steps
        window = self.ends[w + n - 1] - self.ends[w - 1]
        samples = n * s.batch_size
        total = s.total_steps * s.batch_size
        return {"samples_per_s": samples / window, "timed_s": window, "timed_samples": samples,
                "cpu_s_per_sample": (self.cpu[w + n - 1] - self.cpu[w - 1]) / samples,
                "step_s": [b - a for a, b in zip(self.ends[w - 1:], self.ends[w:])],
                "vision_encodes_per_sample": (self.images_at[w + n] - self.images_at[w]) / samples,
                "flops_per_sample": (self.flops or 0) / s.batch_size,
                "flops_by_part_per_sample": {k: v / s.batch_size for k, v in self.flop_parts.items()},
                "token_slots_per_sample": sum(self.slots) / total,
                "real_tokens_per_sample": sum(self.tokens) / total,
                "rows_per_step": sum(self.rows) / s.total_steps}


def _setup_child(spec: Spec):
    import torch
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    common._register_cpu_attention_flops()
    from transformers.models.clip.modeling_clip import CLIPVisionModel
    return common.VisionCounter(CLIPVisionModel)


# ------------------------------------------------------------------------------------ our sides
class OursClock:
    """The engine callback that times our side's optimizer steps (the first under the FLOP
    counter)."""

    def __init__(self, spec: Spec, clock: StepClock):
        self.spec, self.clock = spec, clock
        self.marks: dict[str, float] = {"start": time.perf_counter()}

    def wrap(self, engine, name: str, **info):
        if name != "step":
            return contextlib.nullcontext()
        return self._step()

    @contextlib.contextmanager
    def _step(self):
        clock = self.clock
        if not clock.ends:
            self.marks["first_step"] = time.perf_counter()
            with common._flop_mode() as mode:
                yield
            clock.record_flops(mode)
        else:
            yield
        clock.step_done()


def run_ours(spec: Spec, packing: bool) -> dict:
    """vlmalign's ``train_sft``, with or without ``data.packing``."""
    vision = _setup_child(spec)
    base_mb = common._rss_mb()
    from vlmalign.config import load_config
    from vlmalign.data import batching
    from vlmalign.methods import sft

    clock = StepClock(spec, vision)
    watch = OursClock(spec, clock)
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
    out = clock.summary()
    out.update({"peak_mem_mb": common._peak_mb(), "base_mem_mb": base_mb,
                "setup_s": watch.marks["first_step"] - watch.marks["start"],
                "final_loss": result.metrics.get("loss"), "trainable_params": common._trainable(adapter.model)})
    return out


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
    vision = _setup_child(spec)
    base_mb = common._rss_mb()
    import torch
    import trl
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    marks = {"start": time.perf_counter()}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.dtype]
    model = LlavaForConditionalGeneration.from_pretrained(spec.model_dir, dtype=dtype)
    processor = AutoProcessor.from_pretrained(spec.model_dir)
    model.model.vision_tower.requires_grad_(False)

    root = Path(spec.data_file).parent
    rows = {"images": [], "prompt": [], "completion": []}
    for r in json.loads(Path(spec.data_file).read_text())[: spec.samples]:
        with Image.open(root / r["image"]) as im:
            rows["images"].append([im.convert("RGB")])
        question = r["conversations"][0]["value"].replace("<image>\n", "")
        rows["prompt"].append([{"role": "user", "content": question}])
        rows["completion"].append([{"role": "assistant", "content": r["conversations"][1]["value"]}])
    dataset = Dataset.from_dict(rows)
    clock = StepClock(spec, vision)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_done()

    args_kw = dict(
        output_dir=f"{spec.work_dir}/run-trl", per_device_train_batch_size=spec.batch_size,
        max_steps=spec.total_steps, learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, seed=spec.seed, report_to="none", save_strategy="no",
        logging_steps=1, use_cpu=spec.device == "cpu", bf16=spec.dtype == "bf16", fp16=spec.dtype == "fp16",
        dataloader_num_workers=0, max_length=None, disable_tqdm=True, activation_checkpointing=False,
    )
    refusals = _trl_refuses_packing(model, processor, dataset, args_kw)
    trainer = SFTTrainer(model=model, args=SFTConfig(**args_kw), train_dataset=dataset, processing_class=processor,
                         callbacks=[Clock()])
    original = trainer.training_step

    def training_step(model_, inputs, *a, **kw):
        clock.record_batch(inputs["input_ids"], inputs["attention_mask"])
        if not clock.ends and "first_step" not in marks:
            marks["first_step"] = time.perf_counter()
            with common._flop_mode() as mode:
                out = original(model_, inputs, *a, **kw)
            clock.record_flops(mode)
            return out
        return original(model_, inputs, *a, **kw)

    trainer.training_step = training_step
    result = trainer.train()
    out = clock.summary()
    out.update({"peak_mem_mb": common._peak_mb(), "base_mem_mb": base_mb,
                "setup_s": marks["first_step"] - marks["start"], "final_loss": result.training_loss,
                "trainable_params": common._trainable(trainer.model), "trl_version": trl.__version__,
                "trl_packing": refusals})
    return out


# ------------------------------------------------------------------------------------ harness
def _child(side: str, spec_path: str, out_path: str) -> int:
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    res = run_trl(spec) if side == "trl" else run_ours(spec, packing=side == "packed")
    if spec.device == "cuda":
        import torch
        res["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(out_path).write_text(json.dumps(res, indent=1))
    return 0


def _run_side(side: str, spec_path: Path, work: Path, round_i: int, quiet: bool) -> dict:
    out = work / f"result-{side}-{round_i}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", side, "--_spec", str(spec_path),
           "--_out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} run {round_i} failed (exit {proc.returncode}); output above")
    res = json.loads(out.read_text())
    res["process_s"] = time.perf_counter() - t0
    if not quiet:
        print(f"  round {round_i} {LABELS[side]:11s}: {res['samples_per_s']:.3f} samples/s  "
              f"peak {res['peak_mem_mb']:.0f} MB  ({res['process_s']:.0f} s in all)", flush=True)
    return res


def _aggregate(runs: list[dict]) -> dict:
    """Median throughput over rounds, max memory; per-sample counts from the rounds."""
    agg = {k: statistics.median(r[k] for r in runs)
           for k in ("samples_per_s", "cpu_s_per_sample", "vision_encodes_per_sample", "flops_per_sample",
                     "token_slots_per_sample", "real_tokens_per_sample", "rows_per_step", "base_mem_mb", "setup_s")}
    agg.update({"peak_mem_mb": max(r["peak_mem_mb"] for r in runs),
                "rounds_samples_per_s": [r["samples_per_s"] for r in runs],
                "step_s": [s for r in runs for s in r["step_s"]],
                "trainable_params": runs[0]["trainable_params"], "final_loss": runs[-1]["final_loss"],
                "flops_by_part_per_sample": runs[0]["flops_by_part_per_sample"]})
    for k in ("trl_version", "trl_packing"):
        if k in runs[0]:
            agg[k] = runs[0][k]
    if "peak_gpu_mem_mb" in runs[0]:
        agg["peak_gpu_mem_mb"] = max(r["peak_gpu_mem_mb"] for r in runs)
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
        f"model   LLaVA-1.5 architecture, random init: LM {m['arch']['hidden']}x{m['arch']['layers']} layers, "
        f"vision {m['arch']['vision_hidden']}x{m['arch']['vision_layers']}, vocab {m['vocab_size']}",
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
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run (the first counts FLOPs)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs per side (medians are reported)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (constant) on every side")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (0: torch's default; unset: 1 on CPU, 0 on CUDA; see "
                        "dpo_throughput.py --help for why one on a shared CPU)")
    p.add_argument("--sides", default="ours,packed,trl", help="comma list of sides to run")
    p.add_argument("--work-dir", default=None,
                   help="where the model, data and runs go (unset: a temp dir, removed at the end)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report here")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        return _child(args._child, args._spec, args._out)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if set(sides) - set(SIDES) or not sides:
        raise SystemExit(f"--sides: choose from {', '.join(SIDES)}")
    arch = dict(common.PRESETS[args.preset])
    shapes = SHAPES[args.preset]
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="sft-bench-")
        work = Path(tmp.name)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch
    spec = Spec(preset=args.preset, device=args.device, dtype=args.dtype,
                batch_size=args.batch_size or shapes["batch_size"], warmup=args.warmup, steps=args.steps,
                lr=args.lr, threads=args.threads if args.threads is not None else (1 if args.device == "cpu" else 0),
                max_length=shapes["max_length"], pack_length=args.pack_length or shapes["pack_length"], arch=arch,
                work_dir=str(work))
    if spec.pack_length < spec.max_length:
        raise SystemExit(f"--pack-length must be at least the preset's data.max_length ({spec.max_length})")
    if not args.quiet:
        print(f"building model and {spec.samples} samples in {work}", flush=True)
    model_dir = common.build_model(arch, work / "model", dtype=args.dtype)
    data_file = build_data(arch, shapes, model_dir, work / "data", spec.samples)
    spec.model_dir, spec.data_file = str(model_dir), str(data_file)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    seq = sequence_stats(str(model_dir), str(data_file))
    if seq["sample_tokens_max"] > spec.max_length:
        raise SystemExit(f"a sample has {seq['sample_tokens_max']} tokens, over data.max_length {spec.max_length}")

    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else list(reversed(sides))
        for side in order:
            runs[side].append(_run_side(side, spec_path, work, r, args.quiet))
    report: dict = {s: _aggregate(runs[s]) for s in sides}
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(model_dir))
    report["setup"] = {
        "preset": args.preset, "device": args.device, "dtype": args.dtype,
        "threads": spec.threads or torch.get_num_threads(), "arch": arch, "shapes": shapes,
        "vocab_size": cfg.text_config.vocab_size, "seq": seq, "batch_size": spec.batch_size,
        "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "lr": args.lr,
        "max_length": spec.max_length, "pack_length": spec.pack_length,
        "timing": "samples_per_s: timed samples over the wall time of the timed training steps",
        "memory": "peak_mem_mb: ru_maxrss of the side's own process (includes imports: base_mem_mb)",
        "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
    }
    report["ratios"] = ratios(report)
    print(_table(report, sides))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
