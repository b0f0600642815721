import pytest
import torch

from dormant.artifacts import ArtifactError, append_jsonl, load_artifact, read_jsonl, save_artifact


def test_round_trip(tmp_path):
    p = save_artifact(tmp_path / "a.safetensors", "x.Thing", 2, {"w": torch.arange(4.0)}, {"k": [1, 2]})
    tensors, meta, version = load_artifact(p, "x.Thing", (1, 2))
    assert torch.equal(tensors["w"], torch.arange(4.0)) and meta == {"k": [1, 2]} and version == 2


def test_kind_version_and_corruption_are_caught(tmp_path):
    p = save_artifact(tmp_path / "a.safetensors", "x.Thing", 3, {"w": torch.ones(3)}, {})
    with pytest.raises(ArtifactError, match="expected 'x.Other'"):
        load_artifact(p, "x.Other", (3,))
    with pytest.raises(ArtifactError, match="version 3"):
        load_artifact(p, "x.Thing", (1, 2))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable"):
        load_artifact(p, "x.Thing", (3,))
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "none.safetensors", "x.Thing", (3,))


def test_no_temp_files_left(tmp_path):
    save_artifact(tmp_path / "a.safetensors", "k", 1, {"w": torch.ones(1)}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_jsonl_survives_a_truncated_last_line(tmp_path):
    p = tmp_path / "r.jsonl"
    append_jsonl(p, {"a": 1})
    append_jsonl(p, {"a": 2})
    with open(p, "a") as f:
        f.write('{"a": 3, "b"')  # a crash mid-write
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ArtifactError, match="line 2"):
        read_jsonl(p)
