"""What a Beam run reads: remote paths listed as `flower predict` lists local ones, the manifest that hands every
input and its place in the order to the workers, and a worker's reading of one manifest entry.

A manifest entry is one file to read: an image (local or remote) or a .tfrec file of a split. Its `index` is its
place in the input order, and a row's key is (index, record): the merge sorts the shards by it, so the CSV has
`flower predict`'s order however the workers shared the work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from core.contract import RECORD_SUFFIX, SIZE_FOLDER_GLOB, SPLIT_NAME, folder_size, join
from core.names import shown
from core.photos import is_photo_name
from service.images import ImageError
from service.scoring import (
    URL,
    DamagedFile,
    FileInput,
    InputError,
    Inputs,
    RemoteFile,
    SplitInput,
    iter_record_file,
    read_at_most,
    read_file,
)

RAW = CompressionTypes.UNCOMPRESSED  # an image or a shard named *.gz is read as it is, never inflated
Key = tuple[int, int]  # (manifest index, record in its file)
Payload = bytes | list[str]  # the image's bytes, or [kind, message] of the ImageError that stands for them
Element = tuple[Key, tuple[str, Payload, dict | None]]  # (key, (path shown, payload, a damaged file's facts))


def matched(pattern: str) -> list[str]:
    """The paths of the files a pattern matches in any of Beam's file systems, sorted as a folder walk is (by path
    components); InputError when the pattern cannot be looked up (no such bucket, no access)."""
    try:
        found = FileSystems.match([pattern])[0].metadata_list
    except OSError as err:  # BeamIOError: the listing itself failed
        raise InputError(f"{shown(pattern)} cannot be listed: {err}") from None
    return sorted((m.path for m in found if not m.path.endswith("/")), key=lambda p: p.split("/"))


def remote_inputs(spec: str, inputs: Inputs) -> None:
    """Add a remote path's inputs to `inputs` as collect_inputs adds a local one's: a file (scored whatever its name),
    a glob pattern's files, DATA:SPLIT, or a folder walked (photos by name; hidden names and other files counted)."""
    try:
        FileSystems.get_filesystem(spec)
    except ValueError as err:  # a scheme no installed file system serves (s3:// without Beam's aws extra, a typo)
        raise InputError(f"{shown(spec)}: {err}") from None
    if not spec.endswith("/") and FileSystems.exists(spec):
        inputs.sources.append(RemoteFile(shown(spec), spec))
        return
    split = _remote_split(spec)
    if split is not None:
        inputs.sources.append(split)
        return
    if any(ch in spec for ch in "*?["):
        files = matched(spec)
        if not files:
            raise InputError(f"{shown(spec)} matches no file")
        inputs.sources += [RemoteFile(shown(url), url) for url in files]
        return
    folder = spec.rstrip("/")
    files = matched(join(folder, "**"))
    if not files:
        raise InputError(f"{shown(spec)} not found (not a file, a folder with files in it, or DATA:SPLIT of a data "
                         "directory)")
    _add_remote_folder(folder, files, inputs)


def _add_remote_folder(folder: str, files: list[str], inputs: Inputs) -> None:
    """A remote folder's photos in walk order; a hidden name (and all under it) and other files counted as ignored."""
    hidden = set()
    for url in files:
        parts = url[len(folder) + 1:].split("/")
        first_hidden = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        if first_hidden is not None:
            hidden.add("/".join(parts[:first_hidden + 1]))
        elif not is_photo_name(parts[-1]):
            inputs.ignored += 1
        else:
            inputs.sources.append(RemoteFile(shown(url), url))
    inputs.ignored += len(hidden)


def _remote_split(spec: str) -> SplitInput | None:
    """A remote DATA:SPLIT as its .tfrec files per record size; None when SPLIT is no plain name or DATA holds no
    `tfrecords-jpeg-<S>x<S>/SPLIT/*.tfrec`."""
    data, sep, split = spec.rpartition(":")
    if not sep or not URL.match(data) or not SPLIT_NAME.match(split):
        return None
    files: dict[int, list[str]] = {}
    for url in matched(join(data, SIZE_FOLDER_GLOB, split, f"*{RECORD_SUFFIX}")):
        _, size_folder, folder, _ = url.rsplit("/", 3)
        size = folder_size(size_folder)
        if size is not None and folder == split:
            files.setdefault(size, []).append(url)
    return SplitInput(spec, dict(sorted(files.items()))) if files else None


def manifest_entries(inputs: Inputs, image_size: int) -> list[dict[str, Any]]:
    """One entry per file to read, in input order, numbered: local images (absolute paths, their known problem),
    remote images, and each .tfrec file of a split at the record size for `image_size`."""
    entries: list[dict[str, Any]] = []
    for source in inputs.sources:
        if isinstance(source, FileInput):
            problem = [source.problem.kind, source.problem.message] if source.problem else None
            entries.append({"kind": "file", "shown": source.shown, "path": os.path.join(os.getcwd(), source.path),
                            "problem": problem})
        elif isinstance(source, RemoteFile):
            entries.append({"kind": "file", "shown": source.shown, "url": source.url})
        else:
            entries += [{"kind": "records", "spec": source.spec, "path": path}
                        for path in source.files[source.size_for(image_size)]]
    return [{"index": i, **entry} for i, entry in enumerate(entries)]


def write_manifest(entries: list[dict[str, Any]], url: str) -> None:
    """Write the entries as JSON lines (ASCII: any file name survives) to `url`, local or remote."""
    with FileSystems.create(url, compression_type=RAW) as f:
        for entry in entries:
            f.write((json.dumps(entry) + "\n").encode("ascii"))


def read_entry(line: str, max_bytes: int) -> Iterator[Element]:
    """A worker's reading of one manifest line: each image it stands for, keyed by its place in the order."""
    entry = json.loads(line)
    index = entry["index"]
    if entry["kind"] == "records":
        for record, (path, data) in enumerate(iter_record_file(entry["spec"], entry["path"], max_bytes)):
            yield (index, record), (path, _payload(data), _damage(data))
        return
    if "url" in entry:
        data = _read_remote(entry["url"], max_bytes)
    else:
        problem = ImageError(*entry["problem"]) if entry["problem"] else None
        data = read_file(FileInput(entry["shown"], Path(entry["path"]), problem), max_bytes)
    yield (index, 0), (entry["shown"], _payload(data), None)


def _read_remote(url: str, max_bytes: int) -> bytes | ImageError:
    """A remote image's bytes, at most `max_bytes` of them; one that cannot be read is its row's error."""
    try:
        with FileSystems.open(url, compression_type=RAW) as f:
            return read_at_most(f, max_bytes)
    except OSError as err:
        return ImageError("unreadable", f"cannot be read ({err})")


def _payload(data: bytes | ImageError) -> Payload:
    """What travels between Beam's stages: the bytes, or the error as plain values (pickled by any coder)."""
    return data if isinstance(data, bytes) else [data.kind, data.message]


def _damage(data: bytes | ImageError) -> dict | None:
    """A damaged .tfrec file's facts, for the damage line at the end of the run (None for any other row)."""
    if not isinstance(data, DamagedFile):
        return None
    return {"file": data.file, "index": data.index, "lost": data.lost, "reason": data.reason}


def image_data(payload: Payload) -> bytes | ImageError:
    """The payload as the inference path takes it: bytes, or the ImageError back."""
    return payload if isinstance(payload, bytes) else ImageError(*payload)
