"""The built-in models and the pre/post-processing modules, on the CPU (CUDA-graph capture marked gpu)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.errors import ModelLoadError
from actors.models import BuiltModel, InputSpec
from actors.zoo import (IMAGENET_MEAN, IMAGENET_STD, ZOO, Argmax, Cast, ImagePreprocess, TopK,
                        build_postprocess, mlp, resnet18, resnet50)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def forward(built: BuiltModel, x: torch.Tensor):
    with torch.inference_mode():
        if built.preprocess is not None:
            x = built.preprocess(x)
        y = built.model(x)
        return built.postprocess(y) if built.postprocess is not None else y


# torchvision's numbers: parameters and state-dict entries (parameters + BN buffers).
@pytest.mark.parametrize("arch, params, entries", [(resnet18, 11_689_512, 122), (resnet50, 25_557_032, 320)])
def test_resnet_matches_torchvision_shapes(arch, params, entries):
    model = arch()
    assert sum(p.numel() for p in model.parameters()) == params
    state = model.state_dict()
    assert len(state) == entries
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["fc.weight"].shape[0] == 1000 and "layer4.0.downsample.0.weight" in state


def test_resnet50_strides_on_the_3x3_conv():
    block = resnet50().layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


def test_builds_are_deterministic_under_manual_seed():
    torch.manual_seed(3)
    a = ZOO["resnet18"]().model.state_dict()
    torch.manual_seed(3)
    b = ZOO["resnet18"]().model.state_dict()
    torch.manual_seed(4)
    c = ZOO["resnet18"]().model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


@pytest.fixture(scope="module")
def r18() -> BuiltModel:
    torch.manual_seed(0)
    return ZOO["resnet18"]()


def test_resnet18_default_is_argmax(r18):
    assert r18.input_spec == InputSpec("uint8", (224, 224, 3))
    assert not r18.model.training
    out = forward(r18, images(2))
    assert out.shape == (2,) and out.dtype == torch.int64
    assert ((out >= 0) & (out < 1000)).all()


def test_resnet18_postprocess_variants(r18):
    x = images(2)
    with torch.inference_mode():
        logits = r18.model(r18.preprocess(x))
    assert logits.shape == (2, 1000) and logits.dtype == torch.float32
    values, indices = TopK(5)(logits)
    assert values.shape == indices.shape == (2, 5)
    assert torch.equal(indices[:, 0], Argmax()(logits))
    assert torch.equal(forward(r18, x), Argmax()(logits))


def test_resnet50_forward_one_image():
    torch.manual_seed(0)
    built = ZOO["resnet50"](postprocess="topk5")
    values, indices = forward(built, images(1))
    assert values.shape == indices.shape == (1, 5)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64


def test_bf16_resnet_raw_logits_are_cast_back_to_float32():
    torch.manual_seed(0)
    built = ZOO["resnet18"](dtype=torch.bfloat16, postprocess="none")
    assert next(built.model.parameters()).dtype == torch.bfloat16
    out = forward(built, images(2))
    assert out.shape == (2, 1000) and out.dtype == torch.float32
    assert out.numpy().dtype == np.float32


def test_channels_last_is_respected_and_computes_the_same():
    torch.manual_seed(0)
    plain = ZOO["resnet18"](postprocess="none")
    torch.manual_seed(0)
    cl = ZOO["resnet18"](channels_last=True, postprocess="none")
    x = images(2)
    assert cl.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert cl.preprocess(x).is_contiguous(memory_format=torch.channels_last)
    assert plain.preprocess(x).is_contiguous()
    # Different conv kernels for the two layouts: equal up to float32 reassociation.
    torch.testing.assert_close(forward(cl, x), forward(plain, x), rtol=1e-4, atol=1e-3)


# float32: a few ulp from folding the normalisation into one multiply-add; reduced
# precision: half the spacing of the dtype near the largest magnitude (|y| < 2.7).
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_image_preprocess_numerics(dtype, atol, channels_last):
    x = images(3, seed=1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (x.permute(0, 3, 1, 2).double() / 255.0 - mean) / std
    y = ImagePreprocess(dtype, channels_last)(x)
    assert y.shape == (3, 3, 224, 224) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=atol)


def test_image_preprocess_moves_its_buffers():
    pre = ImagePreprocess().to("meta")
    assert {b.device.type for b in pre.buffers()} == {"meta"}


def test_argmax_and_topk():
    logits = torch.randn(4, 10, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    ids = Argmax()(logits)
    assert ids.dtype == torch.int64 and ids.shape == (4,)
    assert np.array_equal(ids.numpy(), logits.float().numpy().argmax(axis=1))
    values, indices = TopK(3)(logits)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (4, 3)
    assert torch.equal(indices[:, 0], ids)
    assert (values[:, :-1] >= values[:, 1:]).all()
    assert torch.equal(values, logits.float().gather(1, indices))


def test_cast_converts_floats_in_trees_and_leaves_integers():
    f, i = torch.randn(2, 3, dtype=torch.bfloat16), torch.randint(0, 9, (2,))
    out = Cast(torch.float32)({"a": (f, i), "b": [f]})
    assert out["a"][0].dtype == torch.float32 and out["a"][1] is i
    assert isinstance(out["a"], tuple) and out["b"][0].dtype == torch.float32


def test_build_postprocess():
    assert isinstance(build_postprocess("argmax", torch.float32), Argmax)
    assert build_postprocess("topk3", torch.float32).k == 3
    assert build_postprocess("none", torch.float32) is None
    assert build_postprocess("none", torch.bfloat16).dtype == torch.float32
    for bad in ("softmax", "topk0", "topk"):
        with pytest.raises(ModelLoadError, match=repr(bad)):
            build_postprocess(bad, torch.float32)


def test_mlp_shapes():
    assert [m.__class__.__name__ for m in mlp()] == ["Linear", "ReLU", "Linear"]
    torch.manual_seed(0)
    built = ZOO["mlp"]()
    assert built.input_spec == InputSpec("float32", (4096,))
    assert built.preprocess is None and built.postprocess is None
    x = torch.randn(4, 4096)
    out = forward(built, x)
    assert out.shape == (4, 256) and out.dtype == torch.float32


def test_bf16_mlp_takes_float32_and_returns_float32():
    torch.manual_seed(0)
    ref = ZOO["mlp"](hidden=64)
    torch.manual_seed(0)
    built = ZOO["mlp"](dtype=torch.bfloat16, hidden=64, channels_last=True)
    assert next(built.model.parameters()).dtype == torch.bfloat16
    x = torch.randn(4, 4096)
    out = forward(built, x)
    assert out.dtype == torch.float32 and out.numpy().shape == (4, 256)
    torch.testing.assert_close(out, forward(ref, x), rtol=0.05, atol=0.05)


def test_tiny_mlp():
    built = ZOO["tiny_mlp"]()
    assert built.input_spec == InputSpec("float32", (16,)) and built.name == "tiny_mlp"
    assert forward(built, torch.randn(5, 16)).shape == (5, 8)
    assert forward(ZOO["tiny_mlp"](postprocess="argmax"), torch.randn(5, 16)).dtype == torch.int64


@pytest.mark.gpu
@pytest.mark.parametrize("name, rows", [("resnet18", 8), ("mlp", 64)])
def test_pipeline_parts_capture_in_a_cuda_graph(name, rows):
    torch.manual_seed(0)
    built = ZOO[name](dtype=torch.bfloat16, channels_last=True).to("cuda")
    if built.input_spec.dtype == "uint8":
        static_in = images(rows).cuda()
    else:
        static_in = torch.randn(rows, *built.input_spec.row_shape, device="cuda")
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up kernels and allocator off the capture
                forward(built, static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = forward(built, static_in)
        static_in.copy_(images(rows, seed=5).cuda() if static_in.dtype == torch.uint8 else torch.randn_like(static_in))
        graph.replay()
        torch.testing.assert_close(static_out, forward(built, static_in))
