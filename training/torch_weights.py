"""Read PyTorch weight files (`.pth`, `.pt`) into numpy arrays, without torch and without running their code.

A PyTorch checkpoint is a pickle, and unpickling an untrusted pickle can run any code. This reader
allows only the few globals a state dict needs (an ordered dict, the tensor rebuild function and the
storage types) and refuses everything else with an error naming the global, before anything runs.

Both of PyTorch's formats are read:
- legacy (non-zip, `torch.save(..., _use_new_zipfile_serialization=False)`, and every file written
  before torch 1.6): three header pickles (magic number, protocol 1001, system info), the pickled
  state dict whose tensors refer to storages by persistent id, the pickled list of storage keys, then
  each storage as an int64 element count followed by its raw bytes;
- zip (torch >= 1.6): `<name>/data.pkl` and one raw file per storage under `<name>/data/<key>`.

    state = read_state_dict("efficientnet-lite0.pth")   # {"_conv_stem.weight": np.ndarray, ...}
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class -> numpy dtype of its elements (bfloat16 is widened to float32 after reading).
STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class CheckpointError(ValueError):
    """A weights file that is not a readable PyTorch state dict; the message names the file and the problem."""


@dataclass(frozen=True)
class StorageType:
    """A torch storage class named in the pickle (never called)."""

    name: str


@dataclass(frozen=True)
class StorageRef:
    """A storage a tensor refers to: its key in the file, element type and element count."""

    key: str
    kind: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor before its storage is read: a strided view into one storage."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: records the view instead of building a tensor."""
    return _tensor_ref(storage, offset, size, stride)


def _rebuild_tensor(storage, offset, size, stride):
    """Stand-in for the older torch._utils._rebuild_tensor."""
    return _tensor_ref(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *rest):
    """Stand-in for torch._utils._rebuild_parameter: a parameter is its tensor."""
    if not isinstance(data, TensorRef):
        raise CheckpointError(f"a parameter wraps {type(data).__name__}, not a tensor")
    return data


def _tensor_ref(storage, offset, size, stride) -> TensorRef:
    """Check a tensor's view arguments and keep them."""
    ints = (int, np.integer)
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"a tensor refers to {type(storage).__name__}, not a storage")
    if (not isinstance(offset, ints) or not isinstance(size, tuple) or not isinstance(stride, tuple)
            or len(size) != len(stride) or not all(isinstance(v, ints) for v in size + stride)):
        raise CheckpointError(f"a tensor has malformed view arguments: offset {offset!r}, size {size!r}, "
                              f"stride {stride!r}")
    ref = TensorRef(storage, int(offset), tuple(map(int, size)), tuple(map(int, stride)))
    if ref.offset < 0 or any(v < 0 for v in ref.size + ref.stride):
        raise CheckpointError(f"a tensor has a negative offset, size or stride: {ref.size} {ref.stride}")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True) if n > 0)
    if 0 not in ref.size and last >= storage.numel:
        raise CheckpointError(f"a tensor of size {ref.size} reads element {last} of a storage of {storage.numel}")
    return ref


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED_GLOBALS and reads storages as persistent ids."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="utf-8")
        self.source = source

    def find_class(self, module: str, name: str):
        """Resolve an allowed global; refuse any other before it is imported or called."""
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.source}: refused to load the global {module}.{name}: a weights file needs only tensors "
                "and dicts, and unpickling this one would import or call other code (is it a trusted file?)"
            ) from None

    def persistent_load(self, pid):
        """A storage reference: ('storage', type, key, location, numel[, view metadata])."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[4], int) and pid[4] >= 0):
            raise CheckpointError(f"{self.source}: unknown persistent id {str(pid)[:80]}")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError(f"{self.source}: storage views are not supported")
        return StorageRef(str(pid[2]), pid[1].name, pid[4])


def _unpickle(file: io.BufferedIOBase, source: str):
    """One restricted unpickle; any failure becomes a CheckpointError naming the file."""
    try:
        return RestrictedUnpickler(file, source).load()
    except CheckpointError:
        raise
    except Exception as err:  # truncated, corrupt or hostile data raise many types
        raise CheckpointError(f"{source}: not a readable PyTorch weights file ({type(err).__name__}: {err})") from None


def _tensor_refs(obj, source: str) -> dict[str, TensorRef]:
    """The name -> tensor mapping of a state dict, also inside {'state_dict': ...} or {'model': ...}."""
    if isinstance(obj, dict) and obj and all(isinstance(v, TensorRef) for v in obj.values()):
        refs = {str(k): v for k, v in obj.items()}
        if all(k.startswith("module.") for k in refs):  # saved from DataParallel
            refs = {k[len("module."):]: v for k, v in refs.items()}
        return refs
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "ema"):
            if isinstance(obj.get(key), dict):
                return _tensor_refs(obj[key], source)
    raise CheckpointError(f"{source}: holds no state dict of tensors (found {type(obj).__name__})")


def _materialise(refs: dict[str, TensorRef], storages: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Copy each tensor's strided view out of its storage."""
    out = {}
    for name, ref in refs.items():
        if ref.storage.key not in storages:
            raise CheckpointError(f"{source}: tensor {name} refers to storage {ref.storage.key}, which is missing")
        flat = storages[ref.storage.key]
        if 0 in ref.size:
            array = np.zeros(ref.size, flat.dtype)
        else:
            view = np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.size,
                                                   strides=[s * flat.itemsize for s in ref.stride], writeable=False)
            array = np.array(view)
        if ref.storage.kind == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = array
    return out


def _storage_array(raw: bytes, ref: StorageRef, little_endian: bool, source: str) -> np.ndarray:
    """A storage's elements from its raw bytes, checked against the element count."""
    dtype = np.dtype(STORAGE_DTYPES[ref.kind]).newbyteorder("<" if little_endian else ">")
    if len(raw) != ref.numel * dtype.itemsize:
        raise CheckpointError(f"{source}: storage {ref.key} holds {len(raw)} bytes, expected "
                              f"{ref.numel} x {dtype.itemsize} (truncated file?)")
    return np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="))


def _storages_of(refs: dict[str, TensorRef]) -> dict[str, StorageRef]:
    """The distinct storages the tensors use, by key (one storage may back several tensors)."""
    return {ref.storage.key: ref.storage for ref in refs.values()}


def _read_legacy(data: bytes, source: str) -> dict[str, np.ndarray]:
    """Read the legacy (non-zip) format."""
    stream = io.BytesIO(data)
    if _unpickle(stream, source) != LEGACY_MAGIC:
        raise CheckpointError(f"{source}: not a PyTorch weights file (wrong magic number)")
    if _unpickle(stream, source) != LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: unsupported PyTorch legacy protocol version")
    info = _unpickle(stream, source)
    little_endian = not isinstance(info, dict) or info.get("little_endian", True)
    refs = _tensor_refs(_unpickle(stream, source), source)
    keys = _unpickle(stream, source)
    if not isinstance(keys, list):
        raise CheckpointError(f"{source}: malformed storage key list")
    wanted, storages = _storages_of(refs), {}
    for key in keys:
        head = stream.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{source}: truncated before storage {key}")
        count = struct.unpack("<q" if little_endian else ">q", head)[0]
        ref = wanted.get(str(key))
        if ref is None or count != ref.numel:
            raise CheckpointError(f"{source}: storage {key} is unreferenced or has {count} elements, not "
                                  f"{ref.numel if ref else 0}")
        size = count * np.dtype(STORAGE_DTYPES[ref.kind]).itemsize
        storages[ref.key] = _storage_array(stream.read(size), ref, little_endian, source)
    return _materialise(refs, storages, source)


def _read_zip(path: Path, source: str) -> dict[str, np.ndarray]:
    """Read the zip format (torch >= 1.6)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{source}: a zip file, but not a PyTorch checkpoint (no single data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        little_endian = True
        if f"{prefix}byteorder" in names:
            little_endian = archive.read(f"{prefix}byteorder").strip() != b"big"
        refs = _tensor_refs(_unpickle(io.BytesIO(archive.read(pickles[0])), source), source)
        storages = {}
        for key, ref in _storages_of(refs).items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise CheckpointError(f"{source}: storage file {member} is missing")
            storages[key] = _storage_array(archive.read(member), ref, little_endian, source)
    return _materialise(refs, storages, source)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file (legacy or zip format) into name -> numpy array, running no code."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if zipfile.is_zipfile(path):
        return _read_zip(path, source)
    return _read_legacy(path.read_bytes(), source)
