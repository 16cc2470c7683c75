import pytest

from vlmalign.config import ConfigError, describe, load_config
from vlmalign.methods.sft import SFTConfig, pretrain_config


def test_defaults_yaml_then_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("optim:\n  lr: 0.001\ntrain:\n  batch_size: 4\n  report_to: [tensorboard]\n")
    cfg = load_config(SFTConfig, f, ["optim.lr=5e-4", "train.max_steps=7", "model.tiny=llava",
                                     "lora.targets=q_proj,v_proj"])
    assert cfg.optim.lr == 5e-4
    assert cfg.train.batch_size == 4 and cfg.train.max_steps == 7
    assert cfg.train.report_to == ["tensorboard"]
    assert cfg.model.tiny == "llava"
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.optim.weight_decay == 0.0  # untouched default


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown option 'optim.lrr'.*did you mean 'lr'"):
        load_config(SFTConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown option 'trian'.*did you mean 'train'"):
        load_config(SFTConfig, None, ["trian.seed=1"])


def test_type_and_choice_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size: expected int"):
        load_config(SFTConfig, None, ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="data.on_error: 'ignore' is not one of raise, skip"):
        load_config(SFTConfig, None, ["data.on_error=ignore"])
    f = tmp_path / "bad.yaml"
    f.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: model: expected a section"):
        load_config(SFTConfig, f)


def test_method_defaults_are_the_base():
    cfg = load_config(SFTConfig, None, ["optim.lr=0.01"], base=pretrain_config())
    assert cfg.model.train_language is False and cfg.model.train_projector is True
    assert cfg.optim.lr == 0.01


def test_every_option_has_help():
    lines = describe(SFTConfig)
    opts = [ln for ln in lines if ln.startswith("  ")]
    assert len(opts) > 30
    assert all(ln.split(": ", 1)[1].strip() for ln in opts)
