"""Built-in benchmark models (plain torch, random weights) and the pre/post-processing modules.

The decoders (``gpt2_small``, ``tiny_decoder``) are ``actors.decode.Decoder``s.

The ResNets copy torchvision's layer shapes and attribute names (v1.5: stride on
the 3x3 conv), so torchvision state dicts load into them. Every pre/post-processing
module is shape-static and free of host syncs, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from actors.decode import GPT2_SMALL, TINY_DECODER, Decoder, DecoderShape
from actors.errors import ModelLoadError
from actors.models import BuiltModel, InputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- architectures ------------------------------------------------------------------------------

def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int],
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        # torchvision's initialisation, so activations keep a sane scale through random weights.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet50() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3))


def mlp(in_features: int = 4096, hidden: int = 1024, out_features: int = 256) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


# -- pre/post-processing ------------------------------------------------------------------------

class ImagePreprocess(nn.Module):
    """uint8 NHWC images -> ImageNet-normalised NCHW in ``dtype``."""

    def __init__(self, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> None:
        super().__init__()
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The NCHW view of NHWC memory is already channels_last: normalise in float32 in that
        # layout, then cast and (for contiguous_format) transpose in a single copy.
        x = torch.addcmul(self.shift, images.permute(0, 3, 1, 2).to(torch.float32), self.scale)
        return x.to(self.dtype, memory_format=self.memory_format)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, memory_format={self.memory_format}"


class Cast(nn.Module):
    """Casts floating-point tensors, in any tuple/list/dict nesting, to ``dtype``; others pass through."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(self.dtype) if x.is_floating_point() else x
        if isinstance(x, (tuple, list)):
            return type(x)(self(item) for item in x)
        if isinstance(x, dict):
            return {key: self(item) for key, item in x.items()}
        return x

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


class Argmax(nn.Module):
    """Logits (N, C) -> int64 class ids (N,)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)


class TopK(nn.Module):
    """Logits (N, C) -> (float32 values (N, k), int64 class ids (N, k)), best first."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = logits.topk(self.k, dim=-1)
        return values.to(torch.float32), indices

    def extra_repr(self) -> str:
        return f"k={self.k}"


def build_postprocess(name: str, dtype: torch.dtype) -> nn.Module | None:
    """The postprocess named ``"argmax"``, ``"topkK"`` (e.g. ``"topk5"``) or ``"none"``.

    Outputs leave the device as numpy arrays and bfloat16 has no numpy dtype, so a
    reduced-precision model's raw output ("none") is cast back to float32.
    """
    if name == "argmax":
        return Argmax()
    if name == "none":
        return Cast(torch.float32) if dtype != torch.float32 else None
    match = re.fullmatch(r"topk([1-9][0-9]*)", name)
    if match:
        return TopK(int(match.group(1)))
    raise ModelLoadError(f"unknown postprocess {name!r}; expected 'argmax', 'topkK' (e.g. 'topk5') or 'none'")


# -- the zoo ------------------------------------------------------------------------------------

def _build_cnn(arch: Callable[[], nn.Module], name: str, *, dtype: torch.dtype = torch.float32,
               channels_last: bool = False, postprocess: str | None = None) -> BuiltModel:
    model = arch().eval().to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return BuiltModel(model=model, input_spec=InputSpec("uint8", (224, 224, 3)),
                      preprocess=ImagePreprocess(dtype, channels_last),
                      postprocess=build_postprocess(postprocess or "argmax", dtype), name=name)


def _build_mlp(name: str, sizes: tuple[int, int, int], *, dtype: torch.dtype = torch.float32,
               channels_last: bool = False, postprocess: str | None = None) -> BuiltModel:
    # channels_last is accepted so every zoo entry takes the same options; 2-D inputs have no layout.
    model = mlp(*sizes).eval().to(dtype)
    return BuiltModel(model=model, input_spec=InputSpec("float32", (sizes[0],)),
                      preprocess=Cast(dtype) if dtype != torch.float32 else None,
                      postprocess=build_postprocess(postprocess or "none", dtype), name=name)


def _build_sized_mlp(*, in_features: int = 4096, hidden: int = 1024, out_features: int = 256,
                     **options: Any) -> BuiltModel:
    return _build_mlp("mlp", (in_features, hidden, out_features), **options)


def _build_decoder(name: str, shape: DecoderShape, *, dtype: torch.dtype = torch.float32,
                   channels_last: bool = False, postprocess: str | None = None, prompt_len: int = 16,
                   **sizes: int) -> BuiltModel:
    """A decoder taking int64 prompts of ``prompt_len`` tokens; ``sizes`` override ``DecoderShape`` fields.

    Run as batch inference it returns the next token (argmax); a config's ``decode``
    section runs it through ``actors.decode.Generator`` instead.
    """
    shape = dataclasses.replace(shape, **sizes)
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 1 <= prompt_len <= shape.n_positions:
        raise ModelLoadError(f"prompt_len must be an int in 1..{shape.n_positions}, got {prompt_len!r}")
    model = Decoder(shape).eval().to(dtype)
    return BuiltModel(model=model, input_spec=InputSpec("int64", (prompt_len,)), preprocess=None,
                      postprocess=build_postprocess(postprocess or "argmax", dtype), name=name)


ZOO: dict[str, Callable[..., BuiltModel]] = {
    "resnet18": functools.partial(_build_cnn, resnet18, "resnet18"),
    "resnet50": functools.partial(_build_cnn, resnet50, "resnet50"),
    "mlp": _build_sized_mlp,
    "tiny_mlp": functools.partial(_build_mlp, "tiny_mlp", (16, 32, 8)),
    "gpt2_small": functools.partial(_build_decoder, "gpt2_small", GPT2_SMALL),
    "tiny_decoder": functools.partial(_build_decoder, "tiny_decoder", TINY_DECODER),
}
