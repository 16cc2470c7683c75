"""`vlmalign data synth shapes`: write the ShapesWorld dataset.

The ``data`` command group (vlmalign.cli.data) calls :func:`register` with its subparsers. The
flags are the options of :class:`~vlmalign.data.synthetic.ShapesConfig`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..data.synthetic.config import ShapesConfig
from ..data.synthetic.generate import FILES
from .args import config_flags, config_from_flags


def register(data_subparsers) -> argparse.ArgumentParser:
    """Add ``synth`` (with its ``shapes`` command) to the ``data`` group's subparsers.

    Returns the ``synth`` parser (its subparsers are on ``synth._synth_subparsers`` for
    other generators to add to)."""
    synth = data_subparsers.add_parser("synth", help="generate synthetic datasets",
                                       description="Generate synthetic datasets.")
    sub = synth.add_subparsers(dest="synth_command", metavar="DATASET")
    sub.required = True
    synth._synth_subparsers = sub  # type: ignore[attr-defined]

    p = sub.add_parser(
        "shapes", help="ShapesWorld: coloured shapes in a grid (the embedded default dataset)",
        description="Write ShapesWorld images plus captions, VQA, POPE, preference, ranked, RL "
                    "and KTO files in community formats, and the held-out split in benchmark layouts (benchmarks/: POPE, "
                    "an MMBench TSV, captions with CHAIR objects, VQA) for vlmalign eval. Same seed and options give "
                    "byte-identical files. Image paths in the files are relative to --out.")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    config_flags(p, ShapesConfig, OPTIONS)
    p.set_defaults(func=run_shapes)
    return synth


# the options of ShapesConfig that are flags (its declarations give their defaults, choices, ranges and help)
OPTIONS = ("seed", ("train_images", "--train"), ("eval_images", "--eval"), "image_size", "grid", "min_objects",
           "max_objects", ("colours", "--colours", "--colors"), "shapes", "question_types", "paraphrases", "jitter",
           "max_turns", "image_position", "ranked_size", "descriptions", "hallucination", "hallucination_kinds",
           "pair_kinds")


def run_shapes(args: argparse.Namespace) -> int:
    from ..data.synthetic.generate import generate_shapesworld
    from ..errors import VlmalignError

    try:
        config = config_from_flags(ShapesConfig, args, OPTIONS)
    except ValueError as e:
        raise VlmalignError(str(e)) from None
    t0 = time.perf_counter()
    paths = generate_shapesworld(args.out, config)
    from ..data.synthetic.benchmarks import write_benchmarks
    bench = write_benchmarks(args.out)
    seconds = time.perf_counter() - t0
    manifest = json.loads(Path(paths["manifest"]).read_text())
    out = Path(args.out)
    print(f"ShapesWorld (seed {config.seed}) written to {out} in {seconds:.1f}s")
    print(f"  images/      {manifest['images']['train']} train + {manifest['images']['eval']} eval PNGs "
          f"({config.image_size}x{config.image_size}, {config.grid}x{config.grid} grid)")
    for name, (fname, fmt, kind) in FILES.items():
        what = f"{fmt} -> {kind}" if kind else "ground truth"
        print(f"  {fname:<27} {manifest['counts'][name]:>6} records  ({what})")
    print("  manifest.json")
    print(f"  benchmarks/  the held-out split in benchmark layouts for vlmalign eval: "
          f"{', '.join(sorted(p.name for p in bench.values()))}")
    print(f"use --image-root {out} when reading these files")
    return 0
