"""Writers: records of the internal schema -> files in a supported format.

==========  ================================================  ===============================
format      holds                                             container
==========  ================================================  ===============================
vlmalign    every kind, losslessly                            JSON Lines (``.json``: a list)
llava       conversation, ranked, preference (2-ranked)       JSON list (``.jsonl``: lines)
plain_dpo   preference (single-turn prompt)                   JSON list (``.jsonl``: lines)
vqa         rl_prompt (single-turn prompt)                    JSON list (``.jsonl``: lines)
trl         conversation, preference, unpaired, rl_prompt     ``.parquet``, else a
                                                              ``save_to_disk`` directory
==========  ================================================  ===============================

A record a format cannot hold (or whose image ``trl`` cannot read) raises :class:`DataError`
naming the record -- or, given a ``skipped`` list, is appended to it and left out. Writing
over a file the records were read from is refused. Path formats
keep image paths unchanged (same image root); images held as bytes are written to
``image_dir`` (``convert`` uses ``<OUT dir>/images/``) named by content hash. ``trl`` embeds
image bytes, reading path images from ``image_root``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ...errors import DataError
from ..schema import Record
from . import llava, native, plain_dpo, trl, vqa
from ._common import Images, each_record, refuse_overwrite, write_json

JSON_WRITERS = {"vlmalign": native, "llava": llava, "plain_dpo": plain_dpo, "vqa": vqa}
WRITE_FORMATS = (*JSON_WRITERS, "trl")


def write_records(records: Iterable[Record], out: str | os.PathLike, format: str, *,
                  image_root: str | os.PathLike | None = None,
                  image_dir: str | os.PathLike | None = None,
                  skipped: list[DataError] | None = None) -> Path:
    """Write ``records`` to ``out`` in ``format`` (one of :data:`WRITE_FORMATS`); returns ``out``.

    ``skipped``: a list that collects the records that cannot be written instead of raising.
    """
    from ..readers import canonical_format

    fmt = canonical_format(format)
    if fmt not in WRITE_FORMATS:
        raise DataError(f"cannot write format {fmt!r} (writable: {', '.join(WRITE_FORMATS)})")
    out = Path(out)
    records = list(records)
    refuse_overwrite(out, sorted({r.source for r in records if r.source is not None}))
    images = Images(out, image_dir=image_dir, image_root=image_root)
    if fmt == "trl":
        trl.write(records, out, images, skipped)
        return out
    objs = each_record(records, lambda r: JSON_WRITERS[fmt].to_obj(r, images), skipped)
    lines = out.suffix.lower() != ".json" if fmt == "vlmalign" else out.suffix.lower() == ".jsonl"
    write_json(objs, out, lines=lines)
    return out


__all__ = ["WRITE_FORMATS", "write_records"]
