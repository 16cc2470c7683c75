"""What a merge did: returned to the caller, printed by the CLI and kept in the output directory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import write_json
from .methods import MERGEKIT_NAME, MergeSpec

RECORD = "vlmalign_merge.json"


@dataclass
class MergeReport:
    out: str
    kind: str                      # "full" (checkpoints) or "lora" (adapters)
    spec: MergeSpec
    inputs: list[str]
    base: str | None = None
    tensors: int = 0               # tensors merged (LoRA: updates B·A, plus fully trained tensors)
    lora_out: str | None = None    # "merged", or "rank:R"
    relative_error: float | None = None       # rank:R: ||ΔW - B'A'||_F / ||ΔW||_F over all modules
    max_relative_error: float | None = None   # ... the largest of one module
    worst_module: str | None = None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        d = asdict(self)
        d["spec"] = {**asdict(self.spec), "mergekit_method": MERGEKIT_NAME[self.spec.method]}
        return d

    def write(self, directory: Path) -> None:
        write_json(Path(directory) / RECORD, self.record())

    def summary(self) -> str:
        what = "LoRA adapters" if self.kind == "lora" else "checkpoints"
        lines = [f"merged {len(self.inputs)} {what} with {self.spec.method} "
                 f"(mergekit {MERGEKIT_NAME[self.spec.method]}): {self.tensors} tensors -> {self.out}"]
        if self.relative_error is not None:
            lines.append(f"rank {self.lora_out.split(':')[1]} refactorisation: relative Frobenius error "
                         f"{self.relative_error:.3g} overall, {self.max_relative_error:.3g} at most "
                         f"({self.worst_module})")
        return "\n".join(lines + self.notes)
