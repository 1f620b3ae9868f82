"""member.json (a run directory) and ensemble.json (an ensemble directory), read and written in one place.

Training writes member.json, the ensemble reads it to blend and writes ensemble.json, the service reads
both to serve, testkit writes both for tests: every one of them goes through here. TensorFlow-free.
The fields are the contract's (docs/ARCHITECTURE.md); a reader gets a typed view with checked values,
and an error that names the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.contract import CLASSES_FILE, ENSEMBLE_FILE, IMPORT_REPORT_FILE, MEMBER_FILE
from core.errors import ConfigError, DataError
from core.files import write_text_atomic

FIT_MODES = ("crop", "stretch", "pad")  # how a photo becomes a square: cut, squash, or add black bars
FILTER = "lanczos3"  # antialiased: tf.image.resize(method="lanczos3", antialias=True); PIL's LANCZOS at import
DEFAULT_FIT = "crop"  # data sets that do not say how they were made (the competition's)


class ArtifactError(DataError):
    """member.json or ensemble.json cannot be used: the message names the file and the field."""


MAX_JSON_FILE_BYTES = 64 << 20  # the project's JSON files are kilobytes; an import report of 100,000 photos, a few MB
MAX_JSON_FILE_VALUES = 2_000_000  # parsed, a JSON value costs up to ~100 bytes: this bounds a file at ~200 MB


def json_values(text: bytes) -> int:
    """At least as many as the values a JSON text holds: each value but the first follows a ',', ':', '[' or '{'."""
    return sum(text.count(separator) for separator in (b",", b":", b"[", b"{")) + 1


def read_json_file(path: Path, what: str = "") -> Any:
    """A JSON file's content; unreadable, undecodable or invalid JSON, or a file over MAX_JSON_FILE_BYTES or
    MAX_JSON_FILE_VALUES (checked before it is parsed), is one ArtifactError naming the file."""
    try:
        if path.stat().st_size > MAX_JSON_FILE_BYTES:
            raise ArtifactError(f"{what}{path} has {path.stat().st_size} bytes, more than the {MAX_JSON_FILE_BYTES} "
                                "a JSON file of the project may have")
        text = path.read_bytes()
        if json_values(text) > MAX_JSON_FILE_VALUES:
            raise ArtifactError(f"{what}{path} holds up to {json_values(text)} JSON values, more than the "
                                f"{MAX_JSON_FILE_VALUES} a JSON file of the project may hold")
        return json.loads(text)
    except ArtifactError:
        raise
    except FileNotFoundError:
        raise ArtifactError(f"{what}{path} not found") from None
    except OSError as err:
        raise ArtifactError(f"{what}cannot read {path}: {err.strerror or err}") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(err, RecursionError) else err
        raise ArtifactError(f"{what}{path.name} is not valid JSON ({reason}): {path}") from None


def _object(value: Any, where: str) -> dict:
    """A JSON object, or an error naming where it should have been one."""
    if not isinstance(value, dict):
        raise ArtifactError(f"{where} must be a JSON object, not a {type(value).__name__}")
    return value


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class MemberFile:
    """A run directory's member.json: the document, and the fields other parts read, checked."""

    path: Path
    document: dict

    @property
    def name(self) -> str:
        """The member's name, else its run directory's name."""
        name = self.document.get("name")
        if name is not None and (not isinstance(name, str) or (name and not name.strip())):
            raise ArtifactError(f"{self.path}: 'name' must be a string (empty: the folder's name), got {name!r}")
        return name or self.path.parent.name

    @property
    def config(self) -> dict:
        """The resolved config the run trained with ({} when absent)."""
        return self.document.get("config") or {}

    @property
    def train_on_val(self) -> bool:
        """Whether the run trained on its validation split too (config data.train_on_val)."""
        return (self.config.get("data") or {}).get("train_on_val") is True

    @property
    def validation_from(self) -> str | None:
        """For a refit: the run (a path relative to this run directory) whose validation predictions stand for it."""
        source = self.document.get("validation_from")
        return source if isinstance(source, str) and source else None

    @property
    def image_size(self) -> int:
        """The model's input size in pixels."""
        size = self.document.get("image_size")
        if not _whole(size) or size < 1:
            raise ArtifactError(f"{self.path} has no valid image_size")
        return size

    @property
    def val_macro_f1(self) -> float | None:
        """The validation macro F1 ("metrics"), None when it has none."""
        metrics = self.document.get("metrics")
        f1 = metrics.get("val_macro_f1") if isinstance(metrics, dict) else None
        return float(f1) if isinstance(f1, int | float) and not isinstance(f1, bool) and math.isfinite(f1) else None

    def check(self) -> MemberFile:
        """Check every field other parts read (name, geometry, and image_size where present); returns self."""
        self.name, self.geometry()  # noqa: B018 - each checks its field
        if "image_size" in self.document:
            self.image_size  # noqa: B018
        return self

    def geometry(self) -> tuple[str, int]:
        """The fit mode ("geometry", else crop) and record size ("data".file_size, else 0: none between the photo
        and the model's input) of how a photo becomes the model's square."""
        geometry = self.document.get("geometry", {"fit": DEFAULT_FIT})
        if not isinstance(geometry, dict) or geometry.get("fit") not in FIT_MODES:
            raise ArtifactError(f"{self.path}: 'geometry' must be an object whose 'fit' is one of {FIT_MODES}, "
                                    f"got {geometry!r}")
        data = self.document.get("data")
        record_size = data.get("file_size", 0) if isinstance(data, dict) else 0
        if not _whole(record_size) or record_size < 0:
            raise ArtifactError(f"{self.path}: 'data'.'file_size' must be a record size in pixels, got "
                                    f"{record_size!r}")
        return geometry["fit"], record_size


def member_from_document(document: Any, path: Path) -> MemberFile:
    """A member.json document, checked as an object whose config and config.data are objects."""
    document = _object(document, str(path))
    config = document.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    for key, value in (("config", config), ("config.data", data)):
        if value is not None:
            _object(value, f"{path}: {key}")
    return MemberFile(path, document)


def read_member(run_dir: str | Path) -> MemberFile:
    """A run directory's member.json (ArtifactError naming it when missing or not a member document)."""
    path = Path(run_dir) / MEMBER_FILE
    return member_from_document(read_json_file(path), path)


def is_run_directory(path: str | Path) -> bool:
    """Whether a folder holds a member.json (a run directory)."""
    return (Path(path) / MEMBER_FILE).is_file()


def validation_source_problem(source: Path, classes: list[str], val_rows: int | None = None) -> str | None:
    """Why run `source` cannot lend its validation predictions to a refit (trained on train+val) whose classes are
    `classes`, None when it can: flower blend's rules, which training checks before its first step too. It must be
    a folder, not trained on its validation rows itself, with the same classes (compared stripped, as everywhere)
    and predictions/val.npz; with `val_rows`, that file holds that many rows (the refit's validation split)."""
    if not source.is_dir():
        return f"{source} is not a run directory"
    if is_run_directory(source) and read_member(source).train_on_val:
        return f"{source} was trained on its validation rows too"
    theirs = read_json_file(source / CLASSES_FILE, f"{source}: ")
    if not isinstance(theirs, list) or not all(isinstance(c, str) for c in theirs):
        return f"{source / CLASSES_FILE} is not a list of class names"
    if [c.strip() for c in theirs] != [c.strip() for c in classes]:
        return (f"its classes differ from those of {source} ({len(classes)} vs {len(theirs)} classes"
                f"{_first_difference(classes, theirs)})")
    predictions = source / "predictions" / "val.npz"
    if not predictions.is_file():
        return f"{source} has no predictions/val.npz (not a finished run)"
    if val_rows is not None:
        rows = _npz_rows(predictions)
        if isinstance(rows, str):
            return f"{predictions} cannot be read: {rows}"
        if rows != val_rows:
            return (f"{predictions} holds {rows} validation rows, the data's validation split {val_rows}: it was "
                    "trained on other data")
    return None


def _first_difference(ours: list[str], theirs: list[str]) -> str:
    """'; class 3 is 'rose' here, 'tulip' there' for the first class two lists name differently ('' if none)."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a.strip() != b.strip():
            return f"; class {i} is {a.strip()!r} here, {b.strip()!r} there"
    return ""


def _npz_rows(path: Path) -> int | str:
    """The number of ids in a predictions .npz, or why it cannot be read (checked before numpy inflates it)."""
    import zipfile
    import zlib

    from core.files import NpzRefused, read_npz_arrays

    try:
        return len(read_npz_arrays(path, ["ids"])["ids"])
    except NpzRefused as refused:
        return refused.problem or "it holds no 'ids' array"
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError, MemoryError) as err:
        return f"not an .npz of predictions ({type(err).__name__}: {err})"


def geometry_record(fit: str, source: str) -> dict[str, str]:
    """The "geometry" entry of member.json: the fit mode, the resize filter and where the fit mode came from."""
    if fit not in FIT_MODES:
        raise ConfigError(f"fit must be one of {FIT_MODES}, got {fit!r}")
    return {"fit": fit, "filter": FILTER, "from": source}


def data_fit(data_dir: str, setting: str = "auto") -> dict[str, str]:
    """The geometry a run's training images were made with: `setting` when it names a fit mode, else (auto) the
    data set's import_report.json "fit", else the default (crop) for a data set that does not record it (the
    competition's own data has no report)."""
    if setting != "auto":
        return geometry_record(setting, "data.fit")
    report = Path(data_dir) / IMPORT_REPORT_FILE
    if "://" in data_dir or not report.is_file():
        return geometry_record(DEFAULT_FIT, "default")
    try:
        document = read_json_file(report)
    except ArtifactError as err:
        raise DataError(f"{report} cannot be read for its 'fit': {err}") from None
    if not isinstance(document, dict):
        raise DataError(f"{report} cannot be read for its 'fit': not a JSON object")
    fit = document.get("fit")
    if fit is None:
        return geometry_record(DEFAULT_FIT, "default")
    if fit not in FIT_MODES:
        raise DataError(f"{report}: 'fit' is {fit!r}, not one of {FIT_MODES}")
    return geometry_record(fit, str(report))


def write_member(run_dir: str | Path, document: dict) -> Path:
    """Write member.json atomically, after checking it reads back as a member document."""
    path = Path(run_dir) / MEMBER_FILE
    member_from_document(document, path).check()
    return write_text_atomic(path, json.dumps(document, indent=1) + "\n")


# --- ensemble.json ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnsembleEntry:
    """One member of an ensemble.json: its index, name, path as written, and convex weight (None: a stacker)."""

    index: int
    name: str
    path: str
    weight: float | None

    def run_dir(self, file: Path) -> Path:
        """The member's run directory, resolved against the folder of ensemble.json."""
        return (file.parent / self.path).resolve()


@dataclass(frozen=True)
class EnsembleFile:
    """An ensemble directory's ensemble.json: the document, its members and classes, checked; the blend stays
    a dict for ensemble.spec.BlendSpec to read."""

    path: Path
    document: dict
    members: tuple[EnsembleEntry, ...]
    classes: tuple[str, ...]

    @property
    def blend(self) -> Any:
        """The blend spec as written (ensemble.spec.BlendSpec.from_dict reads it)."""
        return self.document["blend"]


def _entry(file: Path, index: int, entry: Any) -> EnsembleEntry:
    """Check one 'members' entry: an object with a string name and path and a number or null weight."""
    where = f"{file}: members[{index}]"
    if not isinstance(entry, dict):
        raise ArtifactError(f"{where} must be an object with 'name' and 'path', got {type(entry).__name__}")
    for key in ("name", "path"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise ArtifactError(f"{where} needs a non-empty string {key!r}, got {entry.get(key)!r}")
    weight = entry.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float)
                               or not math.isfinite(weight)):
        raise ArtifactError(f"{where}: 'weight' must be a number or null, got {weight!r}")
    return EnsembleEntry(index, entry["name"], entry["path"], None if weight is None else float(weight))


def ensemble_from_document(document: Any, file: Path) -> EnsembleFile:
    """An ensemble.json document, checked: version 1, classes, member entries, a blend."""
    if not isinstance(document, dict):
        raise ArtifactError(f"{file} must hold a JSON object, got {type(document).__name__}")
    for key in ("members", "classes", "blend"):
        if key not in document:
            raise ArtifactError(f"{file} lacks {key!r}")
    if document.get("version") != 1:
        raise ArtifactError(f"{file} has version {document.get('version')!r}; this toolkit reads version 1")
    classes = document["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ArtifactError(f"{file}: 'classes' must be a non-empty list of class names (strings)")
    members = document["members"]
    if not isinstance(members, list):
        raise ArtifactError(f"{file}: 'members' must be a list, got {type(members).__name__}")
    entries = tuple(_entry(file, i, e) for i, e in enumerate(members))
    return EnsembleFile(file, document, entries, tuple(c.strip() for c in classes))


def ensemble_file(path: str | Path) -> Path:
    """The ensemble.json of an ensemble directory, or the path itself when it names the file."""
    path = Path(path)
    return path / ENSEMBLE_FILE if path.is_dir() else path


def read_ensemble(path: str | Path) -> EnsembleFile:
    """An ensemble directory's (or the file's own path) ensemble.json, checked."""
    file = ensemble_file(path)
    return ensemble_from_document(read_json_file(file), file)


def is_ensemble_directory(path: str | Path) -> bool:
    """Whether a folder holds an ensemble.json (an ensemble directory)."""
    return (Path(path) / ENSEMBLE_FILE).is_file()


def write_ensemble(out_dir: str | Path, document: dict, final_dir: str | Path | None = None) -> Path:
    """Write ensemble.json atomically, after checking it reads back as an ensemble document (a refusal names the
    file at `final_dir` when out_dir is a staging folder that will become it)."""
    path = Path(out_dir) / ENSEMBLE_FILE
    ensemble_from_document(document, Path(final_dir or out_dir) / ENSEMBLE_FILE)
    return write_text_atomic(path, json.dumps(document, indent=1) + "\n")
