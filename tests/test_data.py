import pytest

from dormant import data
from dormant.data import DataNotFoundError, resolve


def test_shared_data_is_found():
    p = resolve("wikitext2-test")
    assert p.name == "wiki.test.raw" and p.stat().st_size > 1_000_000


def test_explicit_path_wins_and_must_exist(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("hello")
    assert resolve("wikitext2-test", f) == f
    with pytest.raises(DataNotFoundError, match="does not exist"):
        resolve("wikitext2-test", tmp_path / "missing.txt")


def test_env_root_comes_before_shared(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text(" = A =\n")
    monkeypatch.setenv("DORMANT_DATA", str(tmp_path))
    assert resolve("wikitext2-test") == tmp_path / "wikitext-2" / "wiki.test.raw"


def test_not_found_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "data_roots", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(DataNotFoundError) as e:
        resolve("wikitext2-valid", download=False)
    msg = str(e.value)
    assert str(tmp_path / "a" / "wikitext-2" / "wiki.valid.raw") in msg
    assert str(tmp_path / "b" / "wikitext-2" / "tokens" / "valid.txt") in msg
    assert "DORMANT_DATA" in msg


def test_unknown_source():
    with pytest.raises(KeyError, match="known:"):
        resolve("imagenet")
