"""The PEFT helpers FSDP2 sharding relies on (engine/sharding.py): the module a LoRA model's
forward and generate run (the root unit), and the base model's own class in a sharded adapter's
saved config."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vlmalign.models.peft import forward_root, own_base_class

peft = pytest.importorskip("peft")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


def _lora(model):
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lin"]))


def test_forward_root_is_the_model_inside_the_wrapper():
    plain = Toy()
    assert forward_root(plain) is plain
    wrapped = _lora(Toy())
    inner = forward_root(wrapped)
    assert inner is wrapped.get_base_model() and isinstance(inner, Toy)
    # the wrapper holds no parameters of its own: the root unit holds them all
    assert {id(p) for p in inner.parameters()} == {id(p) for p in wrapped.parameters()}
    # the wrapper's forward runs the inner module's own forward (where FSDP2's hooks sit)
    calls = []
    inner.register_forward_pre_hook(lambda m, a: calls.append(m))
    wrapped(torch.zeros(1, 4))
    assert calls == [inner]


def test_a_sharded_base_is_saved_under_its_own_class(tmp_path):
    from torch.distributed.fsdp import FSDPModule
    wrapped = _lora(Toy())
    base = wrapped.get_base_model()
    base.__class__ = type("FSDPToy", (FSDPModule, Toy), {})   # as fully_shard swaps the class

    def saved(d):
        wrapped.save_pretrained(str(d))
        return json.loads((d / "adapter_config.json").read_text())["auto_mapping"]["base_model_class"]

    assert saved(tmp_path / "plain") == "FSDPToy"   # PEFT alone records FSDP2's subclass
    with own_base_class(wrapped):
        assert saved(tmp_path / "own") == "Toy"
    assert "_get_base_model_class" not in vars(wrapped)
    assert saved(tmp_path / "after") == "FSDPToy"
    with own_base_class(Toy()):   # anything else: nothing to do
        pass
