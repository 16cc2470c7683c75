"""Does the quickstart's reward model know hallucination when the policy produces it?

:func:`rm_agreement` samples descriptions of the held-out images from the policy (the SFT model),
scores each with the reward model, and counts each one's hallucinated object mentions with the
ShapesWorld verifier (:func:`vlmalign.data.synthetic.hallucinated_mentions` against the image's
reference caption). The rank correlation (Spearman) between score and count says whether the
reward model ranks the policy's own outputs the way the ground truth does: a reward model that
knows is strongly negative. Held-out pairs written by the generator (``rm_accuracy``) say less:
they are not what the policy says.
"""

from __future__ import annotations

import json
from pathlib import Path


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's of the average ranks (ties share their mean rank);
    NaN when either side is constant. (pandas' own ``method="spearman"`` needs scipy.)"""
    import pandas as pd
    rx, ry = (pd.Series(list(v), dtype=float).rank(method="average") for v in (x, y))
    return float(rx.corr(ry))


def rm_agreement(policy, rm, prompts_file: str | Path, image_root: str | Path, *, n: int = 4,
                 max_new_tokens: int = 40, seed: int = 0, out: str | Path | None = None) -> dict:
    """``n`` sampled descriptions (temperature 1) per prompt of ``prompts_file`` (conversations whose
    first answer is the image's reference caption, e.g. ``captions_eval.json``) from ``policy``, each
    scored by ``rm`` (a trained :class:`~vlmalign.models.ScalarModel`) and checked by the verifier.

    Returns ``rm_spearman`` (score vs hallucinated mentions), ``rm_spearman_errors`` (score vs all
    cell errors: hallucinated, wrong or missed objects), ``rm_samples`` and
    ``rm_sampled_hallucination`` (share of samples with a hallucinated mention). ``out``: a JSON
    Lines file with every sample, its score and its counts."""
    from ..data.batching import ImageLoader
    from ..data.synthetic import caption_errors, hallucinated_mentions
    from ..methods.self_critique import SelfCritiqueConfig, load_prompts, new_stats, sample_candidates
    from ..rewards import RewardInput
    from ..rewards.sources import RewardModelSource

    prompts = load_prompts(prompts_file)
    cfg = SelfCritiqueConfig(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed, batch_size=32)
    cands = sample_candidates(policy, prompts, ImageLoader(policy, image_root), cfg, new_stats())
    inputs = [RewardInput.from_record(c.record, r) for c in cands for r in c.responses]
    scores = RewardModelSource(rm, image_root=image_root, batch_size=32)(inputs).tolist()
    halluc = [hallucinated_mentions(i.response, i.reference) for i in inputs]
    errors = [caption_errors(i.response, i.reference) for i in inputs]
    if out is not None:
        with open(out, "w") as f:
            for i, s, h, e in zip(inputs, scores, halluc, errors):
                f.write(json.dumps({"id": i.meta.get("id", i.index), "response": i.response, "reference": i.reference,
                                    "score": s, "hallucinated": h, "errors": e}) + "\n")
    return {"rm_spearman": spearman(scores, halluc), "rm_spearman_errors": spearman(scores, errors),
            "rm_samples": len(inputs), "rm_sampled_hallucination": sum(h > 0 for h in halluc) / max(len(halluc), 1)}


def chair_breakdown(chair_dir: str | Path, data_dir: str | Path) -> dict:
    """Where a stage's hallucinated object mentions come from, read from its ``chair`` eval run dir
    (``predictions.jsonl``, each line's ``group`` its image) against ShapesWorld's scenes:
    ``chair_extra_i``, mentions of an absent object in an empty cell (what the SFT mix's
    hallucinated descriptions teach), and ``chair_attribute_i``, an absent colour-shape combination
    in a cell that holds another object (a colour or shape seen wrong), each over all mentions.
    Mentions are the verifier's (:func:`vlmalign.data.synthetic.parse_caption`: "a red circle in
    the top left"), so their sum can differ from ``chair_i``'s word matcher in a rare phrasing."""
    from ..data.synthetic import load_scenes, parse_caption
    scenes = load_scenes(data_dir)
    extra = attribute = mentions = 0
    with open(Path(chair_dir) / "predictions.jsonl") as f:
        for line in f:
            row = json.loads(line)
            scene = scenes[row["group"]]
            cells = {o.cell for o in scene.objects}
            for colour, shape, cell in parse_caption(row["prediction"] or ""):
                mentions += 1
                if not scene.has(colour, shape):
                    extra += cell not in cells
                    attribute += cell in cells
    return {"chair_extra_i": extra / mentions if mentions else float("nan"),
            "chair_attribute_i": attribute / mentions if mentions else float("nan")}
