"""ZeRO-3 partitioned parameters where vlmalign reads or writes weights (models/zero.py).

Without deepspeed: parameters that carry ZeRO-3's attributes (simulated: an empty tensor with
``ds_shape`` / ``ds_status`` / ``ds_id``) report their full shape, and ordinary ones pass through
``gathered`` untouched. With deepspeed importable: a tiny LLaVA loaded the way accelerate's
``zero3_init_flag`` loads it (transformers under ``HfDeepSpeedConfig``, so every parameter is a real
ZeRO-3 shard) in a one-process gloo group, in a subprocess of its own (the process group and
DeepSpeed's global state stay out of the test process)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vlmalign.models.zero import full_shape, gathered, is_partitioned


def _fake_shard(shape):
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_shape, p.ds_status, p.ds_id = torch.Size(shape), "NOT_AVAILABLE", 7
    return p


def test_a_simulated_shard_reports_its_full_shape():
    p = _fake_shard((32, 16))
    assert p.shape == torch.Size([0]) and is_partitioned(p) and full_shape(p) == (32, 16)
    q = torch.nn.Parameter(torch.ones(3, 2))
    assert not is_partitioned(q) and full_shape(q) == (3, 2)


def test_text_hidden_size_reads_a_shards_full_shape():
    from vlmalign.models.scalar_head import text_hidden_size

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.emb.weight = _fake_shard((10, 24))

        def get_input_embeddings(self):
            return self.emb

    assert text_hidden_size(M()) == 24


def test_ordinary_parameters_pass_through_gathered():
    lin = torch.nn.Linear(3, 2)
    before = lin.weight.detach().clone()
    with gathered(lin.parameters(), modifier_rank=0):
        assert lin.weight.shape == (2, 3)
    assert torch.equal(lin.weight, before)


SCRIPT = r"""
import json, os, sys, tempfile
from pathlib import Path
import torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
import deepspeed
from transformers.integrations import HfDeepSpeedConfig
from vlmalign.config import load_config
from vlmalign.engine.checkpoint import load_weights_into
from vlmalign.methods.registry import get
from vlmalign.methods.reference import same_encoder, starting_copy
from vlmalign.models import load_adapter, save_tiny
from vlmalign.models.scalar_head import ScalarModel, text_hidden_size
from vlmalign.models.zero import any_partitioned, gathered, is_partitioned

deepspeed.init_distributed(dist_backend="gloo")
tmp = Path(sys.argv[2])
save_tiny("llava", str(tmp / "a"), seed=0)
save_tiny("llava", str(tmp / "b"), seed=1)
plain = load_adapter(str(tmp / "a"), dtype=torch.float32)
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
      "bf16": {"enabled": False}, "fp16": {"enabled": False}}
keep = HfDeepSpeedConfig(ds)   # what accelerate's zero3_init_flag sets up: from_pretrained under zero.Init
ad = load_adapter(str(tmp / "a"), dtype=torch.float32)
ad2 = load_adapter(str(tmp / "a"), dtype=torch.float32)
out = {}
params = dict(ad.model.named_parameters())
out["partitioned"] = all(is_partitioned(p) and p.numel() == 0 for p in params.values())
out["hidden"] = [text_hidden_size(ad.model), text_hidden_size(plain.model)]
cfg = load_config(get("dpo").config, None, [])   # DPO's defaults: vision tower and projector frozen
out["same_encoder_equal"] = same_encoder(ad, ad2, cfg.model, cfg.lora)
proj = [p for n, p in ad2.param_groups()["projector"]][0]
with gathered([proj], modifier_rank=0):
    with torch.no_grad():
        proj.add_(1.0)
out["same_encoder_changed"] = same_encoder(ad, ad2, cfg.model, cfg.lora)
try:
    starting_copy(ad, cfg)
    out["starting_copy"] = "copied"
except Exception as e:
    out["starting_copy"] = str(e)
# weights gathered, written, partitioned again
load_weights_into(ad.model, tmp / "b")
del keep   # plain loads from here on
from transformers import AutoModelForImageTextToText
b = AutoModelForImageTextToText.from_pretrained(str(tmp / "b"), dtype=torch.float32)
pb = dict(b.named_parameters())
with gathered(list(ad.model.parameters())):
    out["loaded_diff"] = max(float((p.detach() - pb[n].detach()).abs().max()) for n, p in ad.model.named_parameters())
out["still_partitioned"] = any_partitioned(ad.model) and all(p.numel() == 0 for p in ad.model.parameters())
# a scalar model over a partitioned base saves full weights without being handed a state dict
sm = ScalarModel(ad)
sm.save_pretrained(tmp / "scalar")
saved = AutoModelForImageTextToText.from_pretrained(str(tmp / "scalar"), dtype=torch.float32)
out["saved_diff"] = max(float((p.detach() - pb[n].detach()).abs().max()) for n, p in saved.named_parameters())
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_real_zero3_shards_are_gathered_where_weights_are_read_or_written(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, "29671", str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert out["partitioned"], "the model was not loaded as ZeRO-3 shards"
    assert out["hidden"][0] == out["hidden"][1] > 0
    assert out["same_encoder_equal"] is True and out["same_encoder_changed"] is False
    assert "ZeRO-3 shards" in out["starting_copy"]
    assert out["loaded_diff"] == 0.0 and out["still_partitioned"]
    assert out["saved_diff"] == 0.0
