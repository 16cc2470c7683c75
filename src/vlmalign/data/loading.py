"""Data files -> tokenized training examples, under a run's ``data`` section: the image root,
the pixel budget, the per-sample caps (``data.max_images``, ``data.max_sample_pixels``), the
record limit and the skip policy (``data.on_error``), with what was skipped counted and
reported; records that wrote one ``<image>`` for several images are counted in the log."""

from __future__ import annotations

import logging
import os

from ..errors import DataError, VlmalignError
from .batching import ImageLoader, SkipReport, prepare
from .images import check_sample_images, image_size

log = logging.getLogger(__name__)


def data_root(data_cfg, file: str) -> str:
    return data_cfg.image_root or os.path.dirname(os.path.abspath(file))


ONE_PLACEHOLDER = ("wrote one <image> for all of their images (Vision-LLM-Alignment's multi-image "
                   "layout): each such placeholder was expanded to one per image, in order")


def check_sample(rec, data_cfg, root: str) -> None:
    """The per-sample caps of ``data_cfg`` (``max_images``, ``max_sample_pixels``; unset: off)
    on ``rec``'s images and, for pairs, its rejected-side images; sizes come from the image
    headers, nothing is decoded. Raises :class:`DataError` naming the record and the limit."""
    max_images = getattr(data_cfg, "max_images", None)
    max_sample_pixels = getattr(data_cfg, "max_sample_pixels", None)
    if max_images is None and max_sample_pixels is None:
        return
    for field, refs in (("images", rec.images),
                        ("rejected_images", getattr(rec, "rejected_images", None) or [])):
        if not refs:
            continue
        try:
            check_sample_images([(0, 0)] * len(refs), max_images=max_images, field=field)
            if max_sample_pixels is not None:  # the count first: no header read for too many
                sizes = [image_size(r, root, max_pixels=data_cfg.max_pixels) for r in refs]
                check_sample_images(sizes, max_sample_pixels=max_sample_pixels, field=field)
        except DataError as e:
            raise e.located(file=rec.source, index=rec.index) from None


def read_records(path: str, data_cfg, *, kind: str | None = None, limit: int | None = None):
    """Read a data file into schema records, honouring the skip policy for unreadable records
    and for records over the per-sample caps (:func:`check_sample`)."""
    from .readers import iter_records
    if limit is not None and limit < 1:
        raise VlmalignError(f"{path}: a record limit must be at least 1 (got {limit}); leave it unset to use "
                            "every record")
    recs, report = [], SkipReport()
    root = data_root(data_cfg, path)
    for item in iter_records(path, format=data_cfg.format, kind=kind):
        idx, rec = item if isinstance(item, tuple) else (None, item)
        report.total += 1
        if not isinstance(rec, Exception):
            try:
                check_sample(rec, data_cfg, root)
            except DataError as e:
                rec = e
        if isinstance(rec, Exception):
            if data_cfg.on_error == "raise":
                raise rec
            report.skipped.append(rec)
            continue
        recs.append(rec)
        if limit is not None and len(recs) >= limit:
            break
    expanded = sum(1 for r in recs if r.one_placeholder_for)
    if expanded:
        log.info("%s: %d record%s %s", path, expanded, "s" if expanded != 1 else "", ONE_PLACEHOLDER)
    if kind is not None:
        from .kinds import conversion_notes
        for note in conversion_notes(recs, kind):
            log.warning("%s: %s", path, note)
    return recs, report


def image_loader(adapter, data_cfg, path: str) -> ImageLoader:
    """The loader for ``path``'s images: confined to the data root, within the pixel budget."""
    return ImageLoader(adapter, data_root(data_cfg, path), max_pixels=data_cfg.max_pixels)


def load_examples(path: str, data_cfg, adapter, tokenize, *, kind=None, limit=None):
    """Records -> tokenized examples (+ the image loader and what was skipped)."""
    recs, rep1 = read_records(path, data_cfg, kind=kind, limit=limit)
    loader = image_loader(adapter, data_cfg, path)
    examples, rep2 = prepare(recs, tokenize, loader, on_error=data_cfg.on_error)
    rep = SkipReport(skipped=rep1.skipped + rep2.skipped, total=rep1.total)
    report_examples(path, examples, rep)
    return examples, loader, rep


def report_examples(path: str, examples, rep: SkipReport) -> None:
    """Report what the skip policy dropped; refuse a file that leaves no example, naming it."""
    if rep.count:
        log.warning("%s: %s", path, rep.summary())
    if not examples:
        why = "it has no records" if rep.total == 0 else f"all {rep.total} records were skipped as bad"
        raise DataError(f"no usable examples: {why}", file=str(path))


def load_splits(data_cfg, load):
    """``(train examples, train loader, eval examples, eval loader)``: ``load(path, limit)`` on
    ``data.train_file`` (``data.max_train_samples``) and, when set, ``data.eval_file``
    (``data.max_eval_samples``; else ``[], None``)."""
    examples, loader = load(data_cfg.train_file, data_cfg.max_train_samples)
    eval_examples, eval_loader = [], None
    if data_cfg.eval_file:
        eval_examples, eval_loader = load(data_cfg.eval_file, data_cfg.max_eval_samples)
    return examples, loader, eval_examples, eval_loader
