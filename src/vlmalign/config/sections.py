"""Config sections shared by every training method."""

from __future__ import annotations

from dataclasses import dataclass

from . import opt, with_defaults


@dataclass
class ModelSection:
    path: str | None = opt(None, "local model directory or hub id to start from")
    tiny: str | None = opt(None, "instead of path: build a random-init tiny model of this family offline")
    dtype: str = opt("auto", "weights dtype: auto (fp32 on CPU, bf16 on GPU when supported), fp32, bf16, fp16",
                     ("auto", "fp32", "bf16", "fp16"))
    trust_remote_code: bool = opt(False, "allow custom model code from the model directory")
    train_vision: bool = opt(False, "train the vision tower")
    train_projector: bool = opt(True, "train the projector")
    train_language: bool = opt(True, "train the language model (and output head)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    alignment_levels: int = opt(0, "AlignGPT alignment levels: give a LLaVA or composed model N indicator "
                                   "embeddings (N-1 local levels + 1 global) and a gate before training (0: "
                                   "off; a model that has them keeps its own). Pretraining then needs each "
                                   "record's integer similarity bucket 0..N-1 (vlmalign data align-levels); "
                                   "the indicators stay frozen outside pretraining (docs/MODELS.md)", ge=0)


@dataclass
class LoraSection:
    enabled: bool = opt(False, "train LoRA adapters instead of full weights (language model Linear layers)")
    r: int = opt(16, "LoRA rank", ge=1)
    alpha: int = opt(32, "LoRA alpha (scaling = alpha / r)", gt=0)
    dropout: float = opt(0.0, "LoRA dropout", ge=0, lt=1)
    targets: list[str] = opt([], "module names to wrap; empty: every Linear of the language model")
    include_vision: bool = opt(False, "also wrap the vision tower's Linear layers")
    qlora: bool = opt(False, "load the base model in 4-bit (bitsandbytes, CUDA only)")


@dataclass
class DataSection:
    train_file: str | None = opt(None, "training data file (any supported format)")
    eval_file: str | None = opt(None, "held-out data file for evaluation")
    image_root: str | None = opt(None, "directory image paths are resolved in (and confined to); "
                                       "default: the data file's directory")
    format: str = opt("auto", "data format (auto-detected by default)")
    max_length: int = opt(1024, "maximum tokens per sample; longer samples are refused, never cut", ge=1)
    on_error: str = opt("raise", "bad records: raise (stop with the record's location) or skip "
                                 "(drop, count and report)", ("raise", "skip"))
    max_pixels: int | None = opt(8192 * 8192, "pixel budget per image: an image whose header declares more "
                                              "is refused (or skipped) before decoding; null: no budget "
                                              "besides PIL's own limit", ge=1)
    max_images: int | None = opt(None, "images per sample: a record whose prompt holds more is refused (or "
                                       "skipped), naming the record and the limit; null: no cap", ge=1)
    max_sample_pixels: int | None = opt(None, "pixel budget per sample: a record whose images hold more pixels "
                                              "together (width x height summed, from the headers) is refused "
                                              "(or skipped); null: no budget", ge=1)
    max_train_samples: int | None = opt(None, "use only the first N training records (null: all)", ge=1)
    max_eval_samples: int | None = opt(None, "use only the first N evaluation records (null: all)", ge=1)


@dataclass
class OptimSection:
    name: str = opt("adamw", "optimizer: adamw (torch), adamw_8bit or paged_adamw_8bit (bitsandbytes 8-bit "
                             "states; CUDA only, refused elsewhere)", ("adamw", "adamw_8bit", "paged_adamw_8bit"))
    lr: float = opt(2e-5, "peak learning rate", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    betas: list[float] = opt([0.9, 0.999], "AdamW betas (two numbers)", ge=0, lt=1)
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    schedule: str = opt("cosine", "learning-rate schedule after warm-up", ("cosine", "linear", "constant"))
    warmup_steps: int = opt(0, "linear warm-up steps (overrides warmup_ratio when > 0)", ge=0)
    warmup_ratio: float = opt(0.03, "warm-up as a fraction of total steps", ge=0, le=1)
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this value (0: no clipping)", ge=0)
    projector_lr: float | None = opt(None, "separate learning rate for the projector (default: lr)", gt=0)
    vision_lr: float | None = opt(None, "separate learning rate for the vision tower when it is trained "
                                        "(default: lr; LLaVA-NeXT uses a tenth of the LM's)", gt=0)


@dataclass
class TrainSection:
    output_dir: str = opt("runs/run", "run directory: config, metrics.jsonl, checkpoints, plots, report")
    seed: int = opt(0, "random seed (data order, init of new heads, dropout)", ge=0)
    epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)", gt=0)
    max_steps: int = opt(0, "optimizer steps to run (0: derive from epochs)", ge=0)
    batch_size: int = opt(8, "micro-batch size per process", ge=1)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", ge=1)
    precision: str = opt("auto", "auto (bf16 on GPU when supported, else fp32), fp32, bf16, fp16",
                         ("auto", "fp32", "bf16", "fp16"))
    sharding: str = opt("none", "none: every process holds the whole model (DDP); fsdp2: the engine shards "
                                "parameters, gradients and optimizer state over the processes with torch's "
                                "FSDP2 (fully_shard), on CPU (gloo) or GPUs; an accelerate launch with an FSDP "
                                "config asks for the same (offline methods, GRPO, and PPO with its critic)",
                        ("none", "fsdp2"))
    log_every: int = opt(1, "log metrics every N optimizer steps", ge=1)
    eval_every: int = opt(0, "evaluate every N steps (0: only at the end)", ge=0)
    save_every: int = opt(0, "checkpoint every N steps (0: only at the end)", ge=0)
    keep_last: int = opt(2, "checkpoints to keep (0: all)", ge=0)
    resume: bool = opt(False, "continue from the latest checkpoint in output_dir (the batch settings must match)")
    overwrite: bool = opt(False, "start afresh in an output_dir that holds an earlier run, deleting its "
                                 "checkpoints, metrics and plots (without it or resume, such a run is refused)")
    report_to: list[str] = opt([], "trackers through accelerate: tensorboard, wandb, trackio")
    progress: bool = opt(True, "show a progress bar on a terminal")
    progress_seconds: float = opt(30.0, "without a bar (output not a terminal, or progress=false): a progress "
                                        "line every N seconds (0: none)", ge=0)


# defaults several methods share (each method's config names the sections it starts from)
FrozenEncoderModel = with_defaults(ModelSection, "FrozenEncoderModel", train_vision=False, train_projector=False)
FrozenEncoderModel.__doc__ = ("The language model learns; vision tower and projector stay frozen, so one image "
                              "encoding serves the policy, its reference (and sampling, the critic) each step.")
PreferenceOptim = with_defaults(OptimSection, "PreferenceOptim", lr=5e-6, warmup_ratio=0.1)
PreferenceOptim.__doc__ = "A DPO-sized learning rate with a 10% warm-up (DPO, KTO)."
RLOptim = with_defaults(OptimSection, "RLOptim", lr=1e-6, schedule="constant", warmup_ratio=0.0)
RLOptim.__doc__ = "A small constant learning rate per optimizer step (GRPO, PPO)."
