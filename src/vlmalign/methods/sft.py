"""Projector pretraining (LLaVA stage 1) and supervised fine-tuning.

Both optimise next-token cross-entropy on assistant turns; they differ in defaults: pretraining
trains the projector only on caption data, SFT trains any chosen subset of vision tower,
projector and language model, in full or with LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, opt, section, with_defaults
from ..config.sections import DataSection, LoraSection, ModelSection, OptimSection, TrainSection
from ..data.batching import IGNORE_INDEX, SFTCollator, check_pack_budget
from ..engine.scaling import ScalingError, engine_shards
from ..engine.trainer import Trainer, TrainResult
from ..losses.sft import sft_loss
from ..data.loading import load_examples, load_splits
from ..eval.during_training import EvalTasksSection
from .setup import prepare_trainable, start_run
from .registry import Method


@dataclass
class EvalSection(EvalTasksSection):
    vqa_file: str | None = opt(None, "VQA file (image/question/answer) scored by exact match after training")
    pope_file: str | None = opt(None, "POPE-style yes/no file scored with accuracy, F1 and yes-ratio")
    max_new_tokens: int = opt(8, "tokens generated per answer", ge=1)
    batch_size: int = opt(32, "prompts per generation batch", ge=1)
    max_samples: int | None = opt(None, "score only the first N records of each file", ge=1)


@dataclass
class SFTData(DataSection):
    """The shared data options plus sequence packing (SFT and pretraining only)."""
    packing: bool = opt(False, "pack each micro-batch's samples into as few rows of at most data.pack_length "
                               "tokens as hold them, whole (images never split), with positions restarting "
                               "and attention kept inside each sample: less padding, same loss and gradients")
    pack_length: int | None = opt(None, "with data.packing: tokens per packed row (null: data.max_length); "
                                        "at least data.max_length, so every sample fits a row", ge=1)

    def check(self) -> None:
        if self.packing and self.pack_length is not None and self.pack_length < self.max_length:
            raise ConfigError(f"data.pack_length ({self.pack_length}) is below data.max_length ({self.max_length}): "
                              "a sample of up to max_length tokens would not fit a packed row, and a pack never "
                              "cuts a sample; raise data.pack_length or lower data.max_length")

    @property
    def pack_budget(self) -> int | None:
        """Tokens per packed row, or None without packing."""
        if not self.packing:
            return None
        return self.pack_length if self.pack_length is not None else self.max_length


@dataclass
class SFTConfig:
    model: ModelSection = section(ModelSection, "model to start from and which parts to train")
    lora: LoraSection = section(LoraSection, "LoRA / QLoRA")
    data: SFTData = section(SFTData, "training and evaluation data, sequence packing")
    optim: OptimSection = section(OptimSection, "optimizer and learning-rate schedule")
    train: TrainSection = section(TrainSection, "loop, batch sizes, precision, checkpoints")
    eval: EvalSection = section(EvalSection, "generation-based evaluation (vqa_file, pope_file) and benchmark "
                                             "evals (eval.tasks)")


ProjectorOnlyModel = with_defaults(ModelSection, "ProjectorOnlyModel", train_vision=False, train_projector=True,
                                   train_language=False)
PretrainOptim = with_defaults(OptimSection, "PretrainOptim", lr=1e-3)


@dataclass
class PretrainConfig(SFTConfig):
    """Projector pretraining (LLaVA stage 1): only the projector learns, at a higher rate."""
    model: ProjectorOnlyModel = section(ProjectorOnlyModel, "model to start from; by default only the projector "
                                                            "trains")
    optim: PretrainOptim = section(PretrainOptim, "optimizer and learning-rate schedule")


class SFTMethod:
    """Cross-entropy on supervised tokens, images encoded once per micro-batch."""

    def __init__(self, adapter):
        self.adapter = adapter

    def count_items(self, batch) -> int:
        return int((batch.tensors["labels"][:, 1:] != IGNORE_INDEX).sum())

    def compute_loss(self, batch, num_items):
        t = batch.tensors
        labels = t["labels"]
        enc = batch.encode(self.adapter)
        # Only positions that predict a supervised token need the output head (the union over
        # rows): prompt and image positions never build full-vocabulary logits.
        sup = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
        pos = torch.nonzero(sup).squeeze(-1)                 # (P,) positions t predicting t+1
        # per-record forward inputs the collator added (AlignGPT's alignment_level; packed rows'
        # segment_ids, from which the adapter restarts positions per sample and keeps attention
        # inside each one)
        extra = {k: v for k, v in t.items() if k not in ("input_ids", "attention_mask", "labels")}
        out = self.adapter.forward(t["input_ids"], t["attention_mask"], encoded=enc,
                                   image_indices=batch.image_indices, logits_to_keep=pos, use_cache=False,
                                   **extra)
        logits = out.logits                                    # (B, P, V): logit p predicts token p+1
        targets = labels[:, 1:][:, pos]                        # (B, P)
        loss, m = sft_loss(logits, targets, num_items)
        return loss, {"loss": m["nll_sum"], "items": m["tokens"]}


def make_evaluator(adapter, cfg: SFTConfig, eval_examples, collate):
    """Eval loss on held-out conversations + VQA/POPE generation metrics when files are given."""
    from ..eval.vqa import evaluate_pope, evaluate_vqa

    def checked(path):
        """The file's prompts, each tokenized and its images loaded now (before training), so a
        missing image or an over-long prompt stops the run with file and record, or is skipped
        and counted under data.on_error=skip."""
        def tok(rec, imgs):
            return {"input_ids": adapter.tokenize_prompt(rec.prompt, imgs, max_length=max_prompt).input_ids}
        examples, loader, _ = load_examples(path, cfg.data, adapter, tok, kind="rl_prompt",
                                            limit=cfg.eval.max_samples)
        return [e.record for e in examples], loader

    max_prompt = cfg.data.max_length - cfg.eval.max_new_tokens
    vqa = checked(cfg.eval.vqa_file) if cfg.eval.vqa_file else None
    pope = checked(cfg.eval.pope_file) if cfg.eval.pope_file else None
    method = SFTMethod(adapter)

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        was = adapter.model.training
        adapter.model.eval()
        out = {}
        if eval_examples:
            tot = n = 0.0
            for i in range(0, len(eval_examples), cfg.train.batch_size):
                b = collate(eval_examples[i:i + cfg.train.batch_size]).to(adapter.device)
                k = method.count_items(b)
                loss, _ = method.compute_loss(b, k)
                tot += loss.item() * k
                n += k
            out["loss"] = tot / max(n, 1)
        if vqa is not None:
            m, _ = evaluate_vqa(adapter, vqa[0], vqa[1], max_new_tokens=cfg.eval.max_new_tokens,
                                batch_size=cfg.eval.batch_size)
            out.update(m)
        if pope is not None:
            out.update(evaluate_pope(adapter, pope[0], pope[1], batch_size=cfg.eval.batch_size))
        if was:
            adapter.model.train()
        return out

    return evaluate


def train_sft(cfg: SFTConfig, adapter=None, callbacks=()) -> tuple[TrainResult, object]:
    """Run SFT (or pretraining, with its config). Returns the result and the trained adapter."""
    adapter = start_run(cfg, adapter)
    # the stage families may read (AlignGPT: the record's alignment bucket in pretraining, frozen
    # indicators in fine-tuning)
    stage = "pretrain" if isinstance(cfg, PretrainConfig) else "finetune"
    if (cfg.eval.vqa_file or cfg.eval.pope_file) and engine_shards(cfg.train):
        raise ScalingError("eval.vqa_file / eval.pope_file generate answers with the model, which FSDP2 sharding "
                           "(train.sharding=fsdp2 or an FSDP launch) does not run; evaluate the saved checkpoint "
                           "with `vlmalign eval` instead")
    budget = cfg.data.pack_budget
    if budget is not None:
        adapter.check_packing()

    def tok(rec, imgs):
        t = adapter.tokenize_record(rec, imgs, max_length=cfg.data.max_length)
        return {"input_ids": t.input_ids, "labels": t.labels, **adapter.record_inputs(rec, stage=stage)}

    examples, loader, eval_examples, eval_loader = load_splits(
        cfg.data, lambda path, limit: load_examples(path, cfg.data, adapter, tok, kind="conversation",
                                                    limit=limit)[:2])
    if budget is not None:  # every sample must fit a row whole: refused now, not at its step
        check_pack_budget(examples, budget, loader)
        if eval_examples:
            check_pack_budget(eval_examples, budget, eval_loader)
    collate = SFTCollator(loader, adapter.tokenizer.pad_token_id, pack_length=budget)
    model, projector, vision = prepare_trainable(adapter, cfg, stage)
    evaluate = None
    if eval_examples or cfg.eval.vqa_file or cfg.eval.pope_file:
        ecollate = (SFTCollator(eval_loader, adapter.tokenizer.pad_token_id, pack_length=budget)
                    if eval_examples else None)
        evaluate = make_evaluator(adapter, cfg, eval_examples, ecollate)
    trainer = Trainer(method=SFTMethod(adapter), model=model, processor=adapter.processor, examples=examples,
                      collate=collate, train_cfg=cfg.train, optim_cfg=cfg.optim, config=cfg, evaluate=evaluate,
                      adapters=[adapter], projector_names=projector, vision_names=vision, callbacks=callbacks)
    return trainer.train(), adapter


METHODS = (
    Method("pretrain", "projector pretraining on captions (LLaVA stage 1)",
           PretrainConfig, train_sft),
    Method("sft", "supervised fine-tuning (full, LoRA or QLoRA)",
           SFTConfig, train_sft),
)
