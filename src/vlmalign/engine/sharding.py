"""FSDP2 in the engine (``train.sharding=fsdp2``, or an ``accelerate launch`` with an FSDP config):
torch's ``fully_shard`` applied by the engine itself, on CPU processes (gloo) as on GPUs (NCCL).

Why the engine shards and not accelerate: accelerate 1.16 builds FSDP only for GPU-like process
groups (``AcceleratorState`` turns a CPU launch into ``MULTI_CPU``: DDP over gloo), and its
FSDP2 wrapping (``fsdp2_prepare_model``) leaves the vision tower's norms in the root unit, so the
image encoding, which runs outside the model's forward (encoded once per step, see
``models/adapter.py``), meets sharded parameters and fails (``aten.native_layer_norm.default got
mixed torch.Tensor and DTensor``; seen with accelerate's FSDP2 forced onto CPU processes). Here
the units are chosen so that every module called on its own is one (:func:`shard`):

* the family adapter's ``shard_units()``: the layers transformers lists as unsplittable
  (decoder and vision-encoder layers) and the modules ``encode_images`` calls outside the
  forward (vision tower, projector);
* the trained module itself as the root (embeddings, LM head, norms, a reward head, ...); for a
  LoRA (PEFT) model, the transformers model inside the PEFT wrapper
  (:func:`~vlmalign.models.peft.forward_root`). FSDP2 gathers a unit's parameters when the
  unit's own forward is called; the wrapper's forward and ``generate`` both call the inner
  model's (``generate`` once per token), so training, the no-grad forwards and sampling all
  gather the root unit per forward, as for a model without LoRA. Sharding the wrapper instead
  left the root unit sharded in ``generate`` (which never calls the wrapper's forward:
  ``aten.embedding.default got mixed torch.Tensor and DTensor``). :func:`fsdp_root` finds
  that unit from the trained module (gradient sync, :func:`root_gathered`).

A parameter the encoding reads outside every unit's forward (a bare one of a module that is no
unit: InstructBLIP's ``query_tokens``, LLaVA-NeXT's ``image_newline``, the Mllama tower's
``class_embedding``; the adapter's ``replicated_params``) would fall to the root unit, which is
gathered only in the model's forward, and the encoding would meet its shard (``got mixed
torch.Tensor and DTensor``). Such parameters stay whole on every process (FSDP2's
``ignored_params``, passed as ``replicated``): each process's backward leaves its own share of
their gradient, which :func:`average_replicated_grads` averages over the processes before the
update, as FSDP2's reduce-scatter does for the sharded ones; :func:`clip_grad_norm_` takes the
norm over both kinds. Gathering the root around the encoding instead fails in backward: FSDP2
reduces and reshards the root when the gradient reaches the forward's inputs (the image
features), before the encoding's backward reaches the parameter.

A module trained beside the model (PPO's critic: a method's ``shard_modules``) is sharded the
same way, on the same mesh, as a root of its own.

Every unit reshards after each forward, so outside a forward the module holds only its shards.
The root is initialised before the first encoding (FSDP2 takes the first module that runs as the
root otherwise). Checkpoints hold full tensors gathered collectively (:func:`full_model_state`,
:func:`full_optimizer_state`): a sharded run writes the same model directory as an unsharded
one, and a resumed run loads the weights before sharding and the optimizer state after it.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..errors import VlmalignError

log = logging.getLogger(__name__)


def _depth_first_order(root: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """``units`` that lie inside ``root`` (each once), deepest first: fully_shard runs bottom-up,
    so a unit's parameters are those no unit below it took."""
    names = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}
    seen, out = set(), []
    for m in units:
        if m is root or id(m) not in names or id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
    return sorted(out, key=lambda m: -names[id(m)].count("."))


def device_mesh(device_type: str):
    """The 1-d mesh over every process of the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (dist.get_world_size(),))


def shard(root: nn.Module, units: list[nn.Module], *, device_type: str, offload: bool = False,
          mesh=None, replicated=()) -> nn.Module:
    """Apply FSDP2 to ``units`` (deepest first) and then to ``root`` over all processes of the
    default process group (``mesh``: the :func:`device_mesh` to use, so that several roots share
    one; default: a new one); returns ``root`` (changed in place: its parameters become DTensor
    shards, so build the optimizer afterwards). ``replicated``: parameters left whole on every
    process (moved to the device; their gradients: :func:`average_replicated_grads`)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from ..models.peft import forward_root

    mesh = mesh if mesh is not None else device_mesh(device_type)
    kw = dict(mesh=mesh, reshard_after_forward=True,
              offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    # the root unit: the module whose own forward every call of ``root`` runs (a PEFT wrapper's
    # inner model); it must hold every parameter, or some would stay unsharded
    top = forward_root(root)
    if top is not root and {id(p) for p in top.parameters()} != {id(p) for p in root.parameters()}:
        raise VlmalignError(f"FSDP2: {type(root).__name__} holds parameters outside the model it wraps "
                            f"({type(top).__name__}); cannot shard it")
    ordered = _depth_first_order(top, units)
    mine = {id(p) for p in top.parameters()}
    replicated = [p for p in replicated if id(p) in mine]
    if replicated:
        kw["ignored_params"] = set(replicated)
    for m in ordered:
        fully_shard(m, **kw)
    fully_shard(top, **kw)
    if replicated and device_type != "cpu":
        # FSDP2 moves the parameters it manages to the mesh's device, not the ignored ones
        dev = torch.device(device_type, torch.get_device_module(device_type).current_device())
        for p in replicated:
            p.data = p.data.to(dev)
    # FSDP2 picks as root the first of its modules to run a forward; the image encoding runs
    # the vision tower's units before the model's forward, so the root is initialised here.
    # (A private call: torch 2.13 offers no public one; tests/integration/test_fsdp2.py runs it.)
    top._get_fsdp_state()._lazy_init()
    n = dist.get_world_size()
    log.info("FSDP2: %d units + the root over %d process%s (%s)%s", len(ordered), n, "es" if n > 1 else "",
             device_type, f"; {len(replicated)} parameter(s) kept whole" if replicated else "")
    return root


def _replicated_trainable(params) -> list[nn.Parameter]:
    from torch.distributed.tensor import DTensor
    return [p for p in params if p.requires_grad and not isinstance(p, DTensor)]


def average_replicated_grads(params) -> None:
    """Average over the processes the gradients of those of ``params`` (of sharded modules)
    that :func:`shard` kept whole (``replicated``: plain tensors among the DTensors), as FSDP2's
    reduce-scatter does for the sharded ones (their sum over the processes, divided by the
    process count). A process whose backward never reached one (e.g. no image in its batch)
    contributes zeros; one that no process's backward reached keeps no gradient (the optimizer
    skips it, as in one process). Every process must call it, with the same parameters, after
    the last micro-batch's backward of a step and before clipping."""
    import torch.distributed as dist
    params = _replicated_trainable(params)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    had = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), had])
    dist.all_reduce(flat)
    flat[:-len(params)] /= dist.get_world_size()
    off = 0
    for p, any_grad in zip(params, flat[-len(params):].tolist()):
        n = p.numel()
        g = flat[off:off + n].view_as(p).to(p.dtype)
        off += n
        if p.grad is not None:
            p.grad.copy_(g)
        elif any_grad > 0:
            p.grad = g


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the parameters of sharded modules, where some
    are DTensor shards and some were kept whole (torch's own refuses the mix: ``got mixed
    torch.Tensor and DTensor``): the 2-norm over both kinds (the shards' gathered over the
    processes), each gradient scaled by the same factor. Returns that norm."""
    from torch.distributed.tensor import DTensor
    params = [p for p in params if p.grad is not None]
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    if not plain or len(plain) == len(params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    shards = [p for p in params if isinstance(p.grad, DTensor)]
    a = torch.nn.utils.get_total_norm([p.grad for p in shards])
    b = torch.nn.utils.get_total_norm([p.grad for p in plain])
    a = a.full_tensor() if isinstance(a, DTensor) else a
    total = torch.linalg.vector_norm(torch.stack([a, b.to(a.device)]))
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    for p in params:
        p.grad.mul_(coef)
    return total


def fsdp_root(module: nn.Module):
    """The FSDP2 root unit :func:`shard` made of ``module`` (``module`` itself, or the model
    inside its PEFT wrapper), or None where ``module`` is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    from ..models.peft import forward_root
    top = forward_root(module)
    return top if isinstance(top, FSDPModule) else None


def is_sharded(module: nn.Module) -> bool:
    return fsdp_root(module) is not None


def set_gradient_sync(root: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduce-scatters the gradients (``enabled``) or keeps them
    unsharded and accumulated on each process (a micro-batch that is not the last before an
    update). FSDP2 reads this when the backward runs, so it is set before the micro-batch and
    stays set through its backward."""
    fsdp_root(root).set_requires_gradient_sync(enabled)


@contextlib.contextmanager
def root_gathered(module: nn.Module):
    """A context in which the root unit's parameters of a sharded ``module`` (embeddings,
    output head, final norm) are gathered, for calling them outside the model's forward; then
    resharded. Every process must enter it."""
    root = fsdp_root(module)
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """The root's full state dict as CPU tensors on the main process ({} on the others); every
    process must call it (the shards are all-gathered). ``root`` may also be a plain module that
    holds sharded parameters (PPO's view of its critic's trainable ones)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(root, options=_options(cpu_offload=True))


def full_optimizer_state(root: nn.Module, optimizer) -> dict:
    """The optimizer's full state (keyed by parameter name) on the main process ({} elsewhere);
    collective like :func:`full_model_state`.

    An optimizer that has not stepped yet (the policy's during PPO's critic warm-up) keeps no
    state: torch fills an empty one with a step on zero gradients before reading it (Adam: step
    count 1, zero moments), which would change the next real update (its bias correction) and
    be saved; that filling is undone here and the state written empty, as the optimizer's own
    ``state_dict`` would be (tests/integration/test_rl_processes.py, ``ppo_fsdp2``)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    opt = _plain(optimizer)
    fresh = not opt.state
    state = get_optimizer_state_dict(root, opt, options=_options(cpu_offload=True))
    if fresh:
        opt.state.clear()
        if state:
            state["state"] = {}
    return state


def load_optimizer_state(root: nn.Module, optimizer, state: dict) -> None:
    """Load a state written by :func:`full_optimizer_state` (every process passes the whole
    state; each keeps its shards). Not strict: a trainable parameter that never had a gradient
    (e.g. a norm after the layer the projector reads) has no Adam state, as in torch's own
    ``Optimizer.state_dict``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    opt = _plain(optimizer)
    set_optimizer_state_dict(root, opt, optim_state_dict=state, options=_options(strict=False))
    if not state.get("state"):   # written before the first step: the filling torch did is undone
        opt.state.clear()


def _plain(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer
