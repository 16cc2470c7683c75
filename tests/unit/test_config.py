import pytest

from vlmalign.config import ConfigError, describe, load_config
from vlmalign.methods.sft import SFTConfig, PretrainConfig


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
    cfg = load_config(SFTConfig, None, ["optim.lr=0.01"], base=PretrainConfig())
    assert cfg.model.train_language is False and cfg.model.train_projector is True
    assert cfg.optim.lr == 0.01


def test_every_option_has_help():
    lines = describe(SFTConfig)
    opts = [ln for ln in lines if ln.startswith("  ")]
    assert len(opts) > 30
    assert all(ln.split(": ", 1)[1].strip() for ln in opts)


def test_with_defaults_changes_only_the_defaults():
    from dataclasses import fields

    from vlmalign.config import with_defaults
    from vlmalign.config.sections import OptimSection
    Fast = with_defaults(OptimSection, "Fast", lr=1e-3, schedule="constant")
    assert issubclass(Fast, OptimSection) and Fast.__name__ == "Fast"
    f, base = Fast(), OptimSection()
    assert (f.lr, f.schedule, f.eps) == (1e-3, "constant", base.eps)
    # help, choices and range are the base option's: describe shows the new default with them
    meta = {x.name: x.metadata for x in fields(Fast)}
    assert meta["lr"] == {x.name: x.metadata for x in fields(OptimSection)}["lr"]
    assert any(line.startswith("  lr = 0.001 (> 0): peak learning rate") for line in describe(Fast))
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        with_defaults(OptimSection, "Bad", lrr=1.0)
    with pytest.raises(ConfigError, match="schedule"):
        with_defaults(OptimSection, "Bad", schedule="sometimes")      # a default must pass its own checks


def test_validate_config_runs_each_sections_check_after_the_declared_ranges():
    from dataclasses import dataclass

    from vlmalign.config import opt, section, validate_config
    seen = []

    @dataclass
    class Inner:
        a: int = opt(1, "a", ge=0)
        b: int = opt(2, "b", ge=0)

        def check(self):
            seen.append("inner")
            if self.a > self.b:
                raise ConfigError("inner.a must not exceed inner.b")

    @dataclass
    class Outer:
        inner: Inner = section(Inner, "inner")

        def check(self):
            seen.append("outer")

    validate_config(Outer())
    assert seen == ["inner", "outer"]
    cfg = Outer()
    cfg.inner.a = 5
    with pytest.raises(ConfigError, match="inner.a must not exceed"):
        validate_config(cfg)
    cfg.inner.a = -1    # the declared range is checked before the section's rule
    with pytest.raises(ConfigError, match=r"inner.a: -1 is out of range \(must be >= 0\)"):
        validate_config(cfg)
