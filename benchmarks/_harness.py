"""What the training-throughput benchmarks (dpo_throughput.py, sft_throughput.py,
grpo_throughput.py) share: the random-init LLaVA model they train, the measuring tools each
side's process uses (FLOP counter, vision-tower counter, step clock, call timer, memory), the TRL
setup common to the trainers, and the harness that runs every side in its own process for
interleaved rounds and aggregates the results. What a benchmark measures beyond that (its data,
its sides, its table) stays in its script.

The scripts import this module by file name (``import _harness``) with their own folder put on
``sys.path``, so it works for ``python benchmarks/X.py`` and for loading a script by path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# ------------------------------------------------------------------------------------ model
# LLaVA-1.5-7B: Vicuna-7B (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000) behind a
# CLIP ViT-L/14 at 336 px (hidden 1024, 24 layers, 16 heads, MLP 4096: 576 image tokens) and a
# 2-layer MLP projector. A typical instruction is ~1/4 of the image tokens, answers ~1/4 of the
# whole sequence. The CPU preset keeps those proportions at 1/8 of the depth-scaled width
# (hidden 384, MLP 2.6875x, 4 layers; vision tower 1/4 of the LM's width and 3/4 of its depth)
# and 1/4 of the sequence: image 144 tokens, prompt text ~36 (~54 with the template's tokens),
# completions ~60 (a quarter of ~258); output head ~3% of the LM's parameters. The sequence
# fields (prompt_tokens, completion_tokens, pairs_per_step) are the DPO benchmark's; the SFT
# benchmark has its own sequence shapes per preset.
PRESETS: dict[str, dict] = {
    "smoke": dict(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, vision_hidden=16,
                  vision_layers=1, vision_heads=2, vision_intermediate=32, image_size=16, patch_size=8,
                  vocab_size=None, prompt_tokens=6, completion_tokens=6, pairs_per_step=2),
    "cpu": dict(hidden=384, layers=4, heads=6, kv_heads=6, intermediate=1032, vision_hidden=96,
                vision_layers=3, vision_heads=2, vision_intermediate=384, image_size=96, patch_size=8,
                vocab_size=None, prompt_tokens=36, completion_tokens=60, pairs_per_step=4),
    "llava-1.5-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
                         vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
                         image_size=336, patch_size=14, vocab_size=32064, prompt_tokens=144,
                         completion_tokens=240, pairs_per_step=8),
}


def torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_model(arch: dict, out_dir: Path, dtype: str = "fp32", seed: int = 0) -> Path:
    """Random-init LLaVA-1.5-architecture model + processor with a local tokenizer, saved as a
    normal Hugging Face directory (safetensors) that both trainers load."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    from vlmalign.models.llava import LLAVA_CHAT_TEMPLATE, tiny_clip_image_processor
    from vlmalign.models.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["<image>", "<s>", "</s>", "<pad>", "<unk>"], bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", unk_token="<unk>", chat_template=LLAVA_CHAT_TEMPLATE)
    vocab = max(arch["vocab_size"] or 0, len(tok))
    vision = CLIPVisionConfig(hidden_size=arch["vision_hidden"], intermediate_size=arch["vision_intermediate"],
                              num_hidden_layers=arch["vision_layers"], num_attention_heads=arch["vision_heads"],
                              image_size=arch["image_size"], patch_size=arch["patch_size"],
                              projection_dim=arch["vision_hidden"])
    text = LlamaConfig(vocab_size=vocab, hidden_size=arch["hidden"], intermediate_size=arch["intermediate"],
                       num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                       num_key_value_heads=arch["kv_heads"], max_position_embeddings=4096,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch_dtype(dtype)).eval()
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    processor = LlavaProcessor(image_processor=tiny_clip_image_processor(arch["image_size"]), tokenizer=tok,
                               patch_size=arch["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    return out_dir


def write_records(out_dir: Path, name: str, records: list) -> Path:
    """The benchmark's data file ``out_dir / name`` (JSON), for both sides."""
    path = out_dir / name
    path.write_text(json.dumps(records, indent=1))
    return path


def records_for_stats(model_dir: str, data_file: str, kind: str):
    """``(adapter, records, image loader)`` of a benchmark's data file, for its token counts."""
    from vlmalign.config.sections import DataSection
    from vlmalign.data.batching import ImageLoader
    from vlmalign.data.loading import read_records
    from vlmalign.models import load_adapter

    ad = load_adapter(model_dir)
    recs, _ = read_records(data_file, DataSection(), kind=kind)
    return ad, recs, ImageLoader(ad, os.path.dirname(data_file))


def fit_text(tok, text: str, n_tokens: int, lead: str = "") -> str:
    """``text`` (repeated as needed) cut to ``n_tokens`` tokens of the local tokenizer, at a
    token boundary (``lead`` is prepended before counting, as the template renders it)."""
    while len(tok(lead + text, add_special_tokens=False)["input_ids"]) < n_tokens + 1:
        text = text + " " + text
    ids = tok(lead + text, add_special_tokens=False)["input_ids"][:n_tokens]
    out = tok.decode(ids)
    return out[len(lead):] if out.startswith(lead) else out


# ------------------------------------------------------------------------------------ spec
@dataclass
class Spec:
    """Everything the sides must agree on (written to spec.json for the child processes); each
    benchmark subclasses it with its own fields and defaults."""

    preset: str = "cpu"
    model_dir: str = ""
    data_file: str = ""
    work_dir: str = ""
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int = 4
    warmup: int = 2
    steps: int = 6
    lr: float = 1e-6
    seed: int = 0
    threads: int = 1
    arch: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


# ------------------------------------------------------------------------------------ measuring
def register_cpu_attention_flops() -> None:
    """FlopCounterMode counts the CUDA SDPA kernels but not the CPU flash kernel; count it with
    the same formula (2 matmuls forward, 4 backward; causal masking not discounted)."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

    def attn(q, k, v):
        b, h, s_q, d = q
        s_k = k[2]
        return 2 * (2 * b * h * s_q * s_k * d)

    if fwd is not None and fwd not in flop_registry:
        @register_flop_formula(fwd)
        def _fwd(q, k, v, *args, out_shape=None, **kwargs):
            return attn(q, k, v)
    if bwd is not None and bwd not in flop_registry:
        @register_flop_formula(bwd)
        def _bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return 2 * attn(q, k, v)


PARTS = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")
# Module names FlopCounterMode gives a part when it runs outside the top model's own forward
# (our adapter calls ``model.model.get_image_features`` directly: the tower is then a root).
PART_ROOTS = {"vision_tower": "CLIPVisionModel", "multi_modal_projector": "LlavaMultiModalProjector"}


def flops_by_part(counts: dict, total: int) -> dict:
    """FLOPs per model part from FlopCounterMode's per-module counts: the shallowest module of
    each name (PEFT and wrappers only add prefixes) plus the part's class name where it ran as a
    root. Backward ops are attributed by torch's module tracker, so the split is approximate;
    ``other`` is what no part claimed."""
    out = {}
    for part in PARTS:
        names = [k for k in counts if k.split(".")[-1] == part]
        flops = 0
        if names:
            best = min(names, key=lambda k: k.count("."))
            flops += sum(counts[best].values())
        if PART_ROOTS.get(part) in counts:
            flops += sum(counts[PART_ROOTS[part]].values())
        out[part] = int(flops)
    out["other"] = total - sum(out.values())
    return out


def flop_mode():
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False)


class VisionCounter:
    """Counts images through the vision tower by wrapping its class's ``forward`` (catches every
    instance: policy, reference copies, PEFT-wrapped models)."""

    def __init__(self, cls):
        self.images = 0
        self.calls = 0
        original = cls.forward
        counter = self

        def forward(module, pixel_values=None, *args, **kwargs):
            counter.calls += 1
            counter.images += int(pixel_values.shape[0]) if pixel_values is not None else 0
            return original(module, pixel_values, *args, **kwargs)

        cls.forward = forward


class CallTimer:
    """Wall and CPU time (this process, all threads) spent inside named methods, by wrapping them
    on their class (every instance): e.g. ``generate``, ``Tensor.backward``, the optimizer's
    ``step``. Totals add up over the run (a call inside another timed call counts in both);
    ``mark()`` snapshots them, so a window's share is the difference of two marks."""

    def __init__(self, targets: dict):
        self.wall = {name: 0.0 for name in targets}
        self.cpu = {name: 0.0 for name in targets}
        for name, (cls, attr) in targets.items():
            self._wrap(name, cls, attr)

    def _wrap(self, name: str, cls, attr: str) -> None:
        original = getattr(cls, attr)
        timer = self

        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                timer.wall[name] += time.perf_counter() - t0
                timer.cpu[name] += time.process_time() - c0

        timed.__wrapped__ = original
        setattr(cls, attr, timed)

    def mark(self) -> dict:
        """``{"wall": {name: s}, "cpu": {name: s}}`` so far, plus the clocks' own totals (``_all``)."""
        return {"wall": {**self.wall, "_all": time.perf_counter()}, "cpu": {**self.cpu, "_all": time.process_time()}}


class StepClock:
    """End-of-step timestamps and CPU time, FLOPs of the first step, vision images per window.
    ``unit`` names what a batch holds ("pair", "sample"): the summary's keys are per unit."""

    def __init__(self, spec: Spec, vision: VisionCounter, unit: str):
        self.spec, self.vision, self.unit = spec, vision, unit
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.flops: int | None = None
        self.flop_counts: dict = {}
        self.flop_parts: dict = {}
        self.images_at: dict[int, int] = {}

    def record_flops(self, mode) -> None:
        self.flops = int(mode.get_total_flops())
        self.flop_counts = mode.get_flop_counts()
        self.flop_parts = flops_by_part(self.flop_counts, self.flops)

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.images_at[len(self.ends)] = self.vision.images

    def summary(self) -> dict:
        s, u = self.spec, self.unit
        w, n = s.warmup, s.steps
        window = self.ends[w + n - 1] - self.ends[w - 1]
        units = n * s.batch_size
        return {f"{u}s_per_s": units / window, "timed_s": window, f"timed_{u}s": units,
                f"cpu_s_per_{u}": (self.cpu[w + n - 1] - self.cpu[w - 1]) / units,
                "step_s": [b - a for a, b in zip(self.ends[w - 1:], self.ends[w:])],
                f"vision_encodes_per_{u}": (self.images_at[w + n] - self.images_at[w]) / units,
                f"flops_per_{u}": (self.flops or 0) / s.batch_size,
                f"flops_by_part_per_{u}": {k: v / s.batch_size for k, v in self.flop_parts.items()}}


class EngineClock:
    """The engine callback (vlmalign.engine.callbacks) that times our side's optimizer steps: the
    first one under the FLOP counter; ``marks`` holds the start and the first step (setup_s)."""

    def __init__(self, spec: Spec, clock: StepClock):
        self.spec, self.clock = spec, clock
        self.marks: dict[str, float] = {"start": time.perf_counter()}

    def wrap(self, engine, name: str, **info):
        if name == "step":
            return self._step(engine)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _step(self, engine):
        clock = self.clock
        if not clock.ends:  # first step: everything before it was setup
            self.marks["first_step"] = time.perf_counter()
            with flop_mode() as mode:
                yield
            clock.record_flops(mode)
        else:
            yield
        clock.step_done()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def setup_child(spec: Spec) -> VisionCounter:
    """A side's process before it loads anything: threads, seed, CPU attention FLOPs, the vision
    tower counter."""
    import torch
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    register_cpu_attention_flops()
    from transformers.models.clip.modeling_clip import CLIPVisionModel
    return VisionCounter(CLIPVisionModel)


def side_result(clock: StepClock, base_mb: float, setup_s: float, final_loss, model, **extra) -> dict:
    """A side's result: the clock's summary, memory, setup time, loss, trainable parameters."""
    out = clock.summary()
    out.update({"peak_mem_mb": peak_mb(), "base_mem_mb": base_mb, "setup_s": setup_s, "final_loss": final_loss,
                "trainable_params": trainable(model), **extra})
    return out


# ------------------------------------------------------------------------------------ TRL sides
def trl_model(spec: Spec):
    """The model and processor as TRL's trainers get them, vision tower frozen."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(spec.model_dir, dtype=torch_dtype(spec.dtype))
    processor = AutoProcessor.from_pretrained(spec.model_dir)
    model.model.vision_tower.requires_grad_(False)
    return model, processor


def trl_dataset(spec: Spec, n: int, columns):
    """TRL's conversational dataset of the first ``n`` records: ``images`` (one RGB image a row)
    and the columns ``columns(record)`` returns."""
    from datasets import Dataset
    from PIL import Image

    root = Path(spec.data_file).parent
    rows: dict[str, list] = {"images": []}
    for r in json.loads(Path(spec.data_file).read_text())[:n]:
        with Image.open(root / r["image"]) as im:
            rows["images"].append([im.convert("RGB")])
        for k, v in columns(r).items():
            rows.setdefault(k, []).append(v)
    return Dataset.from_dict(rows)


def trl_args(spec: Spec, **extra) -> dict:
    """Training arguments both TRL trainers get (the optimizer and schedule of our sides)."""
    return dict(
        output_dir=f"{spec.work_dir}/run-trl", per_device_train_batch_size=spec.batch_size,
        max_steps=spec.total_steps, learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, seed=spec.seed, report_to="none", save_strategy="no",
        logging_steps=1, use_cpu=spec.device == "cpu", bf16=spec.dtype == "bf16", fp16=spec.dtype == "fp16",
        dataloader_num_workers=0, max_length=None, disable_tqdm=True, **extra,
    )


def trl_step_callback(clock: StepClock):
    """A ``TrainerCallback`` that ends the clock's step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_done()

    return Clock()


def time_trl_steps(trainer, clock: StepClock, marks: dict, inspect=None) -> None:
    """Wrap ``trainer.training_step``: mark the first step (setup_s), run it under the FLOP
    counter, and hand every step's inputs to ``inspect``."""
    original = trainer.training_step

    def training_step(model_, inputs, *a, **kw):
        if not clock.ends and "first_step" not in marks:
            marks["first_step"] = time.perf_counter()
        if inspect is not None:
            inspect(inputs)
        if not clock.ends:
            with flop_mode() as mode:
                out = original(model_, inputs, *a, **kw)
            clock.record_flops(mode)
            return out
        return original(model_, inputs, *a, **kw)

    trainer.training_step = training_step


# ------------------------------------------------------------------------------------ harness
def child(spec_cls, run, side: str, spec_path: str, out_path: str) -> int:
    """A side's process: ``run(side, spec)`` and its result (plus peak GPU memory) to ``out_path``."""
    spec = spec_cls(**json.loads(Path(spec_path).read_text()))
    res = run(side, spec)
    if spec.device == "cuda":
        import torch
        res["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(out_path).write_text(json.dumps(res, indent=1))
    return 0


def run_side(script: str, side: str, spec_path: Path, work: Path, round_i: int, quiet: bool, label: str,
             unit: str) -> dict:
    """One side in its own process (``script --_child side``, offline); its result."""
    out = work / f"result-{side}-{round_i}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(script).resolve()), "--_child", side, "--_spec", str(spec_path),
           "--_out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} run {round_i} failed (exit {proc.returncode}); output above")
    res = json.loads(out.read_text())
    res["process_s"] = time.perf_counter() - t0
    if not quiet:
        print(f"  round {round_i} {label}: {res[f'{unit}s_per_s']:.3f} {unit}s/s  "
              f"peak {res['peak_mem_mb']:.0f} MB  ({res['process_s']:.0f} s in all)", flush=True)
    return res


def run_rounds(script: str, sides: list[str], spec: Spec, work: Path, rounds: int, quiet: bool, labels: dict,
               unit: str) -> dict[str, list[dict]]:
    """Write the spec, then run every side ``rounds`` times, alternating the order each round."""
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(rounds):
        order = sides if r % 2 == 0 else list(reversed(sides))
        for side in order:
            runs[side].append(run_side(script, side, spec_path, work, r, quiet, labels[side], unit))
    return runs


def aggregate(runs: list[dict], unit: str, medians: tuple[str, ...] = ()) -> dict:
    """Median throughput, counts, base memory and setup time over rounds (plus the ``medians``
    keys), max peak memory, every round's throughput and step times; the rest from the rounds."""
    keys = (f"{unit}s_per_s", f"cpu_s_per_{unit}", f"vision_encodes_per_{unit}", f"flops_per_{unit}", *medians,
            "base_mem_mb", "setup_s")
    agg = {k: statistics.median(r[k] for r in runs) for k in keys}
    agg.update({"peak_mem_mb": max(r["peak_mem_mb"] for r in runs),
                f"rounds_{unit}s_per_s": [r[f"{unit}s_per_s"] for r in runs],
                "step_s": [s for r in runs for s in r["step_s"]],
                "trainable_params": runs[0]["trainable_params"], "final_loss": runs[-1]["final_loss"],
                f"flops_by_part_per_{unit}": runs[0][f"flops_by_part_per_{unit}"]})
    if "peak_gpu_mem_mb" in runs[0]:
        agg["peak_gpu_mem_mb"] = max(r["peak_gpu_mem_mb"] for r in runs)
    return agg


# ------------------------------------------------------------------------------------ command line
def add_step_options(p: argparse.ArgumentParser, steps: int, rounds: int, lr: float, who: str) -> None:
    """--warmup, --steps, --rounds, --lr (``who``: "both sides", "every side")."""
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run (the first counts FLOPs)")
    p.add_argument("--steps", type=int, default=steps, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=rounds, help="interleaved runs per side (medians are reported)")
    p.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (constant) on {who}")


def add_run_options(p: argparse.ArgumentParser, sides: tuple[str, ...]) -> None:
    """--sides, --work-dir, --json, --quiet and the hidden options of a side's process."""
    p.add_argument("--sides", default=",".join(sides), help="comma list of sides to run")
    p.add_argument("--work-dir", default=None,
                   help="where the model, data and runs go (unset: a temp dir, removed at the end)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report here")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")
    return args


def chosen_sides(arg: str, sides: tuple[str, ...]) -> list[str]:
    chosen = [s.strip() for s in arg.split(",") if s.strip()]
    if set(chosen) - set(sides) or not chosen:
        raise SystemExit(f"--sides: choose from {', '.join(sides)}")
    return chosen


def threads(args: argparse.Namespace) -> int:
    """--threads, unset: 1 on CPU, 0 (torch's default) on CUDA."""
    return args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)


@contextlib.contextmanager
def work_dir(path: str | None, prefix: str):
    """--work-dir (made if missing), or a temporary folder removed at the end; the repository's
    src/ goes on ``sys.path`` for the model and data build in this process."""
    sys.path.insert(0, str(SRC))
    if path:
        work = Path(path).resolve()
        work.mkdir(parents=True, exist_ok=True)
        yield work
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)


def setup_report(args: argparse.Namespace, spec: Spec, seq: dict, **extra) -> dict:
    """The report's ``setup``: what ran, on what, with which shapes, and the machine's load."""
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(spec.model_dir)
    return {"preset": spec.preset, "device": spec.device, "dtype": spec.dtype,
            "threads": spec.threads or torch.get_num_threads(), "arch": spec.arch,
            "vocab_size": cfg.text_config.vocab_size, "seq": seq, "batch_size": spec.batch_size,
            "warmup": spec.warmup, "steps": spec.steps, "rounds": args.rounds, "lr": spec.lr, **extra,
            "memory": "peak_mem_mb: ru_maxrss of the side's own process (includes imports: base_mem_mb)",
            "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}


def model_line(m: dict) -> str:
    """The table's model line from the report's setup."""
    return (f"model   LLaVA-1.5 architecture, random init: LM {m['arch']['hidden']}x{m['arch']['layers']} layers, "
            f"vision {m['arch']['vision_hidden']}x{m['arch']['vision_layers']}, vocab {m['vocab_size']}")


def write_report(report: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=1))
