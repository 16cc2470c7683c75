"""Reward models on any supported VLM: the family model plus a scalar head
(:class:`vlmalign.models.scalar_head.ScalarModel`) trained on preference pairs or ranked lists.

Data: every record is a prompt (with its images) and two or more candidate responses, best
first: a :class:`PreferencePair` gives (chosen, rejected) (the rejected side may use other
images), a :class:`RankedList` gives K responses. One record is one training item. All
candidates of a record go into the same batch and share the record's images, which are
encoded once per batch (``Batch.encode``), however many candidates use them.

Loss (``rm.list_loss``; arithmetic in :mod:`vlmalign.losses.reward`):

* ``pairwise``: Bradley-Terry on every (better, worse) pair the ranking implies, averaged over
  the record's pairs (InstructGPT, Ouyang et al. 2022: all C(K, 2) comparisons of a prompt form
  one batch element). With ``rm.margin`` each pair's margin is ``rm.margin_scale`` times the
  difference of the record's scores (Llama 2's margin loss, Touvron et al. 2023).
* ``plackett_luce``: the listwise likelihood of the whole ranking. For K = 2 both are equal.

Metrics (train and ``data.eval_file``): ``loss``, ``accuracy`` (share of pairs ordered right),
``margin`` (mean score gap of the pairs), ``chosen_reward`` / ``rejected_reward`` (best and
worst candidate's score).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import opt, section
from ..config.sections import DataSection, LoraSection, ModelSection, OptimSection, TrainSection
from ..data.loading import load_splits
from ..engine.trainer import Trainer, TrainResult, base_param_name
from ..errors import VlmalignError
from ..losses.reward import bradley_terry_loss, plackett_luce_loss
# the reward model's record layout and scoring live in rewards/scoring.py (also re-exported here)
from ..rewards.scoring import RMCollator, add_rejected_images, candidates, make_tokenizer, score_records  # noqa: F401
from .setup import prepare_trainable, start_run
from .registry import Method

LIST_LOSSES = ("pairwise", "plackett_luce")

log = logging.getLogger(__name__)


@dataclass
class RMSection:
    list_loss: str = opt("pairwise", "pairwise: Bradley-Terry on every implied pair, averaged per record "
                                     "(InstructGPT); plackett_luce: likelihood of the whole ranking",
                         LIST_LOSSES)
    margin: bool = opt(False, "pairwise only: ask for a score gap of margin_scale x the difference of the "
                              "record's scores (ranked lists: 'scores'; pairs: a numeric 'margin' field); "
                              "records without them are refused")
    margin_scale: float = opt(1.0, "multiplies the score difference used as margin", ge=0)

    def check(self) -> None:
        if self.margin and self.list_loss != "pairwise":
            raise VlmalignError("rm.margin applies to rm.list_loss=pairwise only")


@dataclass
class RMConfig:
    model: ModelSection = section(ModelSection, "model to start from and which parts to train")
    lora: LoraSection = section(LoraSection, "LoRA / QLoRA")
    data: DataSection = section(DataSection, "preference pairs or ranked lists (train and held-out)")
    optim: OptimSection = section(OptimSection, "optimizer and learning-rate schedule")
    train: TrainSection = section(TrainSection, "loop, batch sizes (records), precision, checkpoints")
    rm: RMSection = section(RMSection, "reward-model loss")


# ----------------------------------------------------------------------------- records
def load_rm_examples(path, data_cfg, adapter, *, train: bool, margin: bool = False, limit=None):
    """Read and tokenize a pairs / ranked-lists file (errors name file, record and field)."""
    from ..data.batching import SkipReport, prepare
    from ..data.loading import image_loader, read_records, report_examples
    recs, rep1 = read_records(path, data_cfg, limit=limit)
    loader = image_loader(adapter, data_cfg, path)
    tok = make_tokenizer(adapter, loader, data_cfg.max_length, train=train, margin=margin)
    examples, rep2 = prepare(recs, tok, loader, on_error=data_cfg.on_error)
    rep = SkipReport(skipped=rep1.skipped + rep2.skipped, total=rep1.total)
    report_examples(path, examples, rep)
    add_rejected_images(examples)
    return examples, loader, rep


# ----------------------------------------------------------------------------- the method
def _per_example_mean(x: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """(P,) pair values -> (n,) mean over each example's pairs."""
    tot = x.new_zeros(n).index_add(0, owner, x)
    cnt = x.new_zeros(n).index_add(0, owner, torch.ones_like(x))
    return tot / cnt


def record_losses(scores: torch.Tensor, t: dict, rm_cfg) -> tuple[torch.Tensor, dict]:
    """Row scores (rows,) -> per-record losses (E,) and per-record stats (E,)."""
    slots = t["slots"]
    E = slots.shape[0]
    if rm_cfg.list_loss == "plackett_luce":
        mask = slots >= 0
        S = scores[slots.clamp(min=0)]                                  # (E, K) best first
        losses, st = plackett_luce_loss(S, mask)
        last = mask.sum(dim=1) - 1
        worst = S.detach().gather(1, last[:, None]).squeeze(1)
        return losses, {"accuracy": st["accuracy"], "margin": st["margin"], "chosen_reward": st["chosen_reward"],
                        "rejected_reward": worst}
    margin = t["pair_margin"] * rm_cfg.margin_scale if rm_cfg.margin else None
    lp, st = bradley_terry_loss(scores[t["pair_better"]], scores[t["pair_worse"]], margin)
    own = t["pair_owner"]
    d = scores.detach()
    best = d[slots[:, 0]]
    last = (slots >= 0).sum(dim=1) - 1
    worst = d[slots.gather(1, last[:, None]).squeeze(1)]
    return _per_example_mean(lp, own, E), {
        "accuracy": _per_example_mean(st["accuracy"], own, E),
        "margin": _per_example_mean(st["margin"], own, E),
        "chosen_reward": best, "rejected_reward": worst}


class RMMethod:
    """One item per record; the loss is the sum of per-record losses over the global count."""

    def __init__(self, model, rm_cfg: RMSection):
        self.model = model  # ScalarModel; forwards go through model.adapter (and the engine's runner)
        self.cfg = rm_cfg

    def count_items(self, batch) -> int:
        return batch.size

    def compute_loss(self, batch, num_items):
        scores = self.model.score(batch)                                 # (rows,)
        losses, st = record_losses(scores, batch.tensors, self.cfg)      # (E,)
        sums = {k: v.detach().float().sum() for k, v in st.items()}
        sums["loss"] = losses.detach().float().sum()
        sums["items"] = torch.tensor(float(batch.size))
        return losses.sum() / num_items, sums


@torch.no_grad()
def evaluate_rm(model, examples, collate, batch_size: int, rm_cfg: RMSection | None = None) -> dict:
    """Held-out metrics: ``accuracy`` and ``margin`` over every implied pair, ``loss`` per record."""
    rm_cfg = rm_cfg or RMSection()
    was = model.training
    model.eval()
    acc = mar = loss = 0.0
    pairs = recs = 0
    dev = model.adapter.device
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size]).to(dev)
        s = model.score(b).float()
        t = b.tensors
        diff = s[t["pair_better"]] - s[t["pair_worse"]]
        acc += float((diff > 0).sum())
        mar += float(diff.sum())
        pairs += diff.numel()
        lo, _ = record_losses(s, t, rm_cfg)
        loss += float(lo.sum())
        recs += b.size
    if was:
        model.train()
    return {"loss": loss / max(recs, 1), "accuracy": acc / max(pairs, 1), "margin": mar / max(pairs, 1),
            "pairs": float(pairs)}


# ----------------------------------------------------------------------------- training
def train_rm(cfg: RMConfig, adapter=None, callbacks=()) -> tuple[TrainResult, object]:
    """Train a reward model. Returns the result and the trained ScalarModel (``.adapter``)."""
    from ..models.scalar_head import ScalarModel
    adapter = start_run(cfg, adapter, data_needed="data.train_file is required (preference pairs or ranked lists)")
    examples, loader, eval_examples, eval_loader = load_splits(
        cfg.data, lambda path, limit: load_rm_examples(path, cfg.data, adapter, train=True, margin=cfg.rm.margin,
                                                       limit=limit)[:2])
    pad_id = adapter.tokenizer.pad_token_id
    groups = adapter.param_groups()
    base_module, projector, vision = prepare_trainable(adapter, cfg)
    for _, p in groups["head"]:  # the LM head plays no part in the score
        p.requires_grad_(False)
    model = ScalarModel(adapter, base_module, kind="reward", seed=cfg.train.seed)
    # the engine names parameters as they are in the module it trains ("base." + ...)
    plain = {n: base_param_name(n[len("base."):]) for n, _ in model.named_parameters() if n.startswith("base.")}
    proj_names = {base_param_name(n) for n, b in plain.items() if b in projector}
    vis_names = {base_param_name(n) for n, b in plain.items() if b in vision}
    evaluate = None
    if eval_examples:
        ecollate = RMCollator(eval_loader, pad_id)
        evaluate = lambda step: evaluate_rm(model, eval_examples, ecollate, cfg.train.batch_size, cfg.rm)  # noqa: E731
    trainer = Trainer(method=RMMethod(model, cfg.rm), model=model, processor=adapter.processor, examples=examples,
                      collate=RMCollator(loader, pad_id), train_cfg=cfg.train, optim_cfg=cfg.optim, config=cfg,
                      evaluate=evaluate, adapters=[adapter], projector_names=proj_names, vision_names=vis_names,
                      callbacks=callbacks)
    return trainer.train(), model


METHODS = (
    Method("rm", "reward model: scalar head on any family, pairs or ranked lists",
           RMConfig, train_rm),
)
