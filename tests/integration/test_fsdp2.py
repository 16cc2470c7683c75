"""FSDP2 sharding (``train.sharding=fsdp2``: engine/sharding.py) on two CPU processes over gloo,
against one unsharded process with the same global batch, on the tiny random-init LLaVA.

One torchrun launch (``fsdp_worker.py``) trains every run of :data:`RUNS` in turn, sharded, and
then starts :data:`KILLED` (the first run's settings), which is SIGKILLed (launcher and both
processes) after its first checkpoint and resumed by an ``accelerate launch`` with
``configs/accelerate/fsdp.yaml`` (the FSDP launch a GPU machine uses, here on CPU processes).

Adam's eps is 1e-4 in every run: with the default 1e-8, an entry whose gradient is ~0 (a reward
head's bias: only score differences matter; patch-embedding weights on flat image regions) gets
an update of about lr whose sign follows the rounding of that ~0, so the sharded and unsharded
weights drifted apart by up to 4.5e-5 (1e-3 for the bias) in 3 steps while every loss agreed to
6e-7 (measured). With eps 1e-4 such entries move in proportion to their gradient, and the weights
compare what sharding computes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from vlmalign.config import load_config
from vlmalign.methods.registry import get
from vlmalign.engine.scaling import ScalingError
from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp_worker.py")

# name -> (method, training file, options, per-process batch size); one process: twice the batch
RUNS = {
    "sft-full-vision": ("sft", "vqa_train.json", ["model.train_vision=true", "train.save_every=1",
                                                  "train.keep_last=10"], 2),
    "sft-lora-accum": ("sft", "vqa_train.json", ["lora.enabled=true", "lora.r=4", "train.grad_accum=2"], 1),
    "rm-lora-vision": ("rm", "dpo_train.json", ["lora.enabled=true", "lora.r=4", "model.train_vision=true"], 2),
    "dpo-full": ("dpo", "dpo_train.json", [], 2),
    "dpo-lora-vision-cached": ("dpo", "dpo_train.json", ["lora.enabled=true", "lora.r=4", "model.train_vision=true",
                                                         "dpo.precompute_ref_logps=true"], 2),
}
# other families: a one-step full SFT run each (vision tower trained too, so every group is
# sharded and gathered), built with model.tiny in each process (same seed, same weights).
# instructblip, llava_next and mllama: the image encoding reads a bare parameter that no unit
# holds (query_tokens, image_newline, the tower's class_embedding), kept whole on every process
# (the adapter's replicated_params) with its gradient averaged by the engine.
# InstructBLIP's Q-Former has dropout (0.1, as the real model), which draws other masks for two
# one-row batches than for one two-row batch (sharded or not: the losses differed by 0.012 under
# DDP too), so it runs from a saved tiny model with its dropout set to 0 (_without_dropout).
FAMILIES = ["gemma3", "idefics3", "instructblip", "internvl", "llava_next", "mllama", "paligemma", "qwen2_5_vl",
            "qwen2_vl", "qwen3_vl", "smolvlm", "vlmalign_aligngpt", "vlmalign_resampler"]
NO_DROPOUT = {"instructblip"}
# the kinds beyond the tiny builders (tiny_kinds.py): composed models with the other projectors and
# the generic fallback, saved to the world folder by the fixture and run from there
SAVED_KINDS = {"composed-linear": "vlmalign_resampler:linear", "composed-mlp2x_gelu": "vlmalign_resampler:mlp2x_gelu",
               "composed-qformer": "vlmalign_resampler:qformer", "generic": "generic"}


def family_run(name: str, saved: bool) -> tuple:
    """A one-step full SFT run (vision trained too) of a family (``model.tiny``) or of a model
    saved at ``{world}/name``."""
    return ("sft", "vqa_train.json", [f"model.path={{world}}/{name}" if saved else f"model.tiny={name}",
                                      "model.train_vision=true", "train.max_steps=1"], 1)


RUNS.update({f"sft-{f}": family_run(f, f in NO_DROPOUT) for f in FAMILIES})
RUNS.update({f"sft-{k}": family_run(k, True) for k in SAVED_KINDS})
KILLED = "sft-killed"


def _options(world: Path, name: str, out: Path, processes: int) -> list[str]:
    method, data, extra, bs = RUNS[name]
    extra = [o.replace("{world}", str(world)) for o in extra]
    tiny = any(o.startswith(("model.tiny=", "model.path=")) for o in extra)   # a family's run
    model = [] if tiny else [f"model.path={world / 'model'}"]
    opts = [*model, f"data.train_file={world / 'data' / data}", f"data.max_length={512 if tiny else 256}",
            "train.max_steps=3", "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.eps=1e-4",
            f"train.batch_size={bs * (2 // processes)}", f"train.output_dir={out}", *extra]
    if method == "dpo":
        opts.append(f"dpo.ref_cache_dir={out.parent / (out.name + '-ref-cache')}")
    return opts


def _without_dropout(family: str, out: Path) -> None:
    """The tiny ``family`` saved to ``out`` with every dropout probability of its config at 0."""
    from vlmalign.models import save_tiny

    def zero(d):
        for k, v in d.items():
            if isinstance(v, dict):
                zero(v)
            elif "dropout" in k and isinstance(v, float):
                d[k] = 0.0
    if not out.exists():
        save_tiny(family, str(out))
        cfg = json.loads((out / "config.json").read_text())
        zero(cfg)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


def launch_sharded(world: Path, root: Path, names: list[str], kill: bool = False) -> None:
    """Train the runs ``names`` of :data:`RUNS` sharded over two processes in one torchrun launch
    (fsdp_worker.py), writing each under ``root``. ``kill``: then start :data:`KILLED` and SIGKILL
    the launcher and both processes after its first checkpoint."""
    spec = [{"method": RUNS[n][0], "overrides": [*_options(world, n, root / n, 2), "train.sharding=fsdp2"]}
            for n in names]
    if kill:
        spec.append({"method": "sft", "overrides": [*_options(world, "sft-full-vision", root / KILLED, 2),
                                                    "train.sharding=fsdp2"]})
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    log = root / "launch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(free_port()), str(WORKER), str(root / "spec.json")],
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    if not kill:
        assert proc.wait(timeout=900) == 0, _tail(log)
        return
    try:
        deadline = time.time() + 600
        while not (root / KILLED / "checkpoints" / "step-1").exists():
            assert proc.poll() is None, f"the launch ended before {KILLED} could be killed:\n{_tail(log)}"
            assert time.time() < deadline, _tail(log)
            time.sleep(0.05)
    finally:
        # the launcher and both processes (torchrun starts each in a session of its own) at once,
        # as when the machine is lost
        try:
            procs = [proc, *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        proc.wait()
        psutil.wait_procs(procs[1:], timeout=30)


@pytest.fixture(scope="module")
def sharded(shapes_llava, tmp_path_factory):
    """The runs' directory after the launch: RUNS trained, KILLED killed after its step-1."""
    from tiny_kinds import build_kind
    root = tmp_path_factory.mktemp("fsdp2")
    for f in NO_DROPOUT:
        _without_dropout(f, shapes_llava / f)
    for name, kind in SAVED_KINDS.items():
        if not (shapes_llava / name).exists():
            torch.manual_seed(0)
            model, processor = build_kind(kind)
            model.save_pretrained(shapes_llava / name, safe_serialization=True)
            processor.save_pretrained(shapes_llava / name)
    launch_sharded(shapes_llava, root, list(RUNS), kill=True)
    return root


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["train/loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _reloaded(model_dir: Path) -> dict:
    """A checkpoint's ``model/`` loaded with plain transformers (LoRA: its adapter through PEFT
    over the base it names), as a state dict; a reward model's head read from its file."""
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel
        base = json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), str(model_dir))
    else:
        model = AutoModelForImageTextToText.from_pretrained(str(model_dir))
        assert json.loads((model_dir / "config.json").read_text())["architectures"] == [type(model).__name__]
    sd = dict(model.state_dict())
    if (model_dir / "scalar_head.safetensors").exists():
        sd.update({f"head.{k}": v for k, v in load_file(str(model_dir / "scalar_head.safetensors")).items()})
    return sd


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_sharded_processes_match_one(sharded, shapes_llava, tmp_path, name):
    two_sharded_processes_match_one(sharded, shapes_llava, tmp_path, name)


def two_sharded_processes_match_one(sharded: Path, world: Path, tmp_path: Path, name: str) -> None:
    """Run ``name`` of :data:`RUNS` in one unsharded process and compare it with the sharded run
    under ``sharded``: losses, reloaded weights, and what each process held and encoded."""
    two = sharded / name
    for rank in (0, 1):
        assert (two / f"done-rank{rank}").exists(), _tail(sharded / "launch.log")
    method = get(RUNS[name][0])
    one = tmp_path / "one"
    method.train(load_config(method.config, None, _options(world, name, one, 1)))
    steps = 1 if "train.max_steps=1" in RUNS[name][2] else 3
    la, lb = _losses(one), _losses(two)
    assert len(la) == len(lb) == steps
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5, (la, lb)
    wa, wb = (_reloaded(d / "checkpoints" / f"step-{steps}" / "model") for d in (one, two))
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= 1e-5, worst
    for rank in (0, 1):
        rows = [json.loads(x) for x in (two / f"encodes-rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        for r in rows:
            # really sharded: each process holds about half of every parameter
            assert r["sharded"] and r["local_numel"] <= 0.55 * r["full_numel"], r
            # one encoder call per micro-batch, over that micro-batch's unique images
            assert r["encode_calls"] == r["unique_images"] and all(n >= 1 for n in r["unique_images"]), r


@pytest.mark.slow
def test_a_sigkilled_sharded_run_resumes_through_an_fsdp_launch(sharded, shapes_llava):
    killed, full = sharded / KILLED, sharded / "sft-full-vision"
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert "step-1" in done and "step-3" not in done
    for d in done:   # written atomically: every step-N is whole
        ck = killed / "checkpoints" / d
        assert (ck / "trainer_state.pt").exists() and (ck / "model" / "model.safetensors").exists()
    # the optimizer state was gathered: full tensors by parameter name, for every parameter
    from transformers import LlavaForConditionalGeneration
    st = torch.load(killed / "checkpoints" / "step-1" / "trainer_state.pt", weights_only=True)
    params = dict(LlavaForConditionalGeneration.from_pretrained(str(shapes_llava / "model")).named_parameters())
    # every parameter that got a gradient (not the tower's post_layernorm: LLaVA reads the layer before)
    assert {k for k in params if "post_layernorm" not in k} == set(st["optimizer"]["state"])
    for k, v in st["optimizer"]["state"].items():
        assert v["exp_avg"].shape == v["exp_avg_sq"].shape == params[k].shape, k
    assert st["layout"]["sharding"] == "fsdp2" and st["layout"]["processes"] == 2
    opts = [o for o in _options(shapes_llava, "sft-full-vision", killed, 2)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
                        "--main_process_port", str(free_port()), "-m", "vlmalign", "train", "sft", *opts, "train.resume=true"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout + r.stderr
    assert "FSDP2:" in out and "units + the root over 2 processes (cpu)" in out   # sharded by the engine
    assert f"resumed from {killed / 'checkpoints' / done[-1]}" in out
    wa, wb = (load_file(str(d / "checkpoints" / "step-3" / "model" / "model.safetensors")) for d in (full, killed))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-6, k
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]   # the killed run's step 1, then steps 2 and 3 once each


def test_what_sharding_does_not_run_is_refused_before_training(shapes_llava, tmp_path):
    from vlmalign.methods.sft import SFTConfig
    w = shapes_llava
    base = [f"model.path={w / 'model'}", "train.progress=false", "train.max_steps=1", "train.sharding=fsdp2"]
    cfg = load_config(SFTConfig, None, [*base, f"data.train_file={w / 'data' / 'vqa_train.json'}",
                                        f"eval.vqa_file={w / 'data' / 'vqa_eval.json'}",
                                        f"train.output_dir={tmp_path / 'sft'}"])
    with pytest.raises(ScalingError, match="eval.vqa_file / eval.pope_file generate answers"):
        get("sft").train(cfg)
    # (GRPO and PPO, its critic included, shard: tests/integration/test_rl_processes.py)
