"""`vlmalign data synth shapes`: write the ShapesWorld dataset.

The ``data`` command group (vlmalign.cli.data) calls :func:`register` with its subparsers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .config import IMAGE_POSITIONS, QUESTION_TYPES, ShapesConfig
from .generate import FILES


def _csv(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def register(data_subparsers) -> argparse.ArgumentParser:
    """Add ``synth`` (with its ``shapes`` command) to the ``data`` group's subparsers.

    Returns the ``synth`` parser (its subparsers are on ``synth._synth_subparsers`` for
    other generators to add to)."""
    synth = data_subparsers.add_parser("synth", help="generate synthetic datasets",
                                       description="Generate synthetic datasets.")
    sub = synth.add_subparsers(dest="synth_command", metavar="DATASET")
    sub.required = True
    synth._synth_subparsers = sub  # type: ignore[attr-defined]

    d = ShapesConfig()
    p = sub.add_parser(
        "shapes", help="ShapesWorld: coloured shapes in a grid (the embedded default dataset)",
        description="Write ShapesWorld images plus captions, VQA, POPE, preference, ranked, RL "
                    "and KTO files in community formats. Same seed and options give "
                    "byte-identical files. Image paths in the files are relative to --out.")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--train", type=int, default=d.train_images, dest="train_images",
                   help=f"train images (default {d.train_images})")
    p.add_argument("--eval", type=int, default=d.eval_images, dest="eval_images",
                   help=f"held-out eval images (default {d.eval_images})")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help=f"image side in pixels (default {d.image_size})")
    p.add_argument("--grid", type=int, choices=(2, 3), default=d.grid,
                   help=f"cells per side (default {d.grid})")
    p.add_argument("--min-objects", type=int, default=d.min_objects,
                   help=f"fewest objects per image (default {d.min_objects})")
    p.add_argument("--max-objects", type=int, default=d.max_objects,
                   help=f"most objects per image (default {d.max_objects})")
    p.add_argument("--colours", "--colors", type=_csv, default=d.colours,
                   help=f"comma-separated colours (default {','.join(d.colours)})")
    p.add_argument("--shapes", type=_csv, default=d.shapes,
                   help=f"comma-separated shapes (default {','.join(d.shapes)})")
    p.add_argument("--question-types", type=_csv, default=d.question_types,
                   help=f"comma-separated subset of {','.join(QUESTION_TYPES)} (default all)")
    p.add_argument("--paraphrases", action="store_true",
                   help="use several phrasings per question type (default: one each)")
    p.add_argument("--jitter", type=float, default=d.jitter,
                   help=f"random offset of objects in their cells, 0 (centred) to 1 (anywhere); "
                        f"default {d.jitter}")
    p.add_argument("--max-turns", type=int, default=d.max_turns,
                   help=f"longest multi-turn VQA SFT record (default {d.max_turns})")
    p.add_argument("--image-position", choices=IMAGE_POSITIONS, default=d.image_position,
                   help=f"image before or after the first user turn's text (default {d.image_position}; "
                        f"'after' lets a tiny causal LM's image tokens see the question)")
    p.add_argument("--ranked-size", type=int, default=d.ranked_size,
                   help=f"responses per ranked list (default {d.ranked_size})")
    p.set_defaults(func=run_shapes)
    return synth


_CONFIG_ARGS = ("seed", "train_images", "eval_images", "image_size", "grid", "min_objects",
                "max_objects", "colours", "shapes", "question_types", "paraphrases", "jitter",
                "max_turns", "image_position", "ranked_size")


def run_shapes(args: argparse.Namespace) -> int:
    from ...errors import VlmalignError
    from .generate import generate_shapesworld

    try:
        config = ShapesConfig(**{k: getattr(args, k) for k in _CONFIG_ARGS})
    except ValueError as e:
        raise VlmalignError(str(e)) from None
    t0 = time.perf_counter()
    paths = generate_shapesworld(args.out, config)
    seconds = time.perf_counter() - t0
    manifest = json.loads(Path(paths["manifest"]).read_text())
    out = Path(args.out)
    print(f"ShapesWorld (seed {config.seed}) written to {out} in {seconds:.1f}s")
    print(f"  images/      {manifest['images']['train']} train + {manifest['images']['eval']} eval PNGs "
          f"({config.image_size}x{config.image_size}, {config.grid}x{config.grid} grid)")
    for name, (fname, fmt, kind) in FILES.items():
        what = f"{fmt} -> {kind}" if kind else "ground truth"
        print(f"  {fname:<20} {manifest['counts'][name]:>6} records  ({what})")
    print("  manifest.json")
    print(f"use --image-root {out} when reading these files")
    return 0
