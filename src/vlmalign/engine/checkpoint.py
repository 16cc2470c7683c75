"""Atomic checkpoints: weights (safetensors), optimizer, scheduler, RNG states, data position.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N``
only when complete, so a run killed at any moment leaves every ``step-*`` directory whole. The
``model/`` subdirectory is a normal Hugging Face (or PEFT adapter) directory; trainer state is
loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import VlmalignError
from ..files import atomic_dir
from ..models.peft import EXTRA_PARAMS, is_peft, load_peft_extra, own_base_class, peft_extra_params
from ..models.prompt_layout import write_layout
from ..models.zero import gathered

_STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    gauss = None if py[-1] == -1 else py[-1]
    random.setstate((state["python_version"], tuple(int(x) for x in py[:-1]), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.exists():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.pt").exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    cks = list_checkpoints(ckpt_dir)
    return cks[-1][1] if cks else None


def save_checkpoint(ckpt_dir: Path, step: int, model, processor, trainer_state: dict, *,
                    keep_last: int = 2, extra_modules: dict | None = None, extra_states: dict | None = None,
                    state_dict: dict | None = None, prompt_layout: dict | None = None) -> Path:
    """Write ``step-N`` atomically; prune to the newest ``keep_last``. A write that fails (a
    full disk, most often) removes its partial copy, keeps every earlier checkpoint and says why.
    ``prompt_layout`` (where the training prompts put their images) goes into the model folder.
    ``extra_modules`` are written as ``NAME.safetensors`` (their state dicts, or ``extra_states``:
    the states to write in their place, e.g. gathered from shards)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step}"
    try:
        with atomic_dir(final) as tmp:   # written into .tmp-step-N, renamed when whole
            extra = extra_states if extra_states is not None else \
                {name: mod.state_dict() for name, mod in (extra_modules or {}).items()}
            _write_checkpoint(tmp, model, processor, trainer_state, step, extra, state_dict)
            write_layout(tmp / "model", prompt_layout)
    except (OSError, RuntimeError) as e:
        raise CheckpointWriteError(_write_failure(ckpt_dir, step, e)) from e
    for _, old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointWriteError(VlmalignError):
    pass


def _write_checkpoint(tmp: Path, model, processor, trainer_state, step, extra_states, state_dict) -> None:
    with own_base_class(model):   # a LoRA model sharded with FSDP2: its base's own class recorded
        if state_dict is not None:
            model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
        else:
            model.save_pretrained(tmp / "model", safe_serialization=True)
    if is_peft(model):
        extra = peft_extra_params(model, state_dict)
        if extra:
            from safetensors.torch import save_file
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()},
                      str(tmp / "model" / EXTRA_PARAMS))
    if processor is not None:
        processor.save_pretrained(tmp / "model")
    for name, sd in extra_states.items():
        from safetensors.torch import save_file as save_tensors
        save_tensors({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    torch.save({**trainer_state, "rng": rng_state(), "step": step}, tmp / "trainer_state.pt")


# torch's zip writer reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
_DISK_FULL_TEXT = ("unexpected pos", "no space left", "file write failed", "disk quota")


def _write_failure(ckpt_dir: Path, step: int, err: Exception) -> str:
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        any(t in str(err).lower() for t in _DISK_FULL_TEXT)
    prev = latest_checkpoint(ckpt_dir)
    kept = f"the previous checkpoint {prev} is kept" if prev else "no earlier checkpoint exists"
    where = f"{ckpt_dir} ({free / 2**20:.0f} MiB free)" if free is not None else str(ckpt_dir)
    why = "the disk is full" if full else f"{type(err).__name__}: {err}"
    return f"could not write checkpoint step-{step} to {where}: {why}; the partial copy was removed and {kept}"


def check_resume_layout(state: dict, current: dict, ckpt: Path) -> None:
    """Refuse to resume with settings that change which records each step sees (batch size,
    accumulation, process count, seed, data size) — the data position would no longer match."""
    saved = state.get("layout")
    if not saved:
        return  # a checkpoint from before these were recorded
    diff = [f"{k}: {saved[k]} in the checkpoint, {current[k]} now" for k in current
            if k in saved and saved[k] != current[k]]
    if diff:
        raise VlmalignError(f"cannot resume from {ckpt} with different settings ({'; '.join(diff)}): use the "
                            "settings of the interrupted run, or start a new run (train.overwrite=true or "
                            "another train.output_dir)")


def load_weights_into(model, model_dir: Path) -> None:
    """Load a checkpoint's weights into an existing (possibly PEFT-wrapped) model, strictly.

    Full models go through ``from_pretrained`` of the same class, which applies transformers'
    checkpoint key mapping (files on disk use the original checkpoint names for several
    families); the loaded tensors are then copied into the live model.
    """
    from safetensors.torch import load_file
    if is_peft(model):
        from peft.utils import set_peft_model_state_dict
        f = model_dir / "adapter_model.safetensors"
        if not f.exists():
            raise VlmalignError(f"{model_dir}: no adapter_model.safetensors to resume LoRA from")
        with gathered(list(model.parameters()), modifier_rank=0):   # ZeRO-3 shards (models/zero.py)
            res = set_peft_model_state_dict(model, load_file(str(f)))
        if getattr(res, "unexpected_keys", None):
            raise VlmalignError(f"{model_dir}: unexpected adapter keys {res.unexpected_keys[:5]}")
        load_peft_extra(model, model_dir)
        return
    if not any(model_dir.glob("*.safetensors")):
        raise VlmalignError(f"{model_dir}: no .safetensors weights")
    dtype = next(model.parameters()).dtype
    loaded = type(model).from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True)
    # ZeRO-3 shards are gathered whole (every process takes part), written on process 0 (every
    # process reads the same files) and partitioned again; under accelerate's zero3_init_flag the
    # loaded copy is partitioned too
    with gathered(list(loaded.parameters())), gathered(list(model.parameters()), modifier_rank=0):
        src = loaded.state_dict()
        dst = model.state_dict()
        if src.keys() != dst.keys():
            raise VlmalignError(f"{model_dir}: weights do not match the model "
                                f"(missing {sorted(dst.keys() - src.keys())[:5]}, "
                                f"unexpected {sorted(src.keys() - dst.keys())[:5]})")
        with torch.no_grad():
            for k, v in dst.items():
                v.copy_(src[k])
    del loaded


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
