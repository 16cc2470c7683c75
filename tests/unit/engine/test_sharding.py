"""engine/sharding.py's parameters kept whole (``replicated``): a family's ``replicated_params``
name what its image encoding reads that no unit holds; sharded beside DTensor shards they are
clipped together with them. (Two sharded processes against one: tests/integration/test_fsdp2.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from vlmalign.engine.sharding import average_replicated_grads, clip_grad_norm_, shard
from vlmalign.models import adapter_for, build_tiny


@pytest.mark.parametrize("family", ["instructblip", "llava_next", "mllama"])
def test_replicated_params_are_the_encoders_parameters_no_unit_holds(family):
    model, processor = build_tiny(family)
    ad = adapter_for(model, processor)
    covered = {id(p) for u in ad.shard_units() for p in u.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    prefixes = (*ad.vision_prefixes, *ad.projector_prefixes)
    loose = {n for n, p in model.named_parameters() if n.startswith(prefixes) and id(p) not in covered}
    assert loose == set(ad.replicated_params) == {names[id(p)] for p in ad.replicated_parameters()}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bare = nn.Parameter(torch.randn(4))   # read outside every forward, like an image_newline

    def forward(self, x):
        return self.lin(x)


@pytest.fixture
def one_process(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already up")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_kept_whole_beside_shards_and_clipped_with_them(one_process):
    from torch.distributed.tensor import DTensor
    torch.manual_seed(0)
    plain = Toy()
    sharded = shard(copy.deepcopy(plain), [], device_type="cpu", replicated=[])
    assert isinstance(sharded.bare, DTensor)   # without replicated: a shard like the rest
    sharded = shard(copy.deepcopy(plain), [], device_type="cpu", replicated=[plain.bare])
    assert isinstance(sharded.bare, DTensor)   # a parameter of another module is ignored
    m = copy.deepcopy(plain)
    shard(m, [], device_type="cpu", replicated=[m.bare])
    assert not isinstance(m.bare, DTensor) and isinstance(m.lin.weight, DTensor)
    x = torch.randn(3, 4)
    for mod in (plain, m):
        (mod(x + mod.bare) ** 2).sum().backward()
    average_replicated_grads(list(m.parameters()))   # one process: its own gradients
    want = torch.nn.utils.clip_grad_norm_(list(plain.parameters()), 0.1)
    got = clip_grad_norm_(list(m.parameters()), 0.1)
    assert want > 0.1 and torch.allclose(got, want)
    for (n, a), b in zip(plain.named_parameters(), m.parameters()):
        g = b.grad.full_tensor() if isinstance(b.grad, DTensor) else b.grad
        assert torch.allclose(a.grad, g, atol=1e-7), n
