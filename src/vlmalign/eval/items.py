"""What every benchmark reader produces and every eval task consumes: :class:`EvalItem`.

Readers (:mod:`.readers`) turn a benchmark file in its public layout into a list of items;
tasks (:mod:`.tasks`) turn an item into a prompt, parse the model's answer and score the rows.
Nothing after the reader knows the file layout. ``source`` and ``index`` name the file and row
an item came from, so any later error can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.schema import ImageRef


@dataclass
class EvalItem:
    id: str                                  # unique within the benchmark: predictions are keyed by it
    question: str                            # the question as the benchmark asks it (no options, no hint)
    images: list[ImageRef] = field(default_factory=list)
    # the reference: an option letter (multiple choice), "yes"/"no", one answer, or several
    # (VQAv2's 10 human answers, a caption's references); None when the file has none (test splits)
    answer: str | list[str] | None = None
    options: dict[str, str] | None = None    # letter -> option text, in the file's order
    category: str | None = None              # subtask / category / dimension / subject
    group: str | None = None                 # items scored together (an MME image, an MMBench question's rotations)
    split: str | None = None                 # POPE's random / popular / adversarial
    hint: str | None = None                  # context shown before the question (MMBench hint, ScienceQA lecture)
    meta: dict[str, Any] = field(default_factory=dict)   # anything else a scorer needs (CHAIR objects, ...)
    source: str = ""                         # file the item was read from
    index: int = 0                           # its row / record in that file

    def where(self) -> str:
        return f"{self.source}: record {self.index} (id {self.id})"
