"""`vlmalign data {validate,convert,stats}` (and `synth`, registered by cli/synth.py, and `judge-sft`,
by cli/judge_sft.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config.sections import DataSection
from ..data.images import DEFAULT_MAX_PIXELS
from ..data.readers import FORMATS
from ..data.schema import RECORD_KINDS
from ..data.writers import WRITE_FORMATS
from .args import positive_int
from .args import config_flags

FORMAT_HELP = (f"input format: auto (default: detect from the file), {', '.join(FORMATS)} "
               "(aliases: vlquery_json=llava, hf/parquet=trl, native=vlmalign)")
KIND_HELP = (f"read records as this kind: {', '.join(RECORD_KINDS)} (e.g. a VQA file as "
             "conversation, two-response ranked lists as preference)")
ROOT_HELP = ("folder that image paths are relative to; paths may not leave it "
             "(default: the folder holding the data file)")
PIXELS_HELP = ("pixel budget: refuse images whose header declares more pixels, before "
               "decoding them (decompression bombs); 0: no budget besides PIL's own limit "
               "(default: %(default)s = 8192 x 8192)")
# the per-sample caps: declared once, in the data section of training (data.max_images, ...)
SAMPLE_CAPS = ("max_images", "max_sample_pixels")


def register(subparsers) -> argparse.ArgumentParser:
    data = subparsers.add_parser("data", help="check, convert and describe data files",
                                 description="Check, convert and describe data files.")
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    sub.required = True
    data._data_subparsers = sub  # type: ignore[attr-defined]  # for other subcommands

    p = sub.add_parser("validate", help="check every record of a data file",
                       description="Check every record: fields, roles, responses, <image> "
                                   "placeholders, images (missing, corrupt, outside the root) "
                                   "and, with --model, the length. Prints one line per "
                                   "problem and 'N records, K bad'; exit code 1 if any is bad.")
    p.add_argument("file", help="data file (.json, .jsonl, .parquet) or datasets directory")
    p.add_argument("--image-root", help=ROOT_HELP)
    p.add_argument("--format", default="auto", help=FORMAT_HELP)
    p.add_argument("--kind", choices=RECORD_KINDS, help=KIND_HELP)
    p.add_argument("--model", help="model directory: also check that each record fits "
                                   "--max-length without cutting image tokens")
    p.add_argument("--max-length", type=int, help="sequence length limit for the --model check")
    p.add_argument("--no-images", action="store_true", help="skip opening the images")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help=PIXELS_HELP)
    config_flags(p, DataSection, SAMPLE_CAPS)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("convert", help="convert a data file to another format",
                       description="Read IN (any supported format) and write OUT in --to. "
                                   "Images held as bytes are written to <OUT dir>/images/ "
                                   "for path-based formats; trl embeds image bytes.")
    p.add_argument("input", metavar="IN", help="input data file or datasets directory")
    p.add_argument("output", metavar="OUT", help="output file (trl: .parquet, otherwise a "
                                                 "save_to_disk directory)")
    p.add_argument("--to", required=True, choices=WRITE_FORMATS, help="output format")
    p.add_argument("--from", dest="format", default="auto", help=FORMAT_HELP)
    p.add_argument("--kind", choices=RECORD_KINDS, help=KIND_HELP)
    p.add_argument("--image-root", help=ROOT_HELP + "; needed to embed path images in trl")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="bad input records: stop (raise, default) or leave them out and "
                        "report how many (skip)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("stats", help="describe a data file",
                       description="Records per kind, bad records (the reader's checks and "
                                   "the images'), duplicate ids, images per record, turns, "
                                   "response lengths, share of text-only records, distinct "
                                   "images.")
    p.add_argument("file", help="data file (.json, .jsonl, .parquet) or datasets directory")
    p.add_argument("--image-root", help=ROOT_HELP + " (used to identify identical images)")
    p.add_argument("--format", default="auto", help=FORMAT_HELP)
    p.add_argument("--kind", choices=RECORD_KINDS, help=KIND_HELP)
    p.add_argument("--model", help="model directory: also count response lengths in tokens")
    p.add_argument("--no-images", action="store_true",
                   help="do not open the images (bad records then count the reader's checks only)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help=PIXELS_HELP)
    config_flags(p, DataSection, SAMPLE_CAPS)
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("align-levels", help="write AlignGPT alignment buckets (image-text similarity "
                                            "quantiles) into a LLaVA file",
                       description="Score each record's image-text similarity with --scorer and write the "
                                   "file again with 'similarity' (its quantile bucket over the file, an "
                                   "integer 0..N-1, higher = better aligned) and 'similarity_score' (the "
                                   "cosine) added to every record: the input of AlignGPT pretraining "
                                   "(model.alignment_levels, docs/MODELS.md).")
    p.add_argument("file", help="LLaVA data file (.json or .jsonl)")
    p.add_argument("--scorer", required=True, metavar="DIR",
                   help="CLIP-like dual encoder directory (AutoModel with get_image_features / "
                        "get_text_features, its image processor and tokenizer), or a VLM directory "
                        "(mean projected image tokens vs mean text embeddings)")
    p.add_argument("--buckets", type=positive_int, default=8,
                   help="number of alignment levels N (the model's alignment_levels)")
    p.add_argument("--out", required=True, metavar="FILE2", help="output file (.json or .jsonl)")
    p.add_argument("--image-root", help=ROOT_HELP)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help=PIXELS_HELP)
    p.set_defaults(func=cmd_align_levels)

    try:  # `data synth` lives with the synthetic data sets
        from .synth import register as register_synth
    except ImportError:
        register_synth = None
    if register_synth is not None:
        register_synth(sub)
    from .judge_sft import register as register_judge_sft
    register_judge_sft(sub)
    return data


def cmd_validate(args) -> int:
    from ..data.validate import validate_file
    from ..errors import VlmalignError

    if args.max_length is not None and args.model is None:
        raise VlmalignError("--max-length needs --model: the length is counted with the "
                            "model's tokenizer and processor")
    adapter = None
    if args.model is not None:
        if not args.max_length:
            raise VlmalignError("--model needs --max-length")
        try:
            from ..models.peft import load_any
        except ImportError as e:
            raise VlmalignError(f"the length check needs the model layer ({e})") from None
        adapter = load_any(str(args.model))

    report = validate_file(args.file, args.image_root, format=args.format, kind=args.kind,
                           check_images=not args.no_images, adapter=adapter,
                           max_length=args.max_length, max_pixels=args.max_pixels or None,
                           max_images=args.max_images, max_sample_pixels=args.max_sample_pixels)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for p in report.problems:
            print(p.message)
        for p in report.warnings:
            print(f"warning: {p.message}")
        if report.one_placeholder:
            print(f"note: {_one_placeholder_note(report.one_placeholder)}")
        print(report.summary())
    return 0 if report.ok else 1


def _one_placeholder_note(n: int) -> str:
    return (f"{n} record{'s' if n != 1 else ''} wrote one <image> for all of their images "
            "(Vision-LLM-Alignment's multi-image layout: \"image\": \"a.jpg,b.jpg\"); each such "
            "placeholder stands for the record's images in order and is expanded to one per image")


def _missing_image(err, root_given: bool) -> bool:
    return not root_given and "image file not found" in err.reason


def _root_hint(root: str) -> str:
    return (f"image paths are read from {root!r}, the input's folder: pass --image-root if "
            "they are elsewhere")


def cmd_convert(args) -> int:
    from ..data.readers import iter_records
    from ..data.writers import write_records
    from ..data.writers._common import refuse_overwrite
    from ..errors import DataError

    refuse_overwrite(args.output, [args.input])
    skip = args.on_error == "skip"
    records, bad = [], []
    for _, rec in iter_records(args.input, format=args.format, kind=args.kind):
        if isinstance(rec, DataError):
            if not skip:
                raise rec
            bad.append(rec)
        else:
            records.append(rec)
    out = Path(args.output)
    given = args.image_root is not None
    root = args.image_root or (args.input if Path(args.input).is_dir()
                               else str(Path(args.input).parent))
    image_dir = out.parent / "images"
    had_images = set(image_dir.iterdir()) if image_dir.is_dir() else set()
    unwritten: list[DataError] = []  # records the format or their images refused (skip)
    try:
        write_records(records, out, args.to, image_root=root, image_dir=image_dir,
                      skipped=unwritten if skip else None)
    except DataError as e:
        if not _missing_image(e, given):
            raise
        raise DataError(f"{e.reason}; {_root_hint(root)}", file=e.file, index=e.index,
                        field=e.field) from None
    for e in bad + unwritten:
        print(f"skipped: {e}")
    if any(_missing_image(e, given) for e in unwritten):
        print(f"hint: {_root_hint(root)}")
    n_bad, n_out = len(bad) + len(unwritten), len(records) - len(unwritten)
    kinds = sorted({r.kind for r in records}) if n_out else []
    print(f"wrote {n_out} records ({', '.join(kinds) or 'none'}) to {out} as {args.to}"
          + (f"; skipped {n_bad} bad records" if n_bad else ""))
    new_images = (set(image_dir.iterdir()) if image_dir.is_dir() else set()) - had_images
    if new_images:
        print(f"wrote {len(new_images)} images to {image_dir}")
    return 0


def _tokenizer(model: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)
    except Exception:
        from ..models import load_adapter

        return load_adapter(model).tokenizer


def cmd_stats(args) -> int:
    from ..data.stats import compute_stats

    tok = _tokenizer(args.model) if args.model else None
    s = compute_stats(args.file, args.image_root, format=args.format, kind=args.kind,
                      tokenizer=tok, check_images=not args.no_images,
                      max_pixels=args.max_pixels or None, max_images=args.max_images,
                      max_sample_pixels=args.max_sample_pixels)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0

    def rng(d):
        return "-" if d["min"] is None else f"min {d['min']}, mean {d['mean']}, max {d['max']}"

    kinds = ", ".join(f"{k}: {v}" for k, v in s["kinds"].items()) or "none"
    print(f"file: {s['file']}")
    notes = [] if s["images_checked"] else ["images not checked"]
    if s["first_problem"]:
        notes.append(f"first: {s['first_problem']}")
    print(f"records: {s['records']} ({kinds}); bad records: {s['bad_records']}"
          + (f" ({'; '.join(notes)})" if notes else ""))
    print(f"images per record: {rng(s['images_per_record'])}")
    print(f"user turns per record: {rng(s['turns'])}")
    print(f"response length (chars): {rng(s['response_chars'])}")
    if "response_tokens" in s:
        print(f"response length (tokens): {rng(s['response_tokens'])}")
    share = s["text_only_share"]
    print(f"text-only records: {'-' if share is None else f'{100 * share:.1f}%'}")
    print(f"distinct images: {s['distinct_images']}")
    print(f"duplicate ids: {s['duplicate_ids']}")
    print(f"conversations ending with an unanswered user turn: {s['unanswered_last_turns']}")
    print(f"records with one <image> for several images (expanded): {s['one_placeholder_records']}")
    return 0


def cmd_align_levels(args) -> int:
    from ..models.alignment_scores import align_levels
    from .args import refuse_output_over_input

    refuse_output_over_input(args.out, args.file)
    rep = align_levels(args.file, args.scorer, args.out, buckets=args.buckets, image_root=args.image_root,
                       max_pixels=args.max_pixels or None)
    print(f"wrote {rep.records} records with their alignment bucket (0..{rep.buckets - 1}; records per bucket: "
          f"{', '.join(map(str, rep.counts))}) to {rep.out}")
    return 0
