"""Every preference and RL route of vlmalign on the quickstart's hallucination task, each from the
same SFT model (not part of the tests; numbers in docs/PREFERENCE.md and README.md).

    vlmalign quickstart --out runs/qs0 --seed 0 --overwrite      # and --seed 1, 2 for more seeds
    python scripts/hallucination_methods.py --runs runs/qs0 runs/qs1 runs/qs2 --out runs/methods \\
        [--rows dpo,ipo,...] [--extra-seeds 1]

The quickstart's own stages (sft, dpo sigmoid, grpo) come from each run's report.json; every other
row trains on the SFT model of the first ``--extra-seeds`` runs, with the quickstart's recipes and
only the change the row names (so the DPO variants share the dpo recipe's learning rate, beta,
steps and pairs: none was tuned for its loss). Each row is measured by the same ``eval.tasks``
(held-out VQA, POPE, MMBench, CHAIR of greedy descriptions). Writes ``methods.json`` (every run)
and ``methods.md`` (mean and range over seeds per row).

Rows: dpo dpo_no_rpo ipo cdpo kto orpo simpo token_weighted mdpo (pairs from the data); dpo_onpolicy_verifier,
dpo_onpolicy_rm (the SFT model's own sampled descriptions, labelled by the verifier or the reward
model); self_critique (the model judges its own samples in both orders); best_of_n_rm (4 samples,
the reward model picks; an inference-time method: only CHAIR is measured); grpo_verifier,
grpo_rm, ppo_verifier, ppo_rm (description prompts, the verifier's caption_errors reward or the
reward model).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

from vlmalign.quickstart.plan import stage_config
from vlmalign.quickstart.report import load_report
from vlmalign.quickstart.run import task_metrics

# every row keeps the dpo recipe's RPO term (dpo.rpo_alpha) but ORPO, which has its own NLL term;
# dpo_no_rpo is the quickstart's DPO without it
DPO_LOSSES = {"dpo": [], "dpo_no_rpo": ["dpo.rpo_alpha=0"], "ipo": ["dpo.loss=ipo"],
              "cdpo": ["dpo.loss=cdpo", "dpo.label_smoothing=0.1"],
              "orpo": ["dpo.loss=orpo", "dpo.rpo_alpha=0"], "simpo": ["dpo.loss=simpo", "dpo.beta=2.0"],
              "token_weighted": ["dpo.loss=token_weighted"], "mdpo": ["dpo.loss=mdpo"]}
ONLINE = ("grpo_verifier", "grpo_rm", "ppo_verifier", "ppo_rm")
ROWS = (*DPO_LOSSES, "kto", "dpo_onpolicy_verifier", "dpo_onpolicy_rm", "self_critique", "best_of_n_rm", *ONLINE)
METRICS = ("chair_i", "chair_s", "pope_f1", "pope_yes_ratio", "vqa_accuracy", "seconds")
RL_STEPS = 60
STEPS: int | None = None
LIMIT = 600
# --steps: the step count of every preference row (DPO family, on-policy pairs, KTO; default: the
# dpo recipe's, KTO 150); --rl-steps: the RL rows' (RL_STEPS)


def _override(cfg, items):
    from vlmalign.config import load_config
    return load_config(type(cfg), overrides=items, base=cfg)


def _models(run: Path) -> tuple[Path, Path]:
    from vlmalign.engine.checkpoint import latest_checkpoint
    return (latest_checkpoint(run / "sft" / "checkpoints") / "model",
            latest_checkpoint(run / "rm" / "checkpoints") / "model")


def _train(method: str, cfg, sft: Path, steps: int | None = None) -> dict:
    """Train ``method`` from ``sft``; ``steps``: another step count than the config's (with what
    follows it, :func:`follow_steps`)."""
    from vlmalign.methods.registry import get
    cfg.model.path, cfg.model.tiny = str(sft), None
    cfg.train.overwrite, cfg.train.progress = True, False
    if steps is not None:
        from vlmalign.quickstart.plan import follow_steps
        follow_steps(cfg, method, steps)
    result, _ = get(method).train(cfg)
    return task_metrics(result.metrics, cfg.eval.tasks)


def _pairs(run: Path, out: Path, sft: Path, rm: Path, how: str, seed: int) -> Path:
    """The SFT model's own descriptions of 600 training images (4 samples each), ranked by the
    verifier or the reward model, or judged by the model itself: a DPO file."""
    from vlmalign.data.batching import ImageLoader
    from vlmalign.methods.self_critique import (SelfCritiqueConfig, VLMJudge, generate_preferences,
                                                load_prompts)
    from vlmalign.models.peft import load_any
    from vlmalign.rewards import FunctionReward, RewardModelSource
    data = run / "data"
    policy = load_any(str(sft))
    policy.model.eval()
    cfg = SelfCritiqueConfig(n=4, temperature=1.0, max_new_tokens=40, seed=seed, batch_size=32)
    kw = {"verifier": {"reward_model": FunctionReward("caption_errors")},
          "rm": {"reward_model": RewardModelSource(rm, image_root=data, batch_size=32)},
          "self": {"judge": VLMJudge(policy, image_root=data)}}[how]
    path = out / f"pairs_{how}.jsonl"
    generate_preferences(policy, load_prompts(data / "captions_train.json", limit=LIMIT), ImageLoader(policy, data),
                         cfg, out=path, image_root=data, **kw)
    return path


def _kto_file(run: Path, out: Path, split: str) -> Path:
    """The DPO stage's pairs unpaired (KTO): each pair's chosen answer (the faithful description,
    the right existence answer) desirable, its rejected one undesirable, on the same prompt and image."""
    path = out / f"kto_{split}.jsonl"
    with open(path, "w") as f:
        for r in json.loads((run / "data" / f"hallucination_qa_{split}.json").read_text()):
            for text, label in ((r["chosen"], True), (r["rejected"], False)):
                f.write(json.dumps({"prompt": r["prompt"], "completion": text, "label": label,
                                    "images": [r["image"]]}) + "\n")
    return path


def _best_of_n(run: Path, out: Path, sft: Path, rm: Path, seed: int) -> dict:
    """CHAIR of the reward model's pick of 4 sampled descriptions per held-out image."""
    from vlmalign.data.batching import ImageLoader
    from vlmalign.eval.chair import chair_scores, extract_objects
    from vlmalign.methods.self_critique import (SelfCritiqueConfig, load_prompts, new_stats, rank_preferences,
                                                sample_candidates)
    from vlmalign.models.peft import load_any
    from vlmalign.rewards import RewardModelSource
    data = run / "data"
    policy = load_any(str(sft))
    policy.model.eval()
    prompts = load_prompts(data / "captions_eval.json")
    cfg = SelfCritiqueConfig(n=4, temperature=1.0, max_new_tokens=40, seed=seed, batch_size=32)
    stats = new_stats()
    cands = sample_candidates(policy, prompts, ImageLoader(policy, data), cfg, stats)
    _, best = rank_preferences(RewardModelSource(rm, image_root=data, batch_size=32), cands, cfg, stats)
    picked = {b.id: b.messages[-1].text for b in best}
    vocab = json.loads((data / "benchmarks" / "shapesworld_chair_vocab.json").read_text())
    scenes = {r["image"]: r for r in json.loads((data / "scenes.json").read_text())}
    mentions, truth = [], []
    for c in cands:   # a prompt whose 4 samples were all the same keeps that one
        text = picked.get(c.record.id, c.responses[0] if c.responses else "")
        mentions.append(extract_objects(text, vocab["vocabulary"], vocab.get("synonyms")))
        objs = scenes[_image_of(c.record)]["objects"]
        truth.append([f"{o['colour']} {o['shape']}" for o in objs])
    s = chair_scores(mentions, truth)
    return {"chair_i": s["chair_i"], "chair_s": s["chair_s"]}


def _image_of(record) -> str:
    from vlmalign.data.schema import images_of
    path = str(images_of(record.prompt)[0].path)
    return path[path.index("images/"):]


def _online(run: Path, out: Path, row: str, sft: Path, rm: Path, seed: int) -> dict:
    method, reward = row.split("_")
    cfg = stage_config(method, run, seed=seed, steps=RL_STEPS)
    data = run / "data"
    spec = {"type": "function", "name": "caption_errors", "weight": 1.0} if reward == "verifier" else \
        {"type": "model", "path": str(rm), "weight": 1.0, "empty_score": -10.0}   # an empty description: bad
    cfg = _override(cfg, [f"data.train_file={data / 'captions_train.json'}",
                          f"data.eval_file={data / 'captions_eval.json'}", f"data.max_train_samples={RL_STEPS * 16}",
                          "rollout.max_new_tokens=40", "rollout.k=4", "train.batch_size=64", "train.eval_every=20",
                          f"train.output_dir={out / row}"])
    cfg.reward = [spec]
    return _train(method, cfg, sft)


def run_row(row: str, run: Path, out: Path, seed: int) -> dict:
    sft, rm = _models(run)
    out.mkdir(parents=True, exist_ok=True)
    if row in DPO_LOSSES or row.startswith("dpo_onpolicy") or row == "self_critique":
        cfg = stage_config("dpo", run, seed=seed)
        items = list(DPO_LOSSES.get(row, [])) + [f"train.output_dir={out / row}"]
        if row != "dpo" and row not in DPO_LOSSES:
            how = {"dpo_onpolicy_verifier": "verifier", "dpo_onpolicy_rm": "rm", "self_critique": "self"}[row]
            items += [f"data.train_file={_pairs(run, out, sft, rm, how, seed)}", "data.max_train_samples=null",
                      f"data.image_root={run / 'data'}", "dpo.ref_cache_dir=null"]
        return _train("dpo", _override(cfg, items), sft, STEPS)
    if row == "kto":
        cfg = stage_config("kto", run, seed=seed)
        cfg.eval.tasks = copy.deepcopy(stage_config("dpo", run).eval.tasks)
        cfg = _override(cfg, [f"data.train_file={_kto_file(run, out, 'train')}",
                              f"data.eval_file={_kto_file(run, out, 'eval')}", f"data.image_root={run / 'data'}",
                              "train.max_steps=150",
                              f"train.output_dir={out / row}"])
        return _train("kto", cfg, sft, STEPS)
    if row == "best_of_n_rm":
        return _best_of_n(run, out, sft, rm, seed)
    if row in ONLINE:
        return _online(run, out, row, sft, rm, seed)
    raise SystemExit(f"unknown row {row!r} (rows: {', '.join(ROWS)})")


def quickstart_rows(run: Path) -> list[dict]:
    rep = load_report(run / "report.json")
    rows = []
    for st in rep["stages"]:
        if st["name"] in ("sft", "dpo", "grpo", "ppo"):   # the stages that answer (rm: in report.json)
            m = st["metrics"]
            rows.append({"row": f"quickstart {st['name']}", "seed": rep["seed"], "seconds": st["seconds"],
                         **{k: m.get(k) for k in METRICS if k != "seconds"}})
    return rows


def summarise(results: list[dict]) -> str:
    order = list(dict.fromkeys(r["row"] for r in results))
    lines = ["| route | seeds | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name in order:
        rs = [r for r in results if r["row"] == name]
        cells = []
        for k in METRICS:
            vals = [r[k] for r in rs if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.3f}" if k != "seconds" else f"{vals[0]:.0f}")
            else:
                fmt = "{:.0f}" if k == "seconds" else "{:.3f}"
                cells.append(f"{fmt.format(statistics.mean(vals))} ({fmt.format(min(vals))}-{fmt.format(max(vals))})")
        err = next((r["error"] for r in rs if r.get("error")), None)
        lines.append(f"| {name}{' (failed: ' + err + ')' if err else ''} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    global STEPS, LIMIT, RL_STEPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="quickstart output dirs (one per seed)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--extra-seeds", type=int, default=1, help="runs whose SFT model the other rows train on")
    ap.add_argument("--steps", type=int, help="train every preference row (DPO family, on-policy and self-critique pairs, KTO) this many "
                         "steps (default: the dpo recipe's; KTO 150)")
    ap.add_argument("--rl-steps", type=int, default=RL_STEPS, help="steps of the GRPO and PPO rows")
    ap.add_argument("--limit", type=int, default=600, help="training images whose descriptions the on-policy and "
                                                           "self-critique rows sample")
    args = ap.parse_args()
    STEPS, LIMIT, RL_STEPS = args.steps, args.limit, args.rl_steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "methods.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["row"], r["seed"]) for r in results}
    runs = [Path(r) for r in args.runs]
    for run in runs:
        results = [r for r in results if not (r["row"].startswith("quickstart ") and
                                              r["seed"] == load_report(run / "report.json")["seed"])]
        results += quickstart_rows(run)
    for run in runs[: args.extra_seeds]:
        seed = load_report(run / "report.json")["seed"]
        for row in [r for r in args.rows.split(",") if r]:
            if (row, seed) in done:
                continue
            t = time.time()
            try:
                m = run_row(row, run, out / f"seed{seed}", seed)
                err = None
            except Exception as e:   # a route that fails is a result too: recorded, the others go on
                m, err = {}, f"{type(e).__name__}: {str(e)[:200]}"
            results.append({"row": row, "seed": seed, **{k: m.get(k) for k in METRICS if k != "seconds"},
                            "seconds": time.time() - t, "error": err})
            print(json.dumps(results[-1]), flush=True)
            results_path.write_text(json.dumps(results, indent=1))
    results_path.write_text(json.dumps(results, indent=1))
    (out / "methods.md").write_text(summarise(results))
    print(summarise(results))


if __name__ == "__main__":
    main()
