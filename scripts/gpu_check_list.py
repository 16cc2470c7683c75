"""The checks scripts/gpu_check.py runs, in order, and the probes some of them run as their own
processes (``python scripts/gpu_check_list.py build-05b|attention|vllm ...``).

A check: a name, what it shows, whether it needs CUDA, the packages it installs (pip spec,
module to import), the checks it needs, a timeout, the commands it runs and a ``verify`` that
reads what they wrote (raising where the result is wrong). Every training check runs the
``vlmalign`` CLI on ShapesWorld data, for 2 optimizer steps, into OUT/runs/NAME.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 peak TFLOP/s by GPU name (vendor data sheets); others: pass --peak-tflops
PEAKS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0))
# a ~0.47B LLaVA-architecture random model: Llama LM 1024 wide, 30 layers, vocabulary 32064, a
# CLIP tower 512 wide at 224 px (256 image tokens); head dims 64, which vLLM's kernels take
ARCH_05B = dict(hidden=1024, layers=30, heads=16, kv_heads=16, intermediate=2816, vision_hidden=512,
                vision_layers=6, vision_heads=8, vision_intermediate=2048, image_size=224, patch_size=14,
                vocab_size=32064)


@dataclass
class Context:
    out: Path
    cuda: bool
    gpu_names: list
    mode: str
    dry_run: bool = False
    cpu_smoke: bool = False
    install: bool = True
    peak_tflops: float | None = None
    env: dict = field(default_factory=dict)

    @property
    def constraints(self) -> Path:
        return self.out / "constraints.txt"

    @property
    def gpus(self) -> int:
        return max(1, len(self.gpu_names))

    @classmethod
    def create(cls, out: Path, *, cpu_smoke=False, dry_run=False, install=True, peak_tflops=None) -> "Context":
        import torch
        out = out.resolve()
        (out / "logs").mkdir(parents=True, exist_ok=True)
        cuda = torch.cuda.is_available() and not cpu_smoke
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
        if peak_tflops is None and names:
            peak_tflops = next((v for k, v in PEAKS if k in names[0]), None)
        import transformers
        # a package that needs another torch or transformers is reported missing, never allowed to replace them
        (out / "constraints.txt").write_text(f"torch=={torch.__version__}\ntransformers=={transformers.__version__}\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        mode = "dry-run" if dry_run else "cpu-smoke" if cpu_smoke else "full"
        return cls(out, cuda, names, mode, dry_run, cpu_smoke, install, peak_tflops, env)


@dataclass
class Check:
    name: str
    what: str
    commands: Callable[[Context, str], list[list[str]]]
    verify: Callable[[Context], dict] | None = None
    needs_cuda: bool = True
    packages: tuple = ()            # (pip spec, module) pairs
    pip_args: dict = field(default_factory=dict)   # module -> extra pip arguments
    needs: tuple = ()
    timeout: int = 300
    venv: str | None = None         # its own venv under OUT (a package that pins its own torch)
    install_repo: bool = False      # install vlmalign into that venv


# ---------------------------------------------------------------------------------- commands
def _data(ctx: Context) -> Path:
    return ctx.out / "data"


def _model(ctx: Context) -> Path:
    return ctx.out / "model_05b"


def _train(method: str, name: str, *sets: str, launch: tuple = ()):
    """A check's commands: ``vlmalign train METHOD`` for 2 steps into OUT/runs/NAME."""
    def commands(ctx: Context, py: str) -> list[list[str]]:
        d, run = _data(ctx), ctx.out / "runs" / name
        head = [py, "-m", "accelerate.commands.launch", *launch, "-m", "vlmalign"] if launch else [py, "-m", "vlmalign"]
        values = [s.format(d=d, m=_model(ctx), run=run, gpus=ctx.gpus) for s in sets]
        return [head + ["train", method, *values, f"train.output_dir={run}", "train.max_steps=2",
                        "train.progress=false", "train.overwrite=true", "data.max_length=1024"]]
    return commands


def _metrics(name: str):
    """Verify: the run logged 2 steps with finite losses."""
    def verify(ctx: Context) -> dict:
        rows = [json.loads(x) for x in (ctx.out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "train/loss" in r]
        if [r["step"] for r in train] != [1, 2] or not all(math.isfinite(r["train/loss"]) for r in train):
            raise ValueError(f"expected steps 1, 2 with finite losses, got {train}")
        return {"loss": round(train[-1]["train/loss"], 4), "time_s": round(train[-1]["time"], 1)}
    return verify


def _json_file(rel: str, keys: tuple):
    def verify(ctx: Context) -> dict:
        got = json.loads((ctx.out / rel).read_text())
        return {k: got[k] for k in keys}
    return verify


def _probe(kind: str, *args: str):
    def commands(ctx: Context, py: str) -> list[list[str]]:
        return [[py, str(Path(__file__).resolve()), kind, "--out", str(ctx.out), *args]]
    return commands


SFT = ("data.train_file={d}/vqa_train.json",)
DPO = ("data.train_file={d}/dpo_train.json", "dpo.ref_cache_dir={run}/ref_cache")
GRPO = ("data.train_file={d}/rl_train.json", "rollout.prompts_per_step=2", "rollout.k=4", "rollout.max_new_tokens=8",
        "train.batch_size=8", "reward=[{{type: function, name: exact_match, weight: 1.0}}]")
TINY = ("model.tiny=llava", "train.batch_size=2")
BF16 = ("model.dtype=bf16", "train.precision=bf16")
BIG = ("model.path={m}", "train.batch_size=4", *BF16)
BNB = (("bitsandbytes", "bitsandbytes"),)
DS = (("deepspeed", "deepspeed"),)
QLORA = ("model.path={m}", "lora.enabled=true", "lora.qlora=true", "train.batch_size=4", "train.precision=bf16")


def _sharded(config: str):
    return ("--config_file", f"configs/accelerate/{config}", "--num_processes", "{gpus}")


def _launch(config: str, method: str = "sft"):
    """``vlmalign train METHOD`` (sft or dpo) of the 0.47B model, launched with ``config`` and one
    process per GPU present (formatted per run), into OUT/runs/CONFIG_METHOD."""
    def commands(ctx: Context, py: str) -> list[list[str]]:
        name = config.replace(".yaml", "") + "_" + method
        flags = tuple(s.format(gpus=ctx.gpus) for s in _sharded(config))
        return _train(method, name, *(SFT if method == "sft" else DPO), *BIG, launch=flags)(ctx, py)
    return commands


def _saved(name: str):
    """Verify: 2 steps with finite losses (:func:`_metrics`), and the final checkpoint reloads as
    full weights: every tensor of the 0.47B model, with its full shape (not a ZeRO-3 shard), finite,
    and moved by training. Reports the largest change from the starting weights."""
    metrics = _metrics(name)

    def verify(ctx: Context) -> dict:
        out = metrics(ctx)
        import torch
        from safetensors.torch import load_file

        def load(d: Path) -> dict:
            sd = {}
            for f in sorted(d.glob("*.safetensors")):
                sd.update(load_file(str(f)))
            if not sd:
                raise ValueError(f"{d}: no safetensors weights")
            return sd
        start, saved = load(_model(ctx)), load(ctx.out / "runs" / name / "checkpoints" / "step-2" / "model")
        if saved.keys() != start.keys():
            raise ValueError(f"saved keys differ from the model's: missing {sorted(start.keys() - saved.keys())[:5]}, "
                             f"unexpected {sorted(saved.keys() - start.keys())[:5]}")
        bad = [k for k in start if saved[k].shape != start[k].shape]
        if bad:
            raise ValueError(f"{len(bad)} saved tensors have other shapes than the model's (ZeRO-3 shards?): "
                             f"{bad[0]} {tuple(saved[bad[0]].shape)} vs {tuple(start[bad[0]].shape)}")
        if not all(torch.isfinite(v.float()).all() for v in saved.values()):
            raise ValueError("non-finite saved weights")
        moved = max(float((saved[k].float() - start[k].float()).abs().max()) for k in start)
        if not moved > 0:
            raise ValueError("the saved weights equal the starting ones: training changed nothing")
        return {**out, "tensors": len(saved), "max_weight_change": moved}
    return verify


def _bench(ctx: Context, py: str) -> list[list[str]]:
    peak = ["--peak-tflops", str(ctx.peak_tflops)] if ctx.peak_tflops else []
    return [[py, "benchmarks/dpo_throughput.py", "--device", "cuda", "--preset", "llava-1.5-7b", "--dtype", "bf16",
             "--lora", "--rounds", "1", "--warmup", "1", "--steps", "2", "--sides", "ours", "--quiet",
             "--work-dir", str(ctx.out / "dpo_bench"), "--json", str(ctx.out / "dpo_bench.json"), *peak]]


def _bench_verify(ctx: Context) -> dict:
    ours = json.loads((ctx.out / "dpo_bench.json").read_text())["ours"]
    out = {k: ours[k] for k in ("pairs_per_s", "flops_per_pair") if k in ours}
    out["mfu"] = ours.get("mfu", "no peak known for this GPU: pass --peak-tflops")
    return out


def _grpo_bench(ctx: Context, py: str) -> list[list[str]]:
    return [[py, "benchmarks/grpo_throughput.py", "--preset", "gpu", "--rounds", "1", "--warmup", "1", "--steps", "2",
             "--quiet", "--work-dir", str(ctx.out / "grpo_bench"), "--json", str(ctx.out / "grpo_bench.json")]]


def _grpo_bench_verify(ctx: Context) -> dict:
    rep = json.loads((ctx.out / "grpo_bench.json").read_text())
    out = {f"{side}_{k}": rep[side][k] for side in ("ours", "trl")
           for k in ("samples_per_s", "vision_encodes_per_sample", "peak_gpu_mem_mb") if k in rep[side]}
    out.update({f"ratio_{k}": v for k, v in rep["ratios"].items()})
    return out


def _data_cmd(ctx: Context, py: str) -> list[list[str]]:
    return [[py, "-m", "vlmalign", "data", "synth", "shapes", "--out", str(_data(ctx)), "--train", "16", "--eval", "4",
             "--image-position", "after", "--max-turns", "1"]]


CHECKS: list[Check] = [
    Check("data", "ShapesWorld data for every check (16 images)", _data_cmd, needs_cuda=False, timeout=120,
          verify=lambda ctx: {"files": sorted(p.name for p in _data(ctx).glob("*_train.json*"))}),
    Check("sft_tiny_fp32", "SFT of the tiny LLaVA, fp32 (runs on CPU too)", _train("sft", "sft_tiny_fp32", *SFT, *TINY,
          "model.dtype=fp32", "train.precision=fp32"), _metrics("sft_tiny_fp32"), needs_cuda=False, needs=("data",),
          timeout=240),
    Check("sft_tiny_bf16", "SFT, tiny LLaVA, bf16", _train("sft", "sft_tiny_bf16", *SFT, *TINY, *BF16),
          _metrics("sft_tiny_bf16"), needs=("data",), timeout=180),
    Check("dpo_tiny_bf16", "DPO, tiny LLaVA, bf16", _train("dpo", "dpo_tiny_bf16", *DPO, *TINY, *BF16),
          _metrics("dpo_tiny_bf16"), needs=("data",), timeout=180),
    Check("grpo_tiny_bf16", "GRPO, tiny LLaVA, bf16 (HF rollouts)", _train("grpo", "grpo_tiny_bf16", *GRPO,
          "model.tiny=llava", *BF16), _metrics("grpo_tiny_bf16"), needs=("data",), timeout=180),
    Check("model_05b", "build a ~0.47B random LLaVA (benchmarks/_harness.build_model, bf16)",
          _probe("build-05b"), _json_file("model_05b/gpu_check_model.json", ("parameters",)), timeout=300),
    Check("sft_05b_bf16", "SFT, 0.47B, bf16, gradient checkpointing", _train("sft", "sft_05b_bf16", *SFT, *BIG,
          "model.gradient_checkpointing=true"), _metrics("sft_05b_bf16"), needs=("data", "model_05b"), timeout=240),
    Check("sft_packed_05b_bf16", "SFT with data.packing=true (positions restart per sample), 0.47B, bf16, SDPA",
          _train("sft", "sft_packed_05b_bf16", *SFT, *BIG, "data.packing=true"), _metrics("sft_packed_05b_bf16"),
          needs=("data", "model_05b"), timeout=240),
    Check("dpo_05b_bf16", "DPO, 0.47B, bf16", _train("dpo", "dpo_05b_bf16", *DPO, *BIG), _metrics("dpo_05b_bf16"),
          needs=("data", "model_05b"), timeout=240),
    Check("grpo_05b_bf16", "GRPO, 0.47B, bf16", _train("grpo", "grpo_05b_bf16", *GRPO, "model.path={m}", *BF16),
          _metrics("grpo_05b_bf16"), needs=("data", "model_05b"), timeout=240),
    Check("adamw_8bit_05b", "SFT, 0.47B, optim.name=adamw_8bit (bitsandbytes)", _train(
          "sft", "adamw_8bit_05b", *SFT, *BIG, "optim.name=adamw_8bit"), _metrics("adamw_8bit_05b"), packages=BNB,
          needs=("data", "model_05b"), timeout=240),
    Check("qlora_sft", "QLoRA (4-bit NF4) SFT, 0.47B", _train("sft", "qlora_sft", *SFT, *QLORA), _metrics("qlora_sft"),
          packages=BNB, needs=("data", "model_05b"), timeout=240),
    Check("qlora_dpo", "QLoRA (4-bit NF4) DPO, 0.47B", _train("dpo", "qlora_dpo", *DPO, *QLORA), _metrics("qlora_dpo"),
          packages=BNB, needs=("data", "model_05b"), timeout=240),
    Check("attention_sdpa", "SDPA, bf16: a padded batch's logits equal each row's alone",
          _probe("attention", "--impl", "sdpa"), _json_file("attention_sdpa.json", ("max_abs_diff", "tolerance")),
          needs=("model_05b",), timeout=180),
    Check("attention_flash2", "flash-attention 2 (varlen on padded rows) against SDPA, bf16",
          _probe("attention", "--impl", "flash_attention_2"),
          _json_file("attention_flash_attention_2.json", ("max_abs_diff", "tolerance")),
          packages=(("flash-attn", "flash_attn"),), needs=("model_05b",), timeout=180,
          pip_args={"flash_attn": ("--only-binary", ":all:", "--no-build-isolation")}),
    Check("fsdp2_sft", "FSDP2 (configs/accelerate/fsdp.yaml), one process per GPU, 0.47B", _launch("fsdp.yaml"),
          _metrics("fsdp_sft"), needs=("data", "model_05b"), timeout=300),
    Check("fsdp2_offload_sft", "FSDP2 with CPU offload (fsdp_offload.yaml), 0.47B", _launch("fsdp_offload.yaml"),
          _metrics("fsdp_offload_sft"), needs=("data", "model_05b"), timeout=300),
    Check("zero2_sft", "DeepSpeed ZeRO-2 (zero2.yaml) SFT, one process per GPU, 0.47B; the checkpoint reloads whole",
          _launch("zero2.yaml"), _saved("zero2_sft"), packages=DS, needs=("data", "model_05b"), timeout=420),
    Check("zero2_dpo", "DeepSpeed ZeRO-2 (zero2.yaml) DPO (frozen copy as reference), 0.47B; reloads whole",
          _launch("zero2.yaml", "dpo"), _saved("zero2_dpo"), packages=DS, needs=("data", "model_05b"), timeout=420),
    Check("zero3_sft", "DeepSpeed ZeRO-3 (zero3.yaml) SFT, one process per GPU, 0.47B; the gathered checkpoint "
          "reloads whole", _launch("zero3.yaml"), _saved("zero3_sft"), packages=DS, needs=("data", "model_05b"),
          timeout=420),
    Check("zero3_dpo", "DeepSpeed ZeRO-3 (zero3.yaml) DPO (frozen copy as reference), 0.47B; reloads whole",
          _launch("zero3.yaml", "dpo"), _saved("zero3_dpo"), packages=DS, needs=("data", "model_05b"), timeout=420),
    Check("zero3_offload_sft", "ZeRO-3 with optimizer offload to CPU (zero3_offload.yaml), 0.47B",
          _launch("zero3_offload.yaml"), _metrics("zero3_offload_sft"), packages=DS, needs=("data", "model_05b"),
          timeout=420),
    Check("vllm_rollout", "rollout backend 'vllm' with images (its own venv: vllm pins its torch), 0.47B",
          _probe("vllm"), _json_file("vllm_rollout.json", ("rows", "max_abs_logprob_diff")),
          packages=(("vllm", "vllm"),), needs=("data", "model_05b"), timeout=600, venv="vllm", install_repo=True),
    Check("dpo_bench_7b", "benchmarks/dpo_throughput.py GPU preset (LLaVA-1.5-7B shapes, bf16, LoRA): MFU",
          _bench, _bench_verify, timeout=600),
    Check("grpo_bench_7b", "benchmarks/grpo_throughput.py GPU preset (LLaVA-1.5-7B shapes, bf16, LoRA; 4 prompts x 8 "
          "samples of 128 tokens): samples/s, vision encodes/sample, peak GPU memory, ours / TRL GRPOTrainer",
          _grpo_bench, _grpo_bench_verify, timeout=900),
]


# ---------------------------------------------------------------------------------- probes
def build_05b(out: Path) -> None:
    import importlib.util
    spec = importlib.util.spec_from_file_location("_harness", ROOT / "benchmarks" / "_harness.py")
    bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)   # its dataclasses look it up
    spec.loader.exec_module(bench)
    d = bench.build_model(ARCH_05B, out / "model_05b", dtype="bf16")
    from transformers import AutoConfig
    from safetensors import safe_open
    n = 0
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    AutoConfig.from_pretrained(str(d))   # loads back
    (d / "gpu_check_model.json").write_text(json.dumps({"parameters": n, "arch": ARCH_05B}))


def attention(out: Path, impl: str, device: str = "cuda") -> None:
    """Left-padded batch of two prompts of different lengths: each row's last logits against the
    row run alone (sdpa), or flash-attention 2's against SDPA's on the same padded batch."""
    import torch
    from transformers import AutoModelForImageTextToText
    d = out / "model_05b"
    load = dict(dtype=torch.bfloat16, device_map=device)
    model = AutoModelForImageTextToText.from_pretrained(str(d), attn_implementation=impl, **load).eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, 1000, (n,), generator=g) for n in (37, 100)]
    L = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(L - len(r), dtype=torch.long), r]) for r in rows]).to(device)
    mask = torch.stack([torch.cat([torch.zeros(L - len(r)), torch.ones(len(r))]) for r in rows]).long().to(device)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        if impl == "sdpa":
            ref = torch.cat([model(input_ids=r[None].to(device)).logits[:, -1].float() for r in rows])
        else:
            sdpa = AutoModelForImageTextToText.from_pretrained(str(d), attn_implementation="sdpa", **load).eval()
            ref = sdpa(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    diff = float((got - ref).abs().max())
    tol = 0.05 * float(ref.abs().max())   # bf16 rounding over 30 layers
    (out / f"attention_{impl}.json").write_text(json.dumps({"max_abs_diff": diff, "tolerance": tol}))
    if not diff <= tol:
        raise SystemExit(f"{impl}: padded-batch logits differ by {diff} (tolerance {tol})")


def vllm_rollout(out: Path) -> None:
    """rollout(..., backend='vllm') on the 0.47B model with ShapesWorld images; the recomputed
    log-probs of vLLM's samples against the ones vLLM reported."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    import vllm
    from vlmalign.data.batching import ImageLoader
    from vlmalign.data.readers import read_file
    from vlmalign.models import load_adapter
    from vlmalign.rollout import SamplingConfig, rollout
    d, data = out / "model_05b", out / "data"
    ad = load_adapter(str(d), dtype=torch.bfloat16)
    ad.model.to("cuda")
    llm = vllm.LLM(model=str(d), dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=1024,
                   limit_mm_per_prompt={"image": 1}, seed=0)
    recs = read_file(data / "rl_train.json", kind="rl_prompt")[:4]
    b = rollout(ad, recs, ImageLoader(ad, data), SamplingConfig(max_new_tokens=8, temperature=1.0), k=2, seed=0,
                backend="vllm", vllm_engine=llm)
    m = b.response_mask
    diff = float((b.logprobs - b.sampling_logprobs)[m].abs().max())
    (out / "vllm_rollout.json").write_text(json.dumps({"rows": int(b.response_ids.shape[0]), "max_abs_logprob_diff":
                                                       diff, "texts": b.texts[:4], "vllm": vllm.__version__}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="gpu_check probes")
    p.add_argument("probe", choices=("build-05b", "attention", "vllm"))
    p.add_argument("--out", required=True)
    p.add_argument("--impl", default="sdpa")
    p.add_argument("--device", default="cuda", help="attention: where to run (cpu: a smoke test of the probe)")
    a = p.parse_args(argv)
    out = Path(a.out)
    {"build-05b": lambda: build_05b(out), "attention": lambda: attention(out, a.impl, a.device),
     "vllm": lambda: vllm_rollout(out)}[a.probe]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
