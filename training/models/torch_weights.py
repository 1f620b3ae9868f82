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
    checkpoint = open_state_dict(path)                  # names and shapes only: check them against a model,
    state = checkpoint.read(names)                      # then read the storages of the tensors it takes
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from core.errors import FlowerError
from core.files import read_zip_member, zip_inflation_problem

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class -> numpy dtype of its elements (bfloat16 is widened to float32 after reading).
STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class CheckpointError(FlowerError, ValueError):
    """A weights file that is not a readable PyTorch state dict; the message names the file and the problem."""


# Markers are immutable tuples: a pickle's BUILD opcode cannot alter them (it can alter plain objects).
class StorageType(NamedTuple):
    """A torch storage class named in the pickle (never called)."""

    name: str


class StorageRef(NamedTuple):
    """A storage a tensor refers to: its key in the file, element type and element count."""

    key: str
    kind: str
    numel: int


class TensorRef(NamedTuple):
    """A tensor before its storage is read: a strided view into one storage."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


MAX_DIMS = 16
MAX_DIM_SIZE = 1 << 40
MAX_PICKLE_BYTES = 64 << 20  # a state dict's pickle is kilobytes; the tensors' bytes live outside it
MAX_NESTING = 16  # a state dict nests about 5 deep; deep nesting crashes or stalls hashing (C recursion)


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


def _is_int(value) -> bool:
    """A true integer (not a bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _last_element(ref: TensorRef) -> int:
    """The storage index of a non-empty view's last element."""
    return ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))


def _unreadable(source: str, err: Exception) -> CheckpointError:
    """The error for data that fails to parse at all."""
    return CheckpointError(f"{source}: not a readable PyTorch weights file ({type(err).__name__}: {str(err)[:200]})")


def _tensor_ref(storage, offset, size, stride) -> TensorRef:
    """Check a tensor's view arguments and keep them: within its storage, no more elements than it holds."""
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"a tensor refers to {type(storage).__name__}, not a storage")
    if (not _is_int(offset) or type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride)
            or len(size) > MAX_DIMS or not all(_is_int(v) for v in size + stride)):
        raise CheckpointError(f"a tensor has malformed view arguments: offset {offset!r}, size {str(size)[:80]}, "
                              f"stride {str(stride)[:80]}")
    ref = TensorRef(storage, int(offset), tuple(map(int, size)), tuple(map(int, stride)))
    if ref.offset < 0 or any(not 0 <= v < MAX_DIM_SIZE for v in ref.size + ref.stride):
        raise CheckpointError(f"a tensor has a negative or huge offset, size or stride: offset {ref.offset}, "
                              f"size {ref.size}, stride {ref.stride}")
    if 0 in ref.size:
        return ref
    last = _last_element(ref)
    if last >= storage.numel:
        raise CheckpointError(f"a tensor of size {ref.size} (offset {ref.offset}, stride {ref.stride}) reads "
                              f"element {last} of a storage of {storage.numel}")
    if math.prod(ref.size) > storage.numel:
        raise CheckpointError(f"a tensor of size {ref.size} has more elements than its storage ({storage.numel}): "
                              "expanded (stride 0) views are not supported")
    return ref


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
}
# Opcodes a state dict needs. Refused: object creation other than REDUCE on an allowed global (INST, OBJ,
# NEWOBJ, NEWOBJ_EX), the extension registry (EXT1/2/4), out-of-band buffers, and text persistent ids.
ALLOWED_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP GLOBAL STACK_GLOBAL BINPERSID REDUCE BUILD
    EMPTY_DICT EMPTY_LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 DICT LIST APPEND APPENDS SETITEM SETITEMS
    INT BININT BININT1 BININT2 LONG LONG1 LONG4 NONE NEWTRUE NEWFALSE FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8
    BINBYTES SHORT_BINBYTES BINBYTES8 PUT BINPUT LONG_BINPUT GET BINGET LONG_BINGET MEMOIZE
""".split())
_BUILDS = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "REDUCE": 2, "BINPERSID": 1}  # pop n, push one deeper


def _nesting_step(name: str, arg, stack: list[int], marks: list[int], memo: dict) -> None:
    """Track how deeply the objects on the unpickler's stack nest (one opcode)."""
    if name == "MARK":
        marks.append(len(stack))
    elif name in ("TUPLE", "LIST", "DICT", "APPENDS", "SETITEMS", "POP_MARK"):
        mark = marks.pop()
        items, stack[mark:] = stack[mark:], []
        depth = max(items, default=0) + 1
        if name in ("APPENDS", "SETITEMS"):
            stack[-1] = max(stack[-1], depth)
        elif name != "POP_MARK":
            stack.append(depth)
    elif name in _BUILDS:
        items, stack[len(stack) - _BUILDS[name]:] = stack[len(stack) - _BUILDS[name]:], []
        stack.append(max(items) + 1)
    elif name in ("APPEND", "BUILD"):
        stack[-1] = max(stack[-1], stack.pop() + 1)
    elif name == "SETITEM":
        value, key = stack.pop(), stack.pop()
        stack[-1] = max(stack[-1], key + 1, value + 1)
    elif name == "STACK_GLOBAL":
        del stack[-2:]
        stack.append(0)
    elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
        memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo[arg])
    elif name == "POP":
        stack.pop()
    elif name == "DUP":
        stack.append(stack[-1])
    elif name not in ("PROTO", "FRAME", "STOP"):
        stack.append(0)  # a constant or a global


def _check_opcodes(stream: io.BytesIO, source: str) -> None:
    """Read one pickle up to its STOP and refuse an opcode a state dict never needs, objects nested deeper
    than MAX_NESTING, or a pickle larger than MAX_PICKLE_BYTES."""
    start = stream.tell()
    stack: list[int] = []
    marks: list[int] = []
    memo: dict = {}
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name not in ALLOWED_OPCODES:
            raise CheckpointError(f"{source}: refused the pickle opcode {opcode.name}: a weights file does not need "
                                  "it, and it can build arbitrary objects (is it a trusted file?)")
        _nesting_step(opcode.name, arg, stack, marks, memo)
        if stack and stack[-1] > MAX_NESTING:
            raise CheckpointError(f"{source}: objects nested more than {MAX_NESTING} deep: not a state dict")
        if stream.tell() - start > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{source}: a pickle of over {MAX_PICKLE_BYTES} bytes: not a state dict")
        if opcode.name == "STOP":
            return


class RestrictedUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD can be restricted
    """An unpickler that resolves only ALLOWED_GLOBALS, reads storages as persistent ids, and builds nothing."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="utf-8")
        self.source = source

    def find_class(self, module: str, name: str):
        """Resolve an allowed global; refuse any other before it is imported or called."""
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            kind = ("an unsupported storage type" if module == "torch" and str(name).endswith("Storage")
                    else "a weights file needs only tensors and dicts, and unpickling this one would import or call "
                         "other code (is it a trusted file?)")
            raise CheckpointError(f"{self.source}: refused to load the global {module}.{name}: {kind}") from None

    def persistent_load(self, pid):
        """A storage reference: ('storage', type, key, location, numel[, view metadata])."""
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage" and type(pid[1]) is StorageType
                and pid[1].name in STORAGE_DTYPES and type(pid[2]) is str and _is_int(pid[4]) and pid[4] >= 0):
            raise CheckpointError(f"{self.source}: unknown persistent id {str(pid)[:80]}")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError(f"{self.source}: storage views are not supported")
        return StorageRef(pid[2], pid[1].name, int(pid[4]))

    def load_build(self) -> None:
        """BUILD: torch sets an OrderedDict's `_metadata` this way; it is dropped. Any other is refused."""
        self.stack.pop()
        if type(self.stack[-1]) is not OrderedDict:
            raise CheckpointError(f"{self.source}: refused to set the state of a {type(self.stack[-1]).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


def _unpickle(stream: io.BytesIO, source: str):
    """Check, then restrictedly unpickle, the pickle at the stream's position (the stream ends after it).

    Any failure becomes a CheckpointError naming the file.
    """
    start = stream.tell()
    try:
        _check_opcodes(stream, source)
        stream.seek(start)
        return RestrictedUnpickler(stream, source).load()
    except CheckpointError as err:
        raise err if str(err).startswith(source) else CheckpointError(f"{source}: {err}") from None
    except Exception as err:  # truncated, corrupt or hostile data raise many types
        raise _unreadable(source, err) from None


def _tensor_refs(obj, source: str, nested: bool = False) -> dict[str, TensorRef]:
    """The name -> tensor mapping of a state dict, also inside {'state_dict': ...} or {'model': ...}."""
    items = list(dict.items(obj)) if isinstance(obj, dict) else []
    if items and all(type(v) is TensorRef for _, v in items):
        bad = [k for k, _ in items if type(k) is not str]
        if bad:
            raise CheckpointError(f"{source}: tensor names must be strings, found {type(bad[0]).__name__}")
        refs = dict(items)
        if all(k.startswith("module.") for k in refs):  # saved from DataParallel
            refs = {k[len("module."):]: v for k, v in refs.items()}
        return refs
    if isinstance(obj, dict) and not nested:
        for key in ("state_dict", "model", "model_state_dict", "ema"):
            inner = dict.get(obj, key)
            if isinstance(inner, dict):
                return _tensor_refs(inner, source, nested=True)
    raise CheckpointError(f"{source}: holds no state dict of tensors (found {type(obj).__name__})")


def _materialise(refs: dict[str, TensorRef], storages: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Copy each tensor's strided view out of its storage (bounds checked again against the bytes read).

    Tensors may share storage (tied weights) but together hold at most 4x the storages' elements, so a
    small file cannot ask for gigabytes of copies.
    """
    total = sum(math.prod(ref.size) for ref in refs.values())
    if total > 4 * sum(flat.size for flat in storages.values()) + (1 << 20):
        raise CheckpointError(f"{source}: its tensors would hold {total} elements, far more than its storages: "
                              "not a state dict")
    out = {}
    for name, ref in refs.items():
        if ref.storage.key not in storages:
            raise CheckpointError(f"{source}: tensor {name} refers to storage {ref.storage.key}, which is missing")
        flat = storages[ref.storage.key]
        if 0 in ref.size:
            array = np.zeros(ref.size, flat.dtype)
        else:
            if _last_element(ref) >= flat.size or math.prod(ref.size) > flat.size:
                raise CheckpointError(f"{source}: tensor {name} reads outside its storage {ref.storage.key}")
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
    return np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="), copy=False)


def _storages_of(refs: dict[str, TensorRef], source: str) -> dict[str, StorageRef]:
    """The distinct storages the tensors use, by key; one key named with two types or sizes is refused."""
    storages: dict[str, StorageRef] = {}
    for ref in refs.values():
        seen = storages.setdefault(ref.storage.key, ref.storage)
        if seen != ref.storage:
            raise CheckpointError(f"{source}: storage {ref.storage.key} is named as {seen.kind} of {seen.numel} and "
                                  f"as {ref.storage.kind} of {ref.storage.numel}")
    return storages


def _nbytes(ref: StorageRef) -> int:
    """The bytes a storage's elements take."""
    return ref.numel * np.dtype(STORAGE_DTYPES[ref.kind]).itemsize


@dataclass
class Checkpoint:
    """A PyTorch weights file whose pickle is read and checked: each tensor's name, shape and storage, before any
    storage is read (`read`), so a caller can check the names and sizes against its model first."""

    path: Path
    refs: dict[str, TensorRef]
    little_endian: bool
    legacy_keys: list[str] | None = None  # legacy format: the storages' order in the file, from `data_offset` on
    data_offset: int = 0
    prefix: str = ""  # zip format: the folder of data.pkl

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's declared shape, by name."""
        return {name: ref.size for name, ref in self.refs.items()}

    def read(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The named tensors (all when None) as arrays, reading only the storages they use: each at most twice the
        elements its tensors take (plus 1 Mi), and a zip's storages inflating to at most core.files.MAX_INFLATION
        times their compressed bytes."""
        source = str(self.path)
        refs = self.refs if names is None else {name: self.refs[name] for name in names}
        wanted = _storages_of(refs, source)
        for key, ref in wanted.items():
            used = sum(math.prod(r.size) for r in refs.values() if r.storage.key == key)
            if ref.numel > 2 * used + (1 << 20):
                raise CheckpointError(f"{source}: storage {key} holds {ref.numel} elements, far more than the {used} "
                                      "its tensors use: not a state dict")
        read = _read_zip_storages if self.legacy_keys is None else _read_legacy_storages
        try:
            return _materialise(refs, read(self, wanted), source)
        except CheckpointError:
            raise
        except Exception as err:  # corrupt or truncated data raise many types
            raise _unreadable(source, err) from None


def _read_legacy_storages(checkpoint: Checkpoint, wanted: dict[str, StorageRef]) -> dict[str, np.ndarray]:
    """The wanted storages of a legacy file; the others are skipped unread (their lengths still checked)."""
    source, storages = str(checkpoint.path), {}
    with checkpoint.path.open("rb") as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(checkpoint.data_offset)
        for key in checkpoint.legacy_keys:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{source}: truncated before storage {key}")
            count = struct.unpack("<q" if checkpoint.little_endian else ">q", head)[0]
            ref = _storage_ref(checkpoint, key)
            if count != ref.numel or _nbytes(ref) > size - f.tell():
                raise CheckpointError(f"{source}: storage {key} has {count} elements, expected {ref.numel}, and the "
                                      f"file has {size - f.tell()} bytes left (truncated file?)")
            if key in wanted:
                storages[key] = _storage_array(f.read(_nbytes(ref)), ref, checkpoint.little_endian, source)
            else:
                f.seek(_nbytes(ref), io.SEEK_CUR)
    return storages


def _storage_ref(checkpoint: Checkpoint, key: str) -> StorageRef:
    """The storage a key names (the tensors' own record of it)."""
    return next(ref.storage for ref in checkpoint.refs.values() if ref.storage.key == key)


def _read_zip_storages(checkpoint: Checkpoint, wanted: dict[str, StorageRef]) -> dict[str, np.ndarray]:
    """The wanted storages of a zip file, their declared sizes and their inflation checked before any is read."""
    source, storages = str(checkpoint.path), {}
    with zipfile.ZipFile(checkpoint.path) as archive:
        members, names = {}, set(archive.namelist())
        for key, ref in wanted.items():
            member = f"{checkpoint.prefix}data/{key}"
            if member not in names:
                raise CheckpointError(f"{source}: storage file {member} is missing")
            members[key] = info = archive.getinfo(member)
            if info.file_size != _nbytes(ref):  # no zip bombs: the declared size first
                raise CheckpointError(f"{source}: {member} holds {info.file_size} bytes, expected {_nbytes(ref)}")
        problem = zip_inflation_problem(members.values())
        if problem:
            raise CheckpointError(f"{source}: its storages are no weights: {problem}")
        for key, info in members.items():
            storages[key] = _storage_array(read_zip_member(archive, info), wanted[key], checkpoint.little_endian,
                                           source)
    return storages


def _open_legacy(path: Path, source: str) -> Checkpoint:
    """Read the pickles of the legacy (non-zip) format: magic, protocol, system info, the state dict, the keys."""
    with path.open("rb") as stream:
        if _unpickle(stream, source) != LEGACY_MAGIC:
            raise CheckpointError(f"{source}: not a PyTorch weights file (wrong magic number)")
        if _unpickle(stream, source) != LEGACY_PROTOCOL:
            raise CheckpointError(f"{source}: unsupported PyTorch legacy protocol version")
        info = _unpickle(stream, source)
        little_endian = not isinstance(info, dict) or dict.get(info, "little_endian", True) is not False
        refs = _tensor_refs(_unpickle(stream, source), source)
        keys = _unpickle(stream, source)
        if type(keys) is not list or sorted(keys, key=str) != sorted(_storages_of(refs, source)):
            raise CheckpointError(f"{source}: the storage key list does not name each storage the tensors use once")
        return Checkpoint(path, refs, little_endian, legacy_keys=keys, data_offset=stream.tell())


def _open_zip(path: Path, source: str) -> Checkpoint:
    """Read the pickle of the zip format (torch >= 1.6)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1 or len(set(names)) != len(names):
            raise CheckpointError(f"{source}: a zip file, but not a PyTorch checkpoint (no single data.pkl, or "
                                  "members named twice)")
        prefix = pickles[0][: -len("data.pkl")]
        little_endian = True
        if f"{prefix}byteorder" in names:
            info = archive.getinfo(f"{prefix}byteorder")
            order = read_zip_member(archive, info) if info.file_size < 16 else b""
            order = order.strip()
            if order not in (b"little", b"big"):
                raise CheckpointError(f"{source}: unknown byte order {order[:16]!r}")
            little_endian = order == b"little"
        if archive.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{source}: {pickles[0]} is too large to be a state dict's pickle")
        refs = _tensor_refs(_unpickle(io.BytesIO(read_zip_member(archive, archive.getinfo(pickles[0]))), source),
                            source)
        _storages_of(refs, source)
    return Checkpoint(path, refs, little_endian, prefix=prefix)


def open_state_dict(path: str | Path) -> Checkpoint:
    """Read a PyTorch state dict file's tensor names and shapes (legacy or zip format), running no code and reading
    no storage yet."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with path.open("rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # what torch itself checks
        return _open_zip(path, source) if is_zip else _open_legacy(path, source)
    except CheckpointError:
        raise
    except Exception as err:  # corrupt zips, huge claims, odd structures raise many types
        raise _unreadable(source, err) from None


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file (legacy or zip format) into name -> numpy array, running no code."""
    return open_state_dict(path).read()
