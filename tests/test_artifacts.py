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


def _small_artifact(tmp_path):
    tensors = {"values": torch.tensor([[0.0718, 0.5], [1.25, 3.0]]), "targets": torch.tensor([0.5, 0.5]),
               "mask": torch.tensor([1, 0, 255], dtype=torch.uint8)}
    return save_artifact(tmp_path / "thr.safetensors", "dormant.Thresholds", 1, tensors, {"site": "intermediate"})


def test_every_single_byte_corruption_is_refused(tmp_path):
    """Flip every byte of a small artifact in turn (all 8 bits, and +1): each corrupted copy is refused."""
    path = _small_artifact(tmp_path)
    blob = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    accepted = []
    for i in range(len(blob)):
        for change in (lambda b: b ^ 0xFF, lambda b: (b + 1) % 256):
            corrupted = bytearray(blob)
            corrupted[i] = change(corrupted[i])
            bad.write_bytes(bytes(corrupted))
            try:
                load_artifact(bad, "dormant.Thresholds", (1,))
            except ArtifactError:
                continue
            accepted.append(i)
    assert accepted == [], f"{len(accepted)} of {2 * len(blob)} corruptions accepted, at bytes {accepted[:10]}"


def test_one_flipped_bit_in_tensor_data_names_the_file(tmp_path):
    path = _small_artifact(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[-20] ^= 0x01  # inside the float data
    path.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"thr\.safetensors is corrupted"):
        load_artifact(path, "dormant.Thresholds", (1,))


def test_verify_needs_no_torch(tmp_path):
    import subprocess
    import sys

    path = _small_artifact(tmp_path)
    code = ("import sys; from dormant.artifacts import verify_artifact;"
            f"assert verify_artifact({str(path)!r}, 'dormant.Thresholds', (1,)) == {{'site': 'intermediate'}};"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_files_honour_the_umask_and_stale_temps_are_cleared(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        p = save_artifact(tmp_path / "a.safetensors", "k", 1, {"w": torch.ones(1)}, {})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644
    dead = tmp_path / ".a.safetensors.999999999.abc.tmp"  # a writer that was killed (no such pid)
    alive = tmp_path / f".a.safetensors.{os.getpid()}.xyz.tmp"  # a writer still running: left alone
    dead.write_bytes(b"partial")
    alive.write_bytes(b"in progress")
    save_artifact(p, "k", 1, {"w": torch.zeros(1)}, {})
    assert not dead.exists() and alive.exists()


def test_output_errors_name_the_target_not_a_temp_file(tmp_path):
    from dormant.artifacts import OutputError

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"file/a\.safetensors") as e:
        save_artifact(tmp_path / "file" / "a.safetensors", "k", 1, {"w": torch.ones(1)}, {})
    assert ".tmp" not in str(e.value)
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="existing directory"):
        save_artifact(tmp_path / "dir", "k", 1, {"w": torch.ones(1)}, {})


def test_output_paths_are_checked_before_any_work(tmp_path):
    import os

    from dormant.config import out_dir, out_file

    assert out_file(str(tmp_path / "new" / "deeper" / "a.safetensors")) is None
    assert not (tmp_path / "new").exists() and not list(tmp_path.iterdir())  # the check leaves nothing behind
    (tmp_path / "f").write_text("x")
    assert "is a file" in out_file(str(tmp_path / "f" / "a.safetensors"))
    assert "existing folder" in out_file(str(tmp_path))
    assert "existing file" in out_dir(str(tmp_path / "f"))
    if os.path.isdir("/proc"):  # access() grants root everything; the probe write knows better
        assert "cannot be created" in out_file("/proc/dormant-test.safetensors")
