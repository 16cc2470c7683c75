"""The data layer: files in community formats <-> the internal schema (:mod:`.schema`).

Public API::

    read_file(path, *, format="auto", kind=None) -> list[Record]
    iter_records(path, *, format="auto", kind=None) -> Iterator[(index, Record | DataError)]
    detect_format(path) -> str
    write_records(records, out, format, *, image_root=None, image_dir=None) -> Path
    validate_file(path, image_root=None, *, format="auto", kind=None, adapter=None,
                  max_length=None, ...) -> ValidationReport
    load_records(path, image_root=None, on_error="raise" | "skip", ...) -> LoadedRecords
    compute_stats(path, image_root=None, *, format="auto", kind=None, tokenizer=None) -> dict

Formats are described in :mod:`.readers` and :mod:`.writers`; record kinds in :mod:`.schema`
and the conversions between them in :mod:`.kinds`.
"""

from .readers import FORMATS, detect_format, iter_records, read_file
from .stats import compute_stats
from .validate import LoadedRecords, Problem, ValidationReport, load_records, validate_file
from .writers import WRITE_FORMATS, write_records

__all__ = ["FORMATS", "WRITE_FORMATS", "LoadedRecords", "Problem", "ValidationReport",
           "compute_stats", "detect_format", "iter_records", "load_records", "read_file",
           "validate_file", "write_records"]
