"""Learnability experiments behind the quickstart's settings (not part of the tests).

    python scripts/learnability.py probe --patch 16
        linear probe: can shape be read from the frozen random vision features of a grid cell?
    python scripts/learnability.py sweep --steps 2000 --train-images 6000 [--patch 16 --hidden 64 ...]
        SFT a tiny LLaVA on ShapesWorld VQA, printing held-out accuracy per question type
        (the quickstart's data and settings: --image-position after --max-turns 1 --init-std 0.125
        --lr 1e-3)
    python scripts/learnability.py shuffle --steps 600
        loss with the true images vs. images shuffled across rows (does the model use images?)

Numbers reported in README.md (quickstart) and in the issue notes come from these commands.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlmalign.data.batching import ImageLoader, SFTCollator
from vlmalign.data.readers import read_file
from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld
from vlmalign.eval.vqa import evaluate_vqa
from vlmalign.data.loading import load_examples
from vlmalign.methods.setup import seed_everything
from vlmalign.methods.sft import SFTConfig, SFTMethod
from vlmalign.models import adapter_for, build_tiny


def _data(args) -> Path:
    tag = "" if (args.min_objects, args.max_objects) == (1, 3) else f"-o{args.min_objects}{args.max_objects}"
    if (args.image_position, args.max_turns) != ("before", 3):
        tag += f"-{args.image_position}-t{args.max_turns}"
    d = Path(args.data or f"/tmp/vlmalign-learn-{args.train_images}{tag}")
    if not (d / "manifest.json").exists():
        generate_shapesworld(d, ShapesConfig(seed=0, train_images=args.train_images, eval_images=100,
                                             min_objects=args.min_objects, max_objects=args.max_objects,
                                             image_position=args.image_position, max_turns=args.max_turns))
    return d


def _model(args):
    seed_everything(args.seed)
    m, p = build_tiny("llava", patch_size=args.patch, hidden=args.hidden, layers=args.layers,
                      vision_hidden=args.vision_hidden, seed=args.seed, init_std=args.init_std,
                      heads=args.heads, kv_heads=args.kv_heads)
    if args.vision_pos_std is not None:
        with torch.no_grad():
            m.model.vision_tower.embeddings.position_embedding.weight.normal_(0, args.vision_pos_std)
    return m, p, adapter_for(m, p)


def _examples(ad, path: Path, qtype: str | None = None):
    cfg = SFTConfig()
    cfg.data.max_length = 1024
    def tok(r, i):
        t = ad.tokenize_record(r, i)
        return {"input_ids": t.input_ids, "labels": t.labels}
    ex, loader, _ = load_examples(str(path), cfg.data, ad, tok, kind="conversation")
    if qtype:
        ex = [e for e in ex if e.record.meta.get("question_type") == qtype]
    return ex, loader


def probe(args) -> None:
    d = _data(args)
    m, _, ad = _model(args)
    scenes = json.loads((d / "scenes.json").read_text())
    shapes = sorted({o["shape"] for s in scenes for o in s["objects"]})
    g = 64 // args.patch
    X, Y = [], []
    from PIL import Image
    with torch.no_grad():
        for sc in scenes[:900]:
            pv = ad.preprocess_image(Image.open(d / sc["image"]).convert("RGB")).tensors["pixel_values"]
            hs = m.model.vision_tower(pv, output_hidden_states=True).hidden_states[-1][0, 1:].view(g, g, -1)
            for o in sc["objects"]:
                r = 0 if o["cell"].startswith("top") else 1
                c = 0 if o["cell"].endswith("left") else 1
                X.append(hs[r * g // 2:(r + 1) * g // 2, c * g // 2:(c + 1) * g // 2].reshape(-1))
                Y.append(shapes.index(o["shape"]))
    X, Y = torch.stack(X), torch.tensor(Y)
    n = int(len(X) * 0.8)
    X = (X - X[:n].mean(0)) / (X[:n].std(0) + 1e-6)
    W = torch.zeros(X.shape[1], len(shapes), requires_grad=True)
    b = torch.zeros(len(shapes), requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(X[:n] @ W + b, Y[:n]) + 1e-3 * W.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = ((X[n:] @ W + b).argmax(-1) == Y[n:]).float().mean().item()
    print(f"shape linear probe on frozen random features (patch {args.patch}): held-out accuracy {acc:.3f} "
          f"(chance {1 / len(shapes):.3f})")


def sweep(args) -> None:
    d = _data(args)
    m, p, ad = _model(args)
    ad.set_trainable(vision=args.train_vision, projector=True, language=True)
    ex, loader = _examples(ad, d / "vqa_train.json")
    vqa = read_file(d / "vqa_eval.json", kind="rl_prompt")
    seen = read_file(d / "rl_train.json", kind="rl_prompt")[:500]  # questions about training images
    col, meth = SFTCollator(loader, p.tokenizer.pad_token_id), SFTMethod(ad)
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0,
                            betas=(0.9, args.beta2))
    from transformers import get_scheduler
    sch = get_scheduler("cosine", opt, num_warmup_steps=int(0.05 * args.steps), num_training_steps=args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            order += torch.randperm(len(ex), generator=gen).tolist()
        idx, order = order[:args.batch_size], order[args.batch_size:]
        b = col([ex[i] for i in idx])
        m.train()
        loss, _ = meth.compute_loss(b, meth.count_items(b))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), args.clip)
        opt.step()
        sch.step()
        opt.zero_grad()
        if step % max(1, args.steps // args.evals) == 0 or step == args.steps:
            mm, _ = evaluate_vqa(ad, vqa, ImageLoader(ad, d), max_new_tokens=5, batch_size=64)
            tr, _ = evaluate_vqa(ad, seen, ImageLoader(ad, d), max_new_tokens=5, batch_size=64)
            per = {k.split("/")[-1]: round(v, 2) for k, v in mm.items() if "/" in k}
            print(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s) held-out vqa_accuracy "
                  f"{mm['vqa_accuracy']:.3f} {per}; on training images {tr['vqa_accuracy']:.3f}", flush=True)


def shuffle(args) -> None:
    d = _data(args)
    m, p, ad = _model(args)
    ad.set_trainable(vision=args.train_vision, projector=True, language=True)
    ex, loader = _examples(ad, d / "rl_train.json", args.question_type)
    col, meth = SFTCollator(loader, p.tokenizer.pad_token_id), SFTMethod(ad)
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)

    def held(shuffled: bool) -> float:
        b = col(ex[:64])
        if shuffled:
            b.image_indices = b.image_indices[1:] + b.image_indices[:1]
        with torch.no_grad():
            return meth.compute_loss(b, meth.count_items(b))[0].item()

    for step in range(1, args.steps + 1):
        b = col([ex[i] for i in torch.randint(0, len(ex), (args.batch_size,), generator=gen).tolist()])
        loss, _ = meth.compute_loss(b, meth.count_items(b))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % max(1, args.steps // 6) == 0:
            print(f"step {step}: loss with true images {held(False):.3f}, shuffled {held(True):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("probe", "sweep", "shuffle"))
    ap.add_argument("--data", help="ShapesWorld dir (generated if missing)")
    ap.add_argument("--train-images", type=int, default=6000)
    ap.add_argument("--min-objects", type=int, default=1)
    ap.add_argument("--max-objects", type=int, default=3)
    ap.add_argument("--image-position", default="before", choices=("before", "after"),
                    help="ShapesWorld image before or after the question (the quickstart: after)")
    ap.add_argument("--max-turns", type=int, default=3, help="ShapesWorld VQA turns per record (quickstart: 1)")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-hidden", type=int, default=None)
    ap.add_argument("--init-std", type=float, default=None, help="language model initializer_range")
    ap.add_argument("--heads", type=int, default=4, help="language model attention heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="language model key/value heads")
    ap.add_argument("--vision-pos-std", type=float, default=None, help="re-init the vision position embeddings")
    ap.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    ap.add_argument("--evals", type=int, default=6, help="held-out evaluations during the sweep")
    ap.add_argument("--train-vision", action="store_true")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--question-type", default="colour", help="for shuffle: which questions to train on")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    {"probe": probe, "sweep": sweep, "shuffle": shuffle}[args.what](args)


if __name__ == "__main__":
    main()
