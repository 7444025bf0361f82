"""What a model version was built from, and how a run differs from it.

Four components identify what training would produce: the data's content hash, the run's
effective configuration (``config_hash``), the teacher's identity (``teacher_identity``) and the
code version (``code_version``). ``register_candidates`` records them as tags of every model version;
``changed_since_champion`` compares a new run's with the champion's (``lineage_differences``).
Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
# Written at image build time (infra/project/Dockerfile, build arg CODE_VERSION): images carry no .git.
CODE_VERSION_FILE = "CODE_VERSION"
# The packages whose Python sources make up the pipeline's code, for the source-hash fallback.
SOURCE_PACKAGES = ("tasks", "serving", "monitoring", "dags")
# Bookkeeping folders that download tools write into model folders (timestamps, etags): not the model.
IGNORED_MODEL_FOLDERS = frozenset({".git", ".cache"})
CHUNK_BYTES = 1 << 20
SHORT = 12  # hex digits shown in messages
# How many differing params a "configuration changed" reason names before it says "and N more".
MAX_NAMED_PARAMS = 6


@dataclass(frozen=True)
class Lineage:
    """The four components a model version was built from, under the names of its MLflow tags."""

    data_hash: str
    config_hash: str
    teacher_id: str
    code_version: str

    def tags(self) -> dict[str, str]:
        return asdict(self)


LINEAGE_TAGS = tuple(item.name for item in fields(Lineage))
COMPONENT_NAMES = {"data_hash": "data", "config_hash": "configuration", "teacher_id": "teacher",
                   "code_version": "code"}


def config_params(config: PipelineConfig) -> dict[str, str]:
    """The effective configuration flattened to ``section.key`` -> text (the MLflow params of a run)."""
    return _flatten(config.to_dict())


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def config_hash(config: PipelineConfig) -> str:
    """sha256 of the effective configuration (after defaults) as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def teacher_identity(resolved_teacher: str) -> str:
    """What the teacher is: ``sha256:<hex>`` of a local folder's (or file's) content, else the hub id as given.

    A folder's digest covers every file's path relative to the folder and its bytes, in path order, so
    moving the folder keeps it and changing any file changes it. A hub id is taken as is (with its
    revision, when it names one); without a revision it names whatever the hub serves.
    """
    path = Path(resolved_teacher)
    if path.is_file():
        return "sha256:" + _digest_files([(path.name, path)])
    if path.is_dir():
        return "sha256:" + _digest_files(_model_files(path))
    return resolved_teacher


def _model_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under ``folder``, sorted by the relative path."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not IGNORED_MODEL_FOLDERS.intersection(relative.parts[:-1]):
            found.append((relative.as_posix(), path))
    return sorted(found)


def _digest_files(files: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for relative, path in files:
        # Name and size delimit each file, so no two different folders give the same stream.
        digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
        for chunk in _chunks(path):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            yield chunk


def code_version(root: Path = REPO_ROOT) -> str:
    """The version of the pipeline code under ``root``, never a constant.

    The git commit when ``root`` is a git checkout, with ``+dirty:<12 hex of the sources hash>`` when
    tracked files have uncommitted changes (so two different edits are two versions); else the
    ``CODE_VERSION`` file written when the image was built; else ``sources sha256:<12 hex>`` over the
    Python files of the pipeline's packages.
    """
    if (root / ".git").exists():
        commit = _git_commit(root)
        if commit is not None:
            return commit
    stamped = root / CODE_VERSION_FILE
    if stamped.is_file() and stamped.read_text().strip():
        return stamped.read_text().strip()
    return "sources sha256:" + sources_hash(root)[:SHORT]


def _git_commit(root: Path) -> str | None:
    """The checkout's commit (+dirty with the sources hash), or None when git is missing or fails."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return f"{commit}+dirty:{sources_hash(root)[:SHORT]}" if dirty else commit


def sources_hash(root: Path = REPO_ROOT) -> str:
    """sha256 over the ``.py`` files of the pipeline's packages under ``root`` (path and bytes, path order)."""
    files = [(path.relative_to(root).as_posix(), path) for package in SOURCE_PACKAGES
             for path in (root / package).rglob("*.py") if "__pycache__" not in path.parts]
    return _digest_files(sorted(files))


def lineage_differences(champion_tags: dict[str, str], current: Lineage,
                        champion_params: dict[str, str] | None, current_params: dict[str, str]) -> list[str]:
    """How ``current`` differs from the champion's version tags, one phrase per component (empty: nothing).

    A component the champion has no tag for counts as changed: it was registered before that tag
    existed. ``champion_params`` (its run's params, None when unreadable) name the configuration's
    differences; without them the hashes do. ``current_params`` are this run's, logged the same way.
    """
    missing = [key for key in LINEAGE_TAGS if not champion_tags.get(key)]
    differences = ([f"the champion has no {', '.join(missing)} tag (registered before it was recorded)"]
                   if missing else [])
    for key, value in current.tags().items():
        before = champion_tags.get(key)
        if not before or before == value:
            continue
        if key == "config_hash":
            differences.append(config_difference(before, value, champion_params, current_params))
        else:
            differences.append(f"{COMPONENT_NAMES[key]} {short(before)} -> {short(value)}")
    return differences


def config_difference(before_hash: str, after_hash: str, champion_params: dict[str, str] | None,
                      current_params: dict[str, str]) -> str:
    """"configuration changed: <param> <old> -> <new>, ..." (at most MAX_NAMED_PARAMS named), or by hash
    when the champion's params are unknown or show no difference (e.g. beyond what MLflow keeps)."""
    before = champion_params or {}
    changed = sorted(name for name in before.keys() | current_params.keys()
                     if before.get(name) != current_params.get(name))
    if champion_params is None or not changed:
        return f"configuration changed (hash {short(before_hash)} -> {short(after_hash)})"
    named = [f"{name} {before.get(name, '(unset)')} -> {current_params.get(name, '(unset)')}"
             for name in changed[:MAX_NAMED_PARAMS]]
    more = f" and {len(changed) - MAX_NAMED_PARAMS} more" if len(changed) > MAX_NAMED_PARAMS else ""
    return "configuration changed: " + ", ".join(named) + more


def short(value: str) -> str:
    """A value for a message: a trailing sha256 hex digest cut to SHORT digits, anything else as it is."""
    return re.sub(rf"([0-9a-f]{{{SHORT}}})[0-9a-f]{{{64 - SHORT}}}$", r"\1", value)
