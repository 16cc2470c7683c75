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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SIDES = ("ours", "trl")

# ------------------------------------------------------------------------------------ presets
# LLaVA-1.5-7B: Vicuna-7B (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000) behind a
# CLIP ViT-L/14 at 336 px (hidden 1024, 24 layers, 16 heads, MLP 4096: 576 image tokens) and a
# 2-layer MLP projector. A typical instruction is ~1/4 of the image tokens, answers ~1/4 of the
# whole sequence. The CPU preset keeps those proportions at 1/8 of the depth-scaled width
# (hidden 384, MLP 2.6875x, 4 layers; vision tower 1/4 of the LM's width and 3/4 of its depth)
# and 1/4 of the sequence: image 144 tokens, prompt text ~36 (~54 with the template's tokens),
# completions ~60 (a quarter of ~258); output head ~3% of the LM's parameters.
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


@dataclass
class Spec:
    """Everything both sides must agree on (written to spec.json for the child processes)."""

    preset: str = "cpu"
    model_dir: str = ""
    data_file: str = ""
    work_dir: str = ""
    device: str = "cpu"
    dtype: str = "fp32"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    batch_size: int = 4
    warmup: int = 2
    steps: int = 6
    lr: float = 1e-6
    beta: float = 0.1
    seed: int = 0
    threads: int = 1
    prefix_sharing: bool = True
    precompute_ref: bool = True
    arch: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def pairs(self) -> int:
        return self.total_steps * self.batch_size


# ------------------------------------------------------------------------------------ model
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
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch_dtype).eval()
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    processor = LlavaProcessor(image_processor=tiny_clip_image_processor(arch["image_size"]), tokenizer=tok,
                               patch_size=arch["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    return out_dir


# ------------------------------------------------------------------------------------ data
_PROMPT_TEXT = ("Describe the image in detail. Say which shape is in each part of the picture, "
                "what colour it is and where it is, then say how many objects there are. ")


def _fit(tok, text: str, n_tokens: int, lead: str = "") -> str:
    """``text`` (repeated as needed) cut to ``n_tokens`` tokens of the local tokenizer, at a
    token boundary (``lead`` is prepended before counting, as the template renders it)."""
    while len(tok(lead + text, add_special_tokens=False)["input_ids"]) < n_tokens + 1:
        text = text + " " + text
    ids = tok(lead + text, add_special_tokens=False)["input_ids"][:n_tokens]
    out = tok.decode(ids)
    return out[len(lead):] if out.startswith(lead) else out


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
    prompt = _fit(tok, _PROMPT_TEXT, arch["prompt_tokens"], lead=" ").strip()
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
                        "chosen": _fit(tok, good, n, lead=" ").strip(),
                        "rejected": _fit(tok, bad, n, lead=" ").strip()})
    path = out_dir / "pairs.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def sequence_stats(model_dir: str, data_file: str) -> dict:
    """Token counts of the data under our tokenization (image tokens, prompt text, completions)."""
    from vlmalign.config.sections import DataSection
    from vlmalign.models import load_adapter
    from vlmalign.data.batching import ImageLoader
    from vlmalign.data.loading import read_records

    ad = load_adapter(model_dir)
    recs, _ = read_records(data_file, DataSection(), kind="preference")
    loader = ImageLoader(ad, os.path.dirname(data_file))
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


# ------------------------------------------------------------------------------------ measuring
def _register_cpu_attention_flops() -> None:
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


def _flop_mode():
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


class StepClock:
    """End-of-step timestamps, FLOPs of the first step, vision images per window."""

    def __init__(self, spec: Spec, vision: VisionCounter):
        self.spec = spec
        self.vision = vision
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.flops: int | None = None
        self.flop_breakdown: dict = {}
        self.flop_parts: dict = {}
        self.images_at: dict[int, int] = {}

    def flop_mode(self):
        return _flop_mode()

    def record_flops(self, mode) -> None:
        self.flops = int(mode.get_total_flops())
        counts = mode.get_flop_counts()
        self.flop_breakdown = {str(k): int(v) for k, v in counts.get("Global", {}).items()}
        self.flop_parts = flops_by_part(counts, self.flops)

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.images_at[len(self.ends)] = self.vision.images

    def summary(self) -> dict:
        s = self.spec
        w, n = s.warmup, s.steps
        window = self.ends[w + n - 1] - self.ends[w - 1]
        pairs = n * s.batch_size
        images = self.images_at[w + n] - self.images_at[w]
        cpu = self.cpu[w + n - 1] - self.cpu[w - 1]
        return {"pairs_per_s": pairs / window, "timed_s": window, "timed_pairs": pairs,
                "cpu_s_per_pair": cpu / pairs,
                "step_s": [b - a for a, b in zip(self.ends[w - 1:], self.ends[w:])],
                "vision_encodes_per_pair": images / pairs,
                "flops_per_pair": (self.flops or 0) / s.batch_size,
                "flop_breakdown_per_pair": {k: v / s.batch_size for k, v in self.flop_breakdown.items()},
                "flops_by_part_per_pair": {k: v / s.batch_size for k, v in self.flop_parts.items()}}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _setup_child(spec: Spec):
    import torch
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    _register_cpu_attention_flops()
    from transformers.models.clip.modeling_clip import CLIPVisionModel
    return VisionCounter(CLIPVisionModel)


# ------------------------------------------------------------------------------------ our side
def run_ours(spec: Spec) -> dict:
    """vlmalign's ``train_dpo`` with encode-once, prefix sharing and precomputed reference
    log-probs; steps and the reference pass timed by an engine callback (:class:`OursClock`)."""
    vision = _setup_child(spec)
    base_mb = _rss_mb()
    from vlmalign.config import load_config
    from vlmalign.methods import dpo

    clock = StepClock(spec, vision)
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
    out = clock.summary()
    pre = watch.precompute
    pre_s = pre.get("seconds")
    pre_pairs = pre.get("pairs", 0)
    if spec.precompute_ref and pre_s is None:
        raise RuntimeError("dpo.precompute_ref_logps=true but no reference pass ran (loaded from a cache?)")
    counters = watch.counters
    out.update({
        "peak_mem_mb": _peak_mb(), "base_mem_mb": base_mb,
        "adapter_encodes_per_pair": (counters["adapter_images_window_end"]
                                     - counters["adapter_images_window_start"]) / out["timed_pairs"],
        "setup_s": watch.marks["first_step"] - watch.marks["start"],
        "precompute_s": pre_s,
        "precompute_pairs": pre_pairs,
        "precompute_encodes_per_pair": pre["images"] / pre_pairs if pre_pairs else 0.0,
        "precompute_flops_per_pair": pre["flops"] / pre_pairs if pre_pairs else 0.0,
        "final_loss": result.metrics.get("loss"),
        "trainable_params": _trainable(adapter.model),
    })
    return out


class OursClock:
    """The engine callback (vlmalign.engine.callbacks) that times our side: each optimizer step (``step``: the first one under
    the FLOP counter, the adapters' image-encode counters at the timed window's ends) and the
    reference log-prob pass before training (``reference_precompute``: seconds, FLOPs,
    vision-tower images, pairs)."""

    def __init__(self, spec: Spec, clock: StepClock, vision: VisionCounter):
        self.spec, self.clock, self.vision = spec, clock, vision
        self.marks: dict[str, float] = {"start": time.perf_counter()}  # setup_s: load, data, ref precompute
        self.counters: dict[str, int] = {}
        self.precompute: dict = {}

    def wrap(self, engine, name: str, **info):
        if name == "step":
            return self._step(engine)
        if name == "reference_precompute":
            return self._precompute(info["examples"])
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _step(self, engine):
        clock, spec = self.clock, self.spec
        if not clock.ends:  # first step: everything before it was setup + precompute
            self.marks["first_step"] = time.perf_counter()
        if len(clock.ends) == spec.warmup:
            self.counters["adapter_images_window_start"] = sum(a.encoded_images for a in engine.adapters)
        if not clock.ends:
            with clock.flop_mode() as mode:
                yield
            clock.record_flops(mode)
        else:
            yield
        clock.step_done()
        if len(clock.ends) == spec.total_steps:
            self.counters["adapter_images_window_end"] = sum(a.encoded_images for a in engine.adapters)

    @contextlib.contextmanager
    def _precompute(self, pairs: int):
        images0 = self.vision.images
        t0 = time.perf_counter()
        with _flop_mode() as mode:  # the counter's overhead is below the run-to-run noise here
            yield
        self.precompute.update(seconds=time.perf_counter() - t0, flops=int(mode.get_total_flops()),
                               images=self.vision.images - images0, pairs=pairs)


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ TRL side
def run_trl(spec: Spec) -> dict:
    """TRL 1.16 ``DPOTrainer`` on the same directory and records (its vision collator, live
    reference: a second copy of the model for full training, the adapter disabled for LoRA)."""
    vision = _setup_child(spec)
    base_mb = _rss_mb()
    import torch
    import trl
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    marks = {"start": time.perf_counter()}  # setup_s: load, data, trainer construction
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.dtype]
    model = LlavaForConditionalGeneration.from_pretrained(spec.model_dir, dtype=dtype)
    processor = AutoProcessor.from_pretrained(spec.model_dir)
    model.model.vision_tower.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(False)
    peft_config = None
    if spec.lora:
        from peft import LoraConfig

        from vlmalign.models import adapter_for
        targets = adapter_for(model, processor).lora_target_modules()
        peft_config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                 target_modules=targets, bias="none")

    root = Path(spec.data_file).parent
    recs = json.loads(Path(spec.data_file).read_text())[: spec.pairs]
    rows = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for r in recs:
        with Image.open(root / r["image"]) as im:
            rows["images"].append([im.convert("RGB")])
        rows["prompt"].append([{"role": "user", "content": r["prompt"]}])
        rows["chosen"].append([{"role": "assistant", "content": r["chosen"]}])
        rows["rejected"].append([{"role": "assistant", "content": r["rejected"]}])
    dataset = Dataset.from_dict(rows)

    clock = StepClock(spec, vision)
    seen = {"tokens": [], "completion": []}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_done()

    args = DPOConfig(
        output_dir=f"{spec.work_dir}/run-trl", per_device_train_batch_size=spec.batch_size,
        max_steps=spec.total_steps, learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=spec.beta, seed=spec.seed, report_to="none",
        save_strategy="no", logging_steps=1, use_cpu=spec.device == "cpu", bf16=spec.dtype == "bf16",
        fp16=spec.dtype == "fp16", dataloader_num_workers=0, max_length=None, disable_tqdm=True,
        precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config, callbacks=[Clock()])
    original = trainer.training_step

    def training_step(model_, inputs, *a, **kw):
        if not clock.ends and "first_step" not in marks:
            marks["first_step"] = time.perf_counter()
        seen["tokens"].append(float(inputs["attention_mask"].sum(1).float().mean()))
        seen["completion"].append(float(inputs["completion_mask"].sum(1).float().mean()))
        if not clock.ends:
            with clock.flop_mode() as mode:
                out = original(model_, inputs, *a, **kw)
            clock.record_flops(mode)
            return out
        return original(model_, inputs, *a, **kw)

    trainer.training_step = training_step
    result = trainer.train()
    out = clock.summary()
    out.update({
        "peak_mem_mb": _peak_mb(), "base_mem_mb": base_mb, "setup_s": marks["first_step"] - marks["start"],
        "precompute_s": None, "precompute_pairs": 0, "precompute_encodes_per_pair": 0.0,
        "precompute_flops_per_pair": 0.0, "final_loss": result.training_loss,
        "trainable_params": _trainable(trainer.model), "trl_version": trl.__version__,
        "trl_mean_row_tokens": statistics.mean(seen["tokens"]),
        "trl_mean_completion_tokens": statistics.mean(seen["completion"]),
    })
    return out


# ------------------------------------------------------------------------------------ harness
def _child(side: str, spec_path: str, out_path: str) -> int:
    spec_d = json.loads(Path(spec_path).read_text())
    spec = Spec(**spec_d)
    res = (run_ours if side == "ours" else run_trl)(spec)
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
        print(f"  round {round_i} {side:4s}: {res['pairs_per_s']:.3f} pairs/s  "
              f"peak {res['peak_mem_mb']:.0f} MB  ({res['process_s']:.0f} s in all)", flush=True)
    return res


def _aggregate(runs: list[dict]) -> dict:
    """Median throughput over rounds, max memory; per-pair counts from the rounds (equal)."""
    agg = {
        "pairs_per_s": statistics.median(r["pairs_per_s"] for r in runs),
        "vision_encodes_per_pair": statistics.median(r["vision_encodes_per_pair"] for r in runs),
        "flops_per_pair": statistics.median(r["flops_per_pair"] for r in runs),
        "cpu_s_per_pair": statistics.median(r["cpu_s_per_pair"] for r in runs),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in runs),
        "base_mem_mb": statistics.median(r["base_mem_mb"] for r in runs),
        "rounds_pairs_per_s": [r["pairs_per_s"] for r in runs],
        "step_s": [s for r in runs for s in r["step_s"]],
        "setup_s": statistics.median(r["setup_s"] for r in runs),
        "trainable_params": runs[0]["trainable_params"],
        "final_loss": runs[-1]["final_loss"],
        "flop_breakdown_per_pair": runs[0]["flop_breakdown_per_pair"],
        "flops_by_part_per_pair": runs[0]["flops_by_part_per_pair"],
    }
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
    for k in ("adapter_encodes_per_pair", "trl_mean_row_tokens", "trl_mean_completion_tokens", "trl_version",
              "peak_gpu_mem_mb"):
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
        f"model   LLaVA-1.5 architecture, random init: LM {m['arch']['hidden']}x{m['arch']['layers']} layers, "
        f"vision {m['arch']['vision_hidden']}x{m['arch']['vision_layers']}, vocab {m['vocab_size']}",
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
              t["flops_by_part_per_pair"].get(part, 0) / 1e9, "{:.2f}") for part in (*PARTS, "other")],
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
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run (the first counts FLOPs)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs per side (medians are reported)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (constant) on both sides")
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
    p.add_argument("--sides", default="ours,trl", help="comma list of sides to run")
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
    arch = dict(PRESETS[args.preset])
    batch = args.batch_size or arch["pairs_per_step"]
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="dpo-bench-")
        work = Path(tmp.name)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch
    spec = Spec(preset=args.preset, device=args.device, dtype=args.dtype, lora=args.lora, batch_size=batch,
                warmup=args.warmup, steps=args.steps, lr=args.lr, beta=args.beta,
                threads=args.threads if args.threads is not None else (1 if args.device == "cpu" else 0),
                prefix_sharing=not args.no_prefix_sharing, precompute_ref=not args.live_ref, arch=arch,
                work_dir=str(work))
    if not args.quiet:
        print(f"building model and {spec.pairs} pairs in {work}", flush=True)
    model_dir = build_model(arch, work / "model", dtype=args.dtype)
    data_file = build_data(arch, model_dir, work / "data", spec.pairs)
    spec.model_dir, spec.data_file = str(model_dir), str(data_file)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    seq = sequence_stats(str(model_dir), str(data_file))

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
        "threads": spec.threads or torch.get_num_threads(), "arch": arch, "vocab_size": cfg.text_config.vocab_size,
        "seq": seq, "batch_size": batch, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
        "lr": args.lr, "beta": args.beta, "prefix_sharing": spec.prefix_sharing,
        "precompute_ref": spec.precompute_ref,
        "trained": ("LoRA adapters on the language model" if args.lora else "full language model + output head")
                   + "; vision tower and projector frozen",
        "timing": "pairs_per_s: wall time of the timed training steps only; epoch_pairs_per_s adds our "
                  "reference precompute pass amortised over one epoch (the run's pairs)",
        "memory": "peak_mem_mb: ru_maxrss of the side's own process (includes imports: base_mem_mb)",
        "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
    }
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
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
