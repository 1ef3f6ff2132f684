import pytest
import timm
import torch
from safetensors.torch import save_file

from vitcc.errors import VerificationError, VitccError
from vitcc.frontend import input_shape_for, load_model

from conftest import randomized, same_params


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=48, depth=2, num_heads=3).eval()


@pytest.fixture(scope="module")
def deit():
    return load_model("timm:deit_tiny_patch16_224")


# ---------------------------------------------------------------- errors
def test_exit_codes():
    assert VitccError.exit_code == 2 and VerificationError.exit_code == 3
    assert issubclass(VerificationError, VitccError)


# ---------------------------------------------------------------- load_model
def test_timm_spec(deit):
    assert type(deit).__name__ == "VisionTransformer" and not deit.training


def test_unknown_timm_name_suggests():
    with pytest.raises(VitccError, match="deit_tiny_patch16_224"):
        load_model("timm:deit_tiny_patch16_22")


def test_pickled_module_round_trip(tmp_path):
    m = tiny_vit()
    torch.save(m, tmp_path / "m.pt")
    m2 = load_model(str(tmp_path / "m.pt"))
    x = torch.randn(1, 3, 32, 32)
    assert not m2.training and torch.equal(m(x), m2(x))


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_pickled_timm_models_pass_the_allowlist(tmp_path, name):
    m = timm.create_model(name, pretrained=False)
    torch.save(m, tmp_path / "m.pth")
    assert same_params(m, load_model(str(tmp_path / "m.pth")))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_with_arch(tmp_path, deit, suffix):
    m = randomized(timm.create_model("deit_tiny_patch16_224", pretrained=False))
    path = tmp_path / f"sd{suffix}"
    (save_file if suffix == ".safetensors" else torch.save)(m.state_dict(), str(path))
    loaded = load_model(str(path), arch="timm:deit_tiny_patch16_224")
    assert same_params(m, loaded) and not loaded.training


def test_weights_into_timm_spec(tmp_path):
    m = randomized(timm.create_model("deit_tiny_patch16_224", pretrained=False))
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": m.state_dict()}, tmp_path / "ckpt.pt")
    for w in ("w.safetensors", "ckpt.pt"):
        assert same_params(m, load_model("timm:deit_tiny_patch16_224", weights=str(tmp_path / w)))


def test_state_dict_mismatch(tmp_path):
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "r.pt")
    with pytest.raises(VitccError, match=r"does not fit timm:deit_tiny_patch16_224 \(\d+ unexpected, \d+ missing\)"):
        load_model(str(tmp_path / "r.pt"), arch="timm:deit_tiny_patch16_224")


def test_state_dict_shape_mismatch(tmp_path, deit):
    sd = dict(deit.state_dict(), **{"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)})
    save_file(sd, str(tmp_path / "sd.safetensors"))
    with pytest.raises(VitccError, match=r"\(2 wrong shape\): .*head.weight is \(10, 192\) in the file"):
        load_model(str(tmp_path / "sd.safetensors"), arch="timm:deit_tiny_patch16_224")


def test_state_dict_without_arch(tmp_path, deit):
    torch.save(deit.state_dict(), tmp_path / "sd.pt")
    save_file(deit.state_dict(), str(tmp_path / "sd.safetensors"))
    for f in ("sd.pt", "sd.safetensors"):
        with pytest.raises(VitccError, match="--arch timm:NAME"):
            load_model(str(tmp_path / f))


def test_missing_corrupt_and_unknown(tmp_path):
    with pytest.raises(VitccError, match="no such file: .*nope.pt"):
        load_model(str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"definitely not a checkpoint")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(VitccError, match="cannot read .*bad.pt: .*expected a torch.save'd module"):
        load_model(str(tmp_path / "bad.pt"))
    with pytest.raises(VitccError, match="cannot read .*bad.safetensors"):
        load_model(str(tmp_path / "bad.safetensors"), arch="timm:deit_tiny_patch16_224")
    with pytest.raises(VitccError, match="unknown model spec .*timm:NAME"):
        load_model("model.onnx")


# ---------------------------------------------------------------- trust (hostile files: test_hostile_files.py)
def _make_linear():
    return torch.nn.Linear(2, 3)


class OutsideModule(torch.nn.Module):
    def __reduce__(self):
        return (_make_linear, ())


def test_trust_pickle(tmp_path):
    torch.save(OutsideModule(), tmp_path / "m.pt")
    with pytest.raises(VitccError, match="refusing to unpickle .*_make_linear"):
        load_model(str(tmp_path / "m.pt"))
    assert isinstance(load_model(str(tmp_path / "m.pt"), trust_pickle=True), torch.nn.Linear)


# ---------------------------------------------------------------- input shapes
def test_input_shape(deit):
    assert input_shape_for(deit) == (1, 3, 224, 224)
    assert input_shape_for(tiny_vit()) == (1, 3, 32, 32)  # created with img_size=32, cfg still says 224
    assert input_shape_for(deit, "2,3,64,64") == (2, 3, 64, 64)
    assert input_shape_for(deit, " 1, 3, 8, 8 ") == (1, 3, 8, 8)
    assert input_shape_for(deit, (1, 3, 16, 16)) == (1, 3, 16, 16)
    for bad in ("1,a,3", "", "1,0,3", "-1,3"):
        with pytest.raises(VitccError, match="bad input shape"):
            input_shape_for(deit, bad)
    plain = torch.nn.Linear(4, 4)
    with pytest.raises(VitccError, match="--input-shape"):
        input_shape_for(plain)
    plain.vitcc_input_shape = (1, 4)
    assert input_shape_for(plain) == (1, 4)
