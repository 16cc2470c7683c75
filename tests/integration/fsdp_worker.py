"""One process of a multi-process test run (started by torchrun from test_fsdp2.py): trains each
run of a JSON list in turn, ``[{"method": "sft", "overrides": [...]}, ...]``, the way
``vlmalign train METHOD OVERRIDES...`` does (registry, config, ``Method.train``), in one process
group. For every optimizer step it writes beside the run (``encodes-rank{R}.jsonl``, one line a
step) the images of each ``encode_images`` call, the unique images of each micro-batch, and how
many parameter elements this process holds against the model's; ``done-rank{R}`` when the run
has finished."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if os.environ.get("VLMALIGN_TIMM_INNER"):   # the timm side environment (timm_env.py): before torchvision loads
    from timm_env import allow_torchvision_without_ops
    allow_torchvision_without_ops()

from torch.distributed.tensor import DTensor  # noqa: E402

from vlmalign.config import load_config  # noqa: E402
from vlmalign.engine.sharding import is_sharded  # noqa: E402
from vlmalign.engine.trainer import Trainer  # noqa: E402
from vlmalign.methods.registry import get  # noqa: E402
from vlmalign.models.adapter import VLMAdapter  # noqa: E402

calls: list[int] = []
_encode = VLMAdapter.encode_images
_step = Trainer.train_step


def counting_encode(self, items, **kw):
    calls.append(len(items))
    return _encode(self, items, **kw)


def recorded_step(self):
    micro = self._micro_batches(self.step)   # the batches this step will see (built again inside)
    first = len(calls)
    out = _step(self)
    row = {"step": self.step, "encode_calls": calls[first:], "unique_images": [len(b.images) for b in micro],
           "sharded": is_sharded(self.runner),
           "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in self.model.parameters()),
           "full_numel": sum(p.numel() for p in self.model.parameters())}
    with open(Path(self.tc.output_dir) / f"encodes-rank{self.rank}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return out


def main(spec_file: str) -> None:
    VLMAdapter.encode_images = counting_encode
    Trainer.train_step = recorded_step
    for run in json.loads(Path(spec_file).read_text()):
        method = get(run["method"])
        cfg = load_config(method.config, None, run["overrides"])
        method.train(cfg)
        from accelerate import PartialState
        Path(cfg.train.output_dir, f"done-rank{PartialState().process_index}").touch()


if __name__ == "__main__":
    main(sys.argv[1])
