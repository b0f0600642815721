"""Zoo models and dataset loaders (real checkpoints and data from ../shared/data; synthetic files otherwise)."""

import gzip
import io
import struct
import zipfile

import numpy as np
import pytest
import torch

from dormant.data import DataNotFoundError
from dormant.snn.datasets import DATASETS, ImageSet, load_dataset, split_holdout
from dormant.snn.models import MODELS, build_model, load_state_dict_strict, load_zoo_model
from dormant.snn.simulate import evaluate_ann


def _have(source: str) -> bool:
    from dormant.data import resolve

    try:
        resolve(source, download=False)
        return True
    except DataNotFoundError:
        return False


needs_cifar = pytest.mark.skipif(not (_have("cifar10-test1000") and _have("resnet20-cifar10")),
                                 reason="needs ../shared/data (CIFAR-10 slices and ResNet-20 weights)")


@needs_cifar
def test_pretrained_resnet20_scores_at_least_91_percent_on_lossless_test_images():
    model, spec = load_zoo_model("resnet20")
    test = load_dataset("cifar10-lossless", "test")
    assert len(test) == 1000 and test.x.shape[1:] == (3, 32, 32)
    acc = evaluate_ann(model, *test.tensors(spec.mean, spec.std))
    assert acc >= 0.91


@pytest.mark.skipif(not _have("lenet-mnist"), reason="needs ../shared/data/mnist")
def test_lenet_checkpoint_loads_strictly():
    model, spec = load_zoo_model("lenet")
    assert spec.input_shape == (1, 28, 28)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_zoo_architectures_build():
    for name in MODELS:
        shape = MODELS[name].input_shape
        assert build_model(name)(torch.zeros(2, *shape)).shape == (2, 10)
    with pytest.raises(KeyError, match="the zoo has"):
        build_model("resnet18")


def test_strict_loading_rejects_mismatched_checkpoints():
    model = build_model("resnet20")
    state = {f"module.{k}": v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    load_state_dict_strict(model, state)  # akamaster layout: module. prefix, no BN counters
    state["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_state_dict_strict(model, state)


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes())


def test_mnist_idx_loader(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    y = np.arange(7) % 10
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(_idx_bytes(x))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx_bytes(y))
    ds = load_dataset("mnist", "test", str(tmp_path))
    assert ds.x.shape == (7, 1, 28, 28) and torch.equal(ds.x[:, 0], torch.from_numpy(x.astype(np.uint8)))
    assert ds.y.tolist() == y.tolist()


def test_cifar_jpeg_loader(tmp_path):
    from PIL import Image

    path = tmp_path / "test.zip"
    with zipfile.ZipFile(path, "w") as z:
        for cls, idx in (("cat", 1), ("airplane", 0), ("cat", 0)):
            buf = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 10 * idx + len(cls), np.uint8)).save(buf, format="PNG")
            z.writestr(f"test/{cls}/{idx:04d}.jpg", buf.getvalue())
    ds = load_dataset("cifar10-jpeg", "test", str(path))
    assert ds.y.tolist() == [0, 3, 3] and ds.x.shape == (3, 3, 32, 32)
    assert ds.x[1, 0, 0, 0] == 3 and ds.x[2, 0, 0, 0] == 13  # ordered by class, then index


def test_official_cifar_archive_is_checked_before_unpickling(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"not the archive")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_dataset("cifar10", "test", str(bad))


def test_split_holdout_is_disjoint_and_seeded():
    data = ImageSet(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.arange(50), "toy")
    a, b = split_holdout(data, 10, seed=1)
    a2, b2 = split_holdout(data, 10, seed=1)
    assert len(a) == 40 and len(b) == 10 and not set(a.y.tolist()) & set(b.y.tolist())
    assert torch.equal(b.y, b2.y)
    with pytest.raises(KeyError, match="known"):
        load_dataset("imagenet", "test")
    assert set(DATASETS) >= {"cifar10-lossless", "cifar10-jpeg", "cifar10", "mnist"}
