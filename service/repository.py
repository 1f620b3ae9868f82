"""A model repository: several models, each with numbered versions, loaded, swapped and unloaded while serving.

    DIR/<model name>/<version number>/     an ensemble directory (ensemble.json) or a run directory (member.json)
    DIR/<model name>/labels.json           optional: {"stable": 1, "canary": 2}

As in TensorFlow Serving, a request names a model and optionally a version or a label; without either it
gets the model's latest (highest-numbered) version that is available. `--ensemble`/`--run` serve a
repository of one model with one version (the model name setting, version 1).

Hot reload: `poll` compares the folders with what is served. A new version (or one whose files changed) is
loaded and warmed up off the event loop and then swapped in with one assignment; requests already holding a
version finish on it. A version that fails to load keeps the version before it serving, and its status says
why (it is tried again when its files change). A removed version leaves the routing table at once and is
unloaded when its last request has finished.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import FlowerError, Kind
from core.members import ArtifactError, read_json_file
from core.names import shown, without_paths

logger = logging.getLogger(__name__)

VERSION_FOLDER = re.compile(r"0|[1-9][0-9]{0,17}")  # fullmatch: a number without leading zeros
VERSION_RULE = "a version folder is named by its number without leading zeros (0, 1, 2, ...; at most 18 digits)"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # fullmatch: a name the routes can carry
MODEL_NAME_RULE = ("a model name is 1 to 128 letters, digits, '_', '.' or '-', beginning with a letter or digit "
                   "(it is part of the routes' paths)")
LABELS_FILE = "labels.json"
MISSING, DOWN = Kind.NOT_FOUND, Kind.UNAVAILABLE  # answered 404 and 503 (service/errors.py STATUS)
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RepositoryError(FlowerError, ValueError):
    """The repository folder or its labels do not match the layout; the message names the path."""


class NotServed(FlowerError, LookupError):
    """A request names a model, version or label that is not available: kind not_found, or unavailable (none
    ready, or it failed to load); `code` the error code (unknown_model, not_ready, load_failed, warm_up_failed)."""

    def __init__(self, kind: Kind, message: str, code: str = "unknown_model") -> None:
        super().__init__(message, kind, code)


@dataclass
class Version:
    """One loaded (or failed) version of a model: its predictor and batcher, and the requests using it."""

    model: str
    number: int
    path: Path
    fingerprint: tuple
    predictor: Any = None
    batcher: Any = None
    error: str | None = None  # why it failed to load (state END), else None; without the server's paths
    detail: str | None = None  # the same with the paths, for the log and the command's error line
    error_kind: str = "load_failed"  # or warm_up_failed: a predictor handed in whose warm-up failed
    reload_error: str | None = None  # its folder changed and the new files failed to load: this copy serves on
    loaded_at: float = 0.0
    in_flight: int = 0
    _idle: asyncio.Event | None = field(default=None, repr=False)

    @property
    def available(self) -> bool:
        """Loaded, warmed up and not failed."""
        return self.predictor is not None and self.error is None and getattr(self.predictor, "ready", True)

    @property
    def state(self) -> str:
        """TF Serving's version state: AVAILABLE, LOADING (warming up), or END (failed to load, or unloaded)."""
        if self.available:
            return "AVAILABLE"
        return "LOADING" if self.predictor is not None and self.error is None else "END"

    def enter(self) -> None:
        """A request starts using this version."""
        self.in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def leave(self) -> None:
        """A request has finished with this version."""
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def drained(self) -> None:
        """Wait until no request uses this version."""
        if self.in_flight == 0:
            return
        self._idle = self._idle or asyncio.Event()
        if self.in_flight:
            await self._idle.wait()


def fingerprint(path: Path) -> tuple:
    """The names, sizes and modification times of every file under a version folder (what a reload compares)."""
    entries = []
    for file in sorted(path.rglob("*")):
        try:
            info = file.stat()
        except OSError:  # removed while we look: the next poll sees the rest
            continue
        if file.is_file():
            entries.append((str(file.relative_to(path)), info.st_size, info.st_mtime_ns))
    return tuple(entries)


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a served model's name (the rule, naming the value), else None."""
    return None if MODEL_NAME.fullmatch(name) else f"model name {shown(name)!r} cannot be served: {MODEL_NAME_RULE}"


Skipped = dict[str, str]  # a folder the repository does not serve (relative to it, shown) -> why


def scan(root: Path) -> tuple[dict[str, dict[int, Path]], Skipped]:
    """The repository's models and their version folders ({name: {version: path}}), and the folders left out with
    the reason (a model folder whose name the routes cannot carry or without a version folder, a version folder
    whose name is not a version number). Files are not models or versions, and are passed over."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a folder")
    models: dict[str, dict[int, Path]] = {}
    skipped: Skipped = {}
    for model in sorted(root.iterdir()):
        if not model.is_dir():
            continue
        if not MODEL_NAME.fullmatch(model.name):
            skipped[shown(model.name)] = MODEL_NAME_RULE
            continue
        versions = {}
        for folder in sorted(v for v in model.iterdir() if v.is_dir()):
            if VERSION_FOLDER.fullmatch(folder.name):
                versions[int(folder.name)] = folder
            else:
                skipped[f"{model.name}/{shown(folder.name)}"] = VERSION_RULE
        if versions:
            models[model.name] = versions
        else:
            skipped[model.name] = f"it holds no version folder: {VERSION_RULE}"
    return models, skipped


def read_labels(model_dir: Path) -> dict[str, int]:
    """A model's labels.json: {label: version}; RepositoryError naming the file when it is malformed."""
    file = model_dir / LABELS_FILE
    if not file.is_file():
        return {}
    try:
        labels = read_json_file(file)
    except ArtifactError as err:
        raise RepositoryError(f"{file} cannot be read as JSON: {err}") from None
    if not isinstance(labels, dict):
        raise RepositoryError(f"{file} must be an object {{\"label\": version number}}")
    for label, version in labels.items():
        if not LABEL.fullmatch(label) or label.isdigit():
            raise RepositoryError(f"{file}: label {label!r} must be letters, digits, '_', '.', '-' and not a number")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise RepositoryError(f"{file}: label {label!r} must name a version number, got {version!r}")
    return labels


Loader = Callable[[Path], Any]  # a version folder -> its predictor, loaded and warmed up (raises on failure)
BatcherFactory = Callable[[Any], Any]  # a predictor -> its started DynamicBatcher (async start done by caller)
Listener = Callable[[str, int, str, str | None], None]  # model, version, outcome (loaded|failed|unloaded), error


@dataclass
class ModelRepository:
    """The models served: {name: {version: Version}}, their labels, and the polling that keeps them current."""

    root: Path | None
    loader: Loader
    make_batcher: BatcherFactory
    on_change: Listener | None = None
    models: dict[str, dict[int, Version]] = field(default_factory=dict)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    label_errors: dict[str, str] = field(default_factory=dict)
    skipped: Skipped = field(default_factory=dict)  # folders left out, each logged once while it stays
    served_once: set[str] = field(default_factory=set)  # models that had an available version (readiness)
    polls: int = 0

    @property
    def names(self) -> list[str]:
        """The models with at least one version (loaded or failed)."""
        return sorted(self.models)

    def latest(self, name: str) -> Version | None:
        """The model's highest-numbered available version, or None."""
        available = [v for v in self.models.get(name, {}).values() if v.available]
        return max(available, key=lambda v: v.number) if available else None

    @property
    def ready(self) -> bool:
        """Some model can serve, and so can every model that has served since start: a new model whose every
        version fails (or is still loading) does not take the others out of service, as at start."""
        serving = {name for name in self.models if self.latest(name) is not None}
        self.served_once |= serving
        return bool(serving) and self.served_once & set(self.models) <= serving

    def skipped_of(self, name: str) -> list[dict[str, str]]:
        """The folders in a model's folder that are not served, each with why."""
        return [{"folder": folder.partition("/")[2], "reason": reason} for folder, reason in self.skipped.items()
                if folder.startswith(f"{name}/")]

    def problems(self) -> list[str]:
        """Every version that failed, and every labels.json that cannot be read, one line each."""
        failed = [f"model {v.model!r} version {v.number}: {v.error or v.reload_error}"
                  for versions in self.models.values() for v in versions.values() if v.error or v.reload_error]
        return failed + list(self.label_errors.values())

    def resolve(self, name: str, version: int | str | None = None, label: str | None = None) -> Version:
        """The version a request is for (NotServed naming what is missing); the caller calls enter()/leave()."""
        versions = self.models.get(name)
        if versions is None:
            raise NotServed(MISSING, f"Servable not found for request: model {name!r} is not served (models: "
                                 f"{', '.join(self.names) or 'none'})")
        if label is not None:
            if label not in self.labels.get(name, {}):
                known = sorted(self.labels.get(name, {}))
                raise NotServed(MISSING, f"model {name!r} has no version labelled {label!r} (labels: "
                                     f"{', '.join(known) or 'none'}; set them in {name}/{LABELS_FILE})")
            version = self.labels[name][label]
            if version not in versions:
                raise NotServed(MISSING, f"model {name!r}: label {label!r} names version {version} "
                                         f"({name}/{LABELS_FILE}), which is not served (versions: "
                                         f"{', '.join(map(str, sorted(versions)))})")
        if version is None:
            chosen = self.latest(name)
            if chosen is None:
                failed = [v for v in versions.values() if v.error]
                kind = failed[-1].error_kind if failed and len(failed) == len(versions) else "not_ready"
                raise NotServed(DOWN, f"model {name!r} has no available version: {self._failures(name)}", kind)
            return chosen
        number = _version_number(version)
        chosen = versions.get(number)
        if chosen is None:
            raise NotServed(MISSING, f"Servable not found for request: model {name!r} has no version {number} "
                                 f"(versions: {', '.join(map(str, sorted(versions)))})")
        if not chosen.available:
            if chosen.error is None:
                raise NotServed(DOWN, f"model {name!r} version {number} is still loading or warming up",
                                "not_ready")
            raise NotServed(DOWN, f"model {name!r} version {number} cannot serve: {chosen.error}",
                            chosen.error_kind)
        return chosen

    def _failures(self, name: str) -> str:
        """Why each version of a model failed, for an error message."""
        failed = [f"version {v.number}: {v.error}" for v in self.models.get(name, {}).values() if v.error]
        return "; ".join(failed) or "still loading or warming up; retry shortly"

    def add(self, name: str, number: int, path: Path, predictor: Any) -> Version:
        """Serve an already loaded predictor as a version (the --ensemble/--run case); `start` makes its batcher."""
        version = Version(name, number, path, (), predictor, loaded_at=time.time())
        self.models = {**self.models, name: {**self.models.get(name, {}), number: version}}
        return version

    def preload(self) -> list[tuple[str, int, str]]:
        """Load every version of the repository now, in this thread (before serving): (model, version, outcome)
        per version; a failed one is kept with its reason. `start` then makes the batchers on the server's loop."""
        found = self._note_skipped(_scan_with_prints(self.root))
        outcomes = []
        for name, versions in found.items():
            for number, (path, prints) in sorted(versions.items()):
                try:
                    version = Version(name, number, path, prints, self.loader(path), loaded_at=time.time())
                except Exception as err:  # noqa: BLE001 - the version's status says why; others serve
                    detail = _reason(err)
                    version = Version(name, number, path, prints, error=self.public(detail, path), detail=detail,
                                      loaded_at=time.time())
                self.models = {**self.models, name: {**self.models.get(name, {}), number: version}}
                outcomes.append((name, number, "loaded" if version.error is None else "failed"))
                self._notify(name, number, outcomes[-1][2], version.error)
        self._read_all_labels(found)
        return outcomes

    async def start(self) -> None:
        """Make and start the batcher of every loaded version that has none (on the server's event loop)."""
        for versions in self.models.values():
            for version in versions.values():
                if version.predictor is not None and version.batcher is None:
                    version.batcher = self.make_batcher(version.predictor)
                    await version.batcher.start()

    async def poll(self) -> list[tuple[str, int, str]]:
        """Bring the served versions in line with the folders; returns what changed as (model, version, outcome)."""
        if self.root is None:
            return []
        self.polls += 1
        loop = asyncio.get_running_loop()
        found = self._note_skipped(await loop.run_in_executor(None, _scan_with_prints, self.root))
        changes = []
        for name, versions in found.items():
            for number, (path, prints) in sorted(versions.items()):
                current = self.models.get(name, {}).get(number)
                if current is not None and current.fingerprint == prints:
                    continue
                changes.append(await self._load(name, number, path, prints))
        for name in list(self.models):
            for number in list(self.models[name]):
                if number not in found.get(name, {}):
                    changes.append(await self._unload(name, number))
        self._read_all_labels(found)
        return changes

    def _note_skipped(self, scanned: tuple[dict, Skipped]) -> dict:
        """Log each folder left out when it is first seen (not at every poll); the models found."""
        found, skipped = scanned
        for folder, reason in skipped.items():
            if self.skipped.get(folder) != reason:
                logger.warning("model repository: %s/%s is not served: %s", self.root, folder, reason)
        self.skipped = skipped
        return found

    def public(self, text: str, folder: Path) -> str:
        """`text` without the server's paths, the folder shown relative to this repository (public_reason)."""
        return public_reason(text, folder, self.root)

    def _read_all_labels(self, found: dict) -> None:
        """Labels of every model; a malformed labels.json keeps the model's previous labels and is reported."""
        for name in found:
            try:
                self.labels[name] = read_labels(self.root / name)
                self.label_errors.pop(name, None)
            except RepositoryError as err:
                public = self.public(str(err), self.root / name)
                if self.label_errors.get(name) != public:
                    logger.error("%s (the labels before it stay in use)", err)
                self.label_errors[name] = public
        for name in set(self.labels) - set(found):
            self.labels.pop(name, None)

    async def _load(self, name: str, number: int, path: Path, prints: tuple) -> tuple[str, int, str]:
        """Load a version off the event loop and swap it in; on failure keep what served before, with the reason."""
        loop = asyncio.get_running_loop()
        try:
            predictor = await loop.run_in_executor(None, self.loader, path)
        except Exception as err:  # noqa: BLE001 - any failure is this version's status; others keep serving
            detail = _reason(err)
            logger.error("model %r version %d (%s) failed to load: %s", name, number, path, detail)
            reason = self.public(detail, path)
            old = self.models.get(name, {}).get(number)
            if old is not None and old.available:  # changed files that do not load: the loaded copy keeps serving
                old.reload_error, old.fingerprint = reason, prints
                self._notify(name, number, "failed", reason)
                return name, number, "failed"
            versions = dict(self.models.get(name, {}))
            versions[number] = Version(name, number, path, prints, error=reason, detail=detail, loaded_at=time.time())
            self.models = {**self.models, name: versions}
            self._notify(name, number, "failed", reason)
            return name, number, "failed"
        version = Version(name, number, path, prints, predictor, self.make_batcher(predictor), loaded_at=time.time())
        await version.batcher.start()
        old = self.models.get(name, {}).get(number)
        self.models = {**self.models, name: {**self.models.get(name, {}), number: version}}  # the swap
        if old is not None and old.available:
            asyncio.get_running_loop().create_task(self._retire(old))
        logger.warning("model %r version %d loaded from %s", name, number, path)
        self._notify(name, number, "loaded", None)
        return name, number, "loaded"

    async def _unload(self, name: str, number: int) -> tuple[str, int, str]:
        """Take a removed version out of routing now; free it once its requests have finished."""
        versions = dict(self.models.get(name, {}))
        old = versions.pop(number)
        self.models = {**self.models, name: versions} if versions else {k: v for k, v in self.models.items()
                                                                         if k != name}
        if old.available:
            asyncio.get_running_loop().create_task(self._retire(old))
        logger.warning("model %r version %d removed: unloading it", name, number)
        self._notify(name, number, "unloaded", None)
        return name, number, "unloaded"

    async def _retire(self, version: Version) -> None:
        """Wait for a replaced or removed version's requests, then stop its batcher and drop its models."""
        await version.drained()
        if version.batcher is not None:
            await version.batcher.stop()
        version.predictor = None
        version.batcher = None

    def _notify(self, name: str, number: int, outcome: str, error: str | None) -> None:
        """Tell the listener (metrics) of a load, failure or unload."""
        if self.on_change is not None:
            self.on_change(name, number, outcome, error)

    async def close(self) -> None:
        """Stop every version's batcher."""
        for versions in self.models.values():
            for version in versions.values():
                if version.batcher is not None:
                    await version.batcher.stop()


def public_reason(text: str, folder: Path, root: Path | None = None) -> str:
    """A reason to show a client: a folder of the repository as its path inside it (<model>/<version>), another
    by its own name, any other absolute path by its last part (the log has them whole)."""
    inside = root is not None and folder.is_relative_to(root)
    return without_paths(text, {folder: folder.relative_to(root).as_posix() if inside else folder.name or str(folder)})


def _reason(err: Exception) -> str:
    """Why a version failed to load: an artifact error's own message (it names the file), else type and message."""
    return str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"


def _version_number(version: int | str) -> int:
    """A version as a number; NotServed 404 for text that is not one."""
    if isinstance(version, int) and not isinstance(version, bool):
        return version
    if isinstance(version, str) and VERSION_FOLDER.fullmatch(version):
        return int(version)
    raise NotServed(MISSING, f"version {version!r} is not a version number")


def _scan_with_prints(root: Path) -> tuple[dict[str, dict[int, tuple[Path, tuple]]], Skipped]:
    """scan() with each version folder's fingerprint (run in a thread: it walks the files)."""
    models, skipped = scan(root)
    return {name: {number: (path, fingerprint(path)) for number, path in versions.items()}
            for name, versions in models.items()}, skipped
