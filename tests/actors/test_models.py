"""load_model from every kind of source, written for real into tmp_path, and every way it fails."""
from __future__ import annotations

import io
import json
import pathlib
import pickle
import sys
import textwrap
import zipfile

import pytest
import torch
from torch import nn

from actors.errors import ModelLoadError, OrchestratorError
from actors.models import BuiltModel, InputSpec, load_model
from actors.zoo import Cast, TopK

# TorchScript still loads in this torch, with a deprecation warning on every call.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

USER_MODULE = "orch_test_user_models"
USER_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    from actors.models import BuiltModel, InputSpec


    def make(width=4):
        return nn.Sequential(nn.Linear(8, width), nn.Dropout(0.5))


    def make_embedding():
        return nn.Embedding(50, 6)


    def make_built():
        return BuiltModel(nn.Linear(8, 2).eval(), InputSpec("float32", (8,)), None, None, "user_built")


    def broken():
        raise RuntimeError("factory exploded")


    def not_a_model():
        return 42


    class Factories:
        @staticmethod
        def make():
            return nn.Linear(8, 3)


    NOT_CALLABLE = 3
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def rows(n: int, width: int = 8) -> torch.Tensor:
    return torch.randn(n, width)


def run(built: BuiltModel, x: torch.Tensor):
    with torch.inference_mode():
        if built.preprocess is not None:
            x = built.preprocess(x)
        y = built.model(x)
        return built.postprocess(y) if built.postprocess is not None else y


# -- zoo ----------------------------------------------------------------------------------------

def test_zoo_source_applies_options():
    built = load_model("zoo:resnet18", dtype="bfloat16", channels_last=True, postprocess="topk5",
                       input_dtype="uint8", input_shape=[224, 224, 3])
    assert built.name == "resnet18" and isinstance(built.postprocess, TopK)
    weight = built.model.conv1.weight
    assert weight.dtype == torch.bfloat16 and weight.is_contiguous(memory_format=torch.channels_last)


def test_zoo_kwargs_reach_the_builder():
    built = load_model("zoo:mlp", kwargs={"in_features": 32, "hidden": 8, "out_features": 4})
    assert built.input_spec == InputSpec("float32", (32,))
    assert run(built, rows(3, 32)).shape == (3, 4)


def test_same_seed_same_model():
    torch.manual_seed(7)
    a = load_model("zoo:tiny_mlp")
    torch.manual_seed(7)
    b = load_model("zoo:tiny_mlp")
    x = rows(4, 16)
    assert torch.equal(run(a, x), run(b, x))


def test_to_moves_model_and_processing_and_returns_self():
    built = load_model("zoo:resnet18", postprocess="none", dtype="bfloat16")
    assert built.to("meta") is built
    tensors = [*built.model.parameters(), *built.preprocess.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}


# -- files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ts"])
def test_torchscript_file(tmp_path, suffix):
    net = Net().eval()
    path = tmp_path / f"net{suffix}"
    torch.jit.save(torch.jit.script(net), str(path))
    built = load_model(str(path), input_dtype="float32", input_shape=(8,))
    assert built.input_spec == InputSpec("float32", (8,)) and built.name == path.name
    assert built.preprocess is None and built.postprocess is None
    x = rows(5)
    torch.testing.assert_close(run(built, x), net(x))


def test_torchscript_file_in_bf16(tmp_path):
    net = Net().eval()
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    built = load_model(str(path), dtype="bfloat16", input_dtype="float32", input_shape=(8,), postprocess="argmax")
    assert isinstance(built.preprocess, Cast) and built.preprocess.dtype == torch.bfloat16
    out = run(built, rows(5))
    assert out.dtype == torch.int64 and out.shape == (5,)


def _export(net: nn.Module, path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(net, (rows(4),), dynamic_shapes=({0: batch},)), str(path))


def test_exported_file(tmp_path):
    net = Net().eval()
    path = tmp_path / "net.pt2"
    _export(net, path)
    built = load_model(str(path), input_dtype="float32", input_shape=(8,))
    for n in (1, 7):
        x = rows(n)
        torch.testing.assert_close(run(built, x), net(x))


def test_exported_file_in_bf16_returns_float32(tmp_path):
    net = Net().eval()
    path = tmp_path / "net.pt2"
    _export(net, path)
    built = load_model(str(path), dtype="bfloat16", input_dtype="float32", input_shape=(8,))
    x = rows(6)
    out = run(built, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, net(x), rtol=0.05, atol=0.05)


class _Touch:
    """Unpickling it creates a file: proof that a load ran code from the archive."""

    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def _tampered(src, dst, edit) -> None:
    """Copy the zip archive ``src`` to ``dst`` with ``edit(name, data) -> data`` applied to each entry."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as b:
        for info in a.infolist():
            b.writestr(info, edit(info.filename, a.read(info.filename)))
        if extra := edit(None, None):
            b.writestr(*extra)


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _pickled_weight(marker):
    def edit(name, data):
        if name is not None and name.endswith("model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        if name is not None and name.endswith("weights/weight_0"):
            return _torch_saved(_Touch(marker))
        return data
    return edit


def _pickled_sample_inputs(marker):
    return lambda name, data: _torch_saved(_Touch(marker)) if name and "sample_inputs" in name else data


def _opaque_constant(marker):
    def edit(name, data):
        if name is None:  # the entry to add
            return "net/data/constants/opaque_obj_0", pickle.dumps(_Touch(marker))
        if name.endswith("model_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                "use_pickle": True, "tensor_meta": None}}}).encode()
        return data
    return edit


@pytest.mark.parametrize("tamper", [_pickled_weight, _pickled_sample_inputs, _opaque_constant])
def test_exported_file_with_pickled_objects_is_refused_without_running_them(tmp_path, tamper):
    # torch.export.load alone unpickles each of these freely, creating the marker file.
    clean, evil, marker = tmp_path / "net.pt2", tmp_path / "evil.pt2", tmp_path / "code_ran"
    _export(Net().eval(), clean)
    _tampered(clean, evil, tamper(marker))
    with pytest.raises(ModelLoadError, match=r"evil\.pt2.*pickled Python object"):
        load_model(str(evil), input_dtype="float32", input_shape=(8,))
    assert not marker.exists()
    load_model(str(clean), input_dtype="float32", input_shape=(8,))  # the untouched archive still loads


# -- import paths -------------------------------------------------------------------------------

def test_factory_module(user_module):
    built = load_model(f"{user_module}:make", kwargs={"width": 5}, input_dtype="float32", input_shape=[8])
    assert built.input_spec == InputSpec("float32", (8,)) and built.name == f"{user_module}:make"
    assert not built.model.training  # Dropout off: two runs agree
    x = rows(3)
    out = run(built, x)
    assert out.shape == (3, 5) and torch.equal(out, run(built, x))


def test_factory_dotted_attribute(user_module):
    built = load_model(f"{user_module}:Factories.make", input_dtype="float32", input_shape=(8,))
    assert run(built, rows(2)).shape == (2, 3)


def test_integer_inputs_are_not_cast(user_module):
    built = load_model(f"{user_module}:make_embedding", dtype="bfloat16", input_dtype="int64", input_shape=(4,))
    assert built.preprocess is None and built.input_spec == InputSpec("int64", (4,))
    out = run(built, torch.randint(0, 50, (3, 4)))
    assert out.shape == (3, 4, 6) and out.dtype == torch.float32


def test_factory_returning_built_model_is_used_as_returned(user_module):
    built = load_model(f"{user_module}:make_built", input_dtype="float32")
    assert built.name == "user_built" and built.input_spec == InputSpec("float32", (8,))


# -- errors -------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(torch.randint(0, 256, (256,), dtype=torch.uint8).numpy().tobytes())
    garbage_pt2 = tmp_path / "garbage.pt2"
    garbage_pt2.write_bytes(garbage.read_bytes())
    pickled = tmp_path / "state.pt"
    torch.save(Net().state_dict(), str(pickled))
    return {"garbage": str(garbage), "garbage_pt2": str(garbage_pt2), "pickled": str(pickled), "absent_pt": str(tmp_path / "absent.pt"),
            "absent_pt2": str(tmp_path / "absent.pt2")}


# (source, load_model options, texts the message must contain); {mod} and {name} are filled in.
ERRORS = [
    ("zoo:nope", {}, ["'nope'", "resnet18", "tiny_mlp"]),
    ("zoo:mlp", {"kwargs": {"bogus": 1}}, ["zoo:mlp", "bogus"]),
    ("zoo:tiny_mlp", {"postprocess": "softmax"}, ["'softmax'"]),
    ("zoo:tiny_mlp", {"dtype": "float64"}, ["'float64'", "bfloat16"]),
    ("zoo:tiny_mlp", {"input_shape": (32,)}, ["(32,)", "(16,)"]),
    ("zoo:tiny_mlp", {"input_dtype": "uint8"}, ["'uint8'", "float32"]),
    ("no_such_module_xyz:make", {}, ["no_such_module_xyz", "ModuleNotFoundError"]),
    ("{mod}:missing_attr", {}, ["'missing_attr'", "{mod}"]),
    ("{mod}:NOT_CALLABLE", {}, ["'NOT_CALLABLE'", "int"]),
    ("{mod}:broken", {}, ["{mod}:broken", "RuntimeError: factory exploded"]),
    ("{mod}:not_a_model", {}, ["{mod}:not_a_model", "int"]),
    ("{mod}:make", {"input_shape": (8,)}, ["input_dtype"]),
    ("{mod}:make", {"input_dtype": "float32"}, ["input_shape"]),
    ("{mod}:make", {"input_dtype": "notadtype", "input_shape": (8,)}, ["'notadtype'"]),
    ("{mod}:make", {"input_dtype": "float32", "input_shape": (0, 8)}, ["(0, 8)"]),
    ("{mod}:make_built", {"dtype": "bfloat16"}, ["dtype='bfloat16'", "kwargs"]),
    ("{absent_pt}", {}, ["{absent_pt}"]),
    ("{absent_pt2}", {}, ["{absent_pt2}"]),
    ("{garbage}", {"input_dtype": "float32", "input_shape": (8,)}, ["{garbage}", "TorchScript"]),
    ("{pickled}", {"input_dtype": "float32", "input_shape": (8,)}, ["{pickled}", "TorchScript"]),
    ("{garbage_pt2}", {"input_dtype": "float32", "input_shape": (8,)}, ["{garbage_pt2}", "torch.export.load"]),
    ("just_a_name", {}, ["'just_a_name'", "zoo:NAME"]),
]


@pytest.mark.parametrize("source, options, texts", ERRORS, ids=[f"{s}-{'-'.join(o)}" for s, o, _ in ERRORS])
def test_errors_name_the_offending_value_and_pickle(source, options, texts, user_module, files):
    names = {"mod": user_module, **files}
    with pytest.raises(ModelLoadError) as info:
        load_model(source.format(**names), **options)
    err = info.value
    message = str(err)
    for text in texts:
        assert text.format(**names) in message
    assert isinstance(err, (OrchestratorError, ValueError))
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is ModelLoadError and str(copy) == message


def test_errors_chain_their_cause(user_module):
    with pytest.raises(ModelLoadError) as info:
        load_model(f"{user_module}:broken")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ModelLoadError) as info:
        load_model("no_such_module_xyz:make")
    assert isinstance(info.value.__cause__, ImportError)
