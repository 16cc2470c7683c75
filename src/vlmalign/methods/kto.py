"""KTO on vision-language models: ``vlmalign train kto`` on unpaired examples (a prompt with
its images, one completion, labelled desirable or undesirable).

Loss (``losses.preference.kto_loss``; Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization"), with the implicit reward r = log pi(y|x) - log pi_ref(y|x):

    desirable:    w_D (1 - sig(beta (r - z0)))        undesirable:  w_U (1 - sig(beta (z0 - r)))

**The reference point z0** is the paper's estimate of KL(pi || pi_ref): each example's prompt
(and images) is paired with *another* example's completion y', and

    z0 = max(0, mean over the micro-batch of [log pi(y'|x) - log pi_ref(y'|x)])

with no gradient through it. The partner is fixed before training (``data/completions.py``,
``add_mismatched_rows``: one seeded cycle through the data), so the reference values of the
mismatched pairs can be precomputed and cached like the others. The mismatched rows share their
record's prompt and image features: images are encoded once per step for the matched and
mismatched rows, policy and reference; where prefix sharing is exact they continue the same
prompt cache, otherwise they run in a separate forward without gradient. ``kto.kl_estimate=zero``
drops them (z0 = 0).

The estimate is per micro-batch (and per process), as in the paper's implementation; larger
micro-batches give a less noisy z0. Reference, LoRA, cache and trainer are shared with DPO
(``methods.preference.fit``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import opt, section, validate_config
from ..config.sections import DataSection, PreferenceOptim, TrainSection
from ..data.completions import UNPAIRED_ROWS, UnpairedCollator, add_mismatched_rows, select_rows, tokenize_unpaired
from ..data.preference import index_examples
from ..engine.trainer import TrainResult
from ..errors import VlmalignError
from ..losses.preference import kto_loss
from ..data.loading import load_examples, load_splits
from .setup import start_run
from .preference import PreferenceMethod, fit
from .reference import PolicyConfig
from .logps import Reference, completion_logps, prefix_sharing_problem
from .registry import Method

log = logging.getLogger(__name__)
KL_ESTIMATES = ("mismatched", "zero")


@dataclass
class KTOSection:
    beta: float = opt(0.1, "inverse temperature of the implicit reward beta * (policy - reference) log-prob", gt=0)
    desirable_weight: float = opt(1.0, "lambda_D: weight of a desirable example's loss", gt=0)
    undesirable_weight: float = opt(1.0, "lambda_U: weight of an undesirable example's loss (the paper advises "
                                         "lambda_D n_D / (lambda_U n_U) between 1 and 4/3; the run prints it)", gt=0)
    kl_estimate: str = opt("mismatched", "reference point z0: mismatched (KTO paper: log-ratio of each prompt "
                                         "with another example's completion, micro-batch mean, clamped at 0, no "
                                         "gradient) or zero (z0 = 0, no extra rows)", KL_ESTIMATES)
    precompute_ref_logps: bool = opt(False, "compute reference log-probs (matched and mismatched) once before "
                                            "training and cache them on disk (reused across epochs and runs)")
    ref_cache_dir: str | None = opt(None, "reference log-prob cache directory (default: $VLMALIGN_CACHE or "
                                          "~/.cache/vlmalign, then ref_logps)")
    prefix_sharing: bool = opt(True, "run each prompt once and continue its completion and mismatched rows from "
                                     "its key/value cache where exact (falls back to full sequences otherwise)")
    disable_dropout: bool = opt(True, "turn dropout off in policy (LoRA dropout included) and reference")


@dataclass
class KTOConfig(PolicyConfig):
    data: DataSection = section(DataSection, "unpaired examples (prompt, completion, label): training and "
                                              "held-out files")
    optim: PreferenceOptim = section(PreferenceOptim, "optimizer and learning-rate schedule")
    train: TrainSection = section(TrainSection, "loop, batch sizes (in examples), precision, checkpoints")
    kto: KTOSection = section(KTOSection, "loss, KL estimate and the reference / caching / sharing options")


class KTOMethod(PreferenceMethod):
    """One micro-batch of KTO (``compute_loss(batch, num_items)``) on a batch of
    ``data.completions.UnpairedCollator``. ``ref``: a Reference; or ``ref_values``: precomputed
    ``completion`` / ``kl`` (N,) tensors indexed by example position."""

    def __init__(self, adapter, cfg, ref: Reference | None = None, ref_values: dict | None = None):
        cfg = getattr(cfg, "kto", cfg)  # a KTOConfig or its kto section
        validate_config(cfg, "kto.")
        super().__init__(adapter, cfg, ref, ref_values)
        if ref is None and ref_values is None:
            raise VlmalignError("KTO needs a reference (model or precomputed values)")

    def quantities(self, batch, token_lp: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B,) summed log-probs per row group: ``completion`` and (mismatched) ``kl``."""
        sums = token_lp.sum(1)
        return {n: batch.group(sums, n) for n in batch.row_names}

    def policy_logps(self, batch, encoded) -> torch.Tensor:
        """(R, Lc) token log-probs; the mismatched rows need no gradient, so without prefix
        sharing they run in their own no-grad forward (same image features)."""
        share = self.cfg.prefix_sharing and prefix_sharing_problem(self.adapter) is None
        if "kl" not in batch.row_names or share:
            return completion_logps(self.adapter, batch, encoded, share_prefix=self.cfg.prefix_sharing)
        own = completion_logps(self.adapter, select_rows(batch, ("completion",)), encoded, share_prefix=False)
        with torch.no_grad():
            kl = completion_logps(self.adapter, select_rows(batch, ("kl",)), encoded, share_prefix=False)
        return torch.cat([own, kl])

    def compute_loss(self, batch, num_items):
        k = self.cfg
        enc = batch.encode(self.adapter)                 # once: matched + mismatched rows, policy + reference
        q = self.quantities(batch, self.policy_logps(batch, enc))
        rq = self.reference_quantities(batch, enc)
        lp = q["completion"]
        if "kl" in q:
            kl = (q["kl"] - rq["kl"]).detach().mean()
        else:
            kl = torch.zeros((), dtype=lp.dtype, device=lp.device)
        good = batch.tensors["desirable"]
        losses, stats = kto_loss(lp, rq["completion"], good, kl, beta=k.beta, desirable_weight=k.desirable_weight,
                                 undesirable_weight=k.undesirable_weight)
        zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
        r, lpd = stats["reward"], lp.detach()
        sums = {"loss": losses.detach().sum(), "kl": kl.clamp(min=0) * batch.size,
                "desirable": stats["desirable"].sum(), "undesirable": stats["undesirable"].sum(),
                "reward_desirable": torch.where(good, r, zero).sum(),
                "reward_undesirable": torch.where(good, zero, r).sum(),
                "logps_desirable": torch.where(good, lpd, zero).sum(),
                "logps_undesirable": torch.where(good, zero, lpd).sum(),
                "items": torch.tensor(float(batch.size), device=lp.device)}
        return losses.sum() / num_items, sums

    def step_metrics(self, m: dict) -> dict:
        """The engine's means over examples -> per-class means (:func:`per_class_means`)."""
        return per_class_means(m)


def per_class_means(m: dict) -> dict:
    """Means over examples (what the engine logs) -> per-class means: ``reward_desirable`` and
    ``logps_desirable`` were summed over desirable examples only, so dividing by the desirable
    fraction gives their mean over desirable examples (likewise undesirable; dropped for a class
    absent from the step). Adds ``margin`` = reward_desirable - reward_undesirable."""
    out = dict(m)
    for cls in ("desirable", "undesirable"):
        frac = out.get(cls)
        for q in ("reward", "logps"):
            key = f"{q}_{cls}"
            if key in out:
                if frac:
                    out[key] = out[key] / frac
                else:
                    out.pop(key)
    if "reward_desirable" in out and "reward_undesirable" in out:
        out["margin"] = out["reward_desirable"] - out["reward_undesirable"]
    return out


def load_unpaired(path, cfg: KTOConfig, adapter, limit=None):
    """Unpaired examples of ``path`` tokenized (indexed, with their mismatched KL rows unless
    ``kto.kl_estimate=zero``) and their image loader."""
    def tok(rec, imgs):
        return tokenize_unpaired(adapter, rec, imgs, max_length=cfg.data.max_length)

    examples, loader, _ = load_examples(path, cfg.data, adapter, tok, kind="unpaired", limit=limit)
    if cfg.kto.kl_estimate == "mismatched":
        add_mismatched_rows(examples, seed=cfg.train.seed, max_length=cfg.data.max_length, file=path)
    return index_examples(examples), loader


def balance_note(examples, k: KTOSection) -> str:
    """Class counts and lambda_D n_D / (lambda_U n_U), which the paper advises to keep in [1, 4/3]."""
    nd = sum(1 for ex in examples if ex.rows["label"][0])
    nu = len(examples) - nd
    msg = f"KTO data: {nd} desirable, {nu} undesirable"
    if nd and nu:
        ratio = k.desirable_weight * nd / (k.undesirable_weight * nu)
        msg += f"; desirable_weight*n_D / (undesirable_weight*n_U) = {ratio:.3f}"
        if not 1.0 <= ratio <= 4 / 3 + 1e-9:
            msg += " (the KTO paper advises 1 to 4/3: adjust kto.desirable_weight / kto.undesirable_weight)"
    else:
        msg += " (only one class: KTO still trains, against the KL reference point)"
    return msg


def train_kto(cfg: KTOConfig, adapter=None, callbacks=()) -> tuple[TrainResult, object]:
    """Train with KTO. Returns the result and the trained adapter."""
    k = cfg.kto
    adapter = start_run(cfg, adapter)
    examples, loader, eval_examples, eval_loader = load_splits(
        cfg.data, lambda path, limit: load_unpaired(path, cfg, adapter, limit))
    log.info(balance_note(examples, k))
    kl = k.kl_estimate == "mismatched"
    pad_id = adapter.tokenizer.pad_token_id
    collate = UnpairedCollator(loader, pad_id, kl=kl)
    ecollate = UnpairedCollator(eval_loader, pad_id, kl=kl) if eval_examples else None
    parts = {"rows": list(UNPAIRED_ROWS if kl else UNPAIRED_ROWS[:1]), "method": "kto"}
    return fit(cfg, "kto", adapter, KTOMethod, examples, collate, eval_examples, ecollate, cache_parts=parts,
               callbacks=callbacks)


METHODS = (
    Method("kto", "KTO on unpaired examples (prompt, completion, desirable/undesirable label)",
           KTOConfig, train_kto),
)
