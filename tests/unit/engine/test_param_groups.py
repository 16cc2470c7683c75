import torch
from torch import nn

from vlmalign.config.sections import OptimSection
from vlmalign.engine.trainer import base_param_name, _param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = nn.Linear(3, 3)
        self.proj = nn.Linear(3, 3)
        self.lm = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)


def _lrs(groups):
    return sorted((g.get("lr", -1.0), g["weight_decay"], len(g["params"])) for g in groups)


def test_groups_split_decay_and_per_group_learning_rates():
    m = Toy()
    oc = OptimSection(weight_decay=0.1, projector_lr=1e-3, vision_lr=1e-5)
    groups = _param_groups(m, oc, {"proj.weight", "proj.bias"}, {"vision.weight", "vision.bias"})
    # projector: weight (decay) + bias (no decay) at 1e-3; vision likewise at 1e-5;
    # the rest at the default lr: lm.weight decays, lm.bias and both norm params do not
    assert _lrs(groups) == sorted([(1e-3, 0.1, 1), (1e-3, 0.0, 1), (1e-5, 0.1, 1), (1e-5, 0.0, 1),
                                   (-1.0, 0.1, 1), (-1.0, 0.0, 3)])
    m.vision.weight.requires_grad_(False)
    groups = _param_groups(m, oc, {"proj.weight"}, {"vision.weight", "vision.bias"})
    assert sum(len(g["params"]) for g in groups) == 7  # frozen parameters are left out


def test_peft_names_map_back_to_the_plain_model():
    assert base_param_name("base_model.model.model.multi_modal_projector.modules_to_save.default.linear_1.weight") \
        == "model.multi_modal_projector.linear_1.weight"
    assert base_param_name("model.vision_tower.x.weight") == "model.vision_tower.x.weight"
    opt = torch.optim.AdamW(_param_groups(Toy(), OptimSection(), set()), lr=0.5)
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
