"""vitcc.frontend.sources: every model spec loads and runs, weights land, errors are one line, shapes come from the model."""
import json
import sys
import zipfile

import pytest
import timm
import torch
from safetensors.torch import save_file

import vitcc
from conftest import HF_KINDS, hand_vit, randomized, same_params, tiny_hf
from vitcc.errors import VerificationError, VitccError
from vitcc.frontend.sources import Source, load_model, parse_spec
from vitcc.frontend.input_shapes import input_channels, input_shape_for


def logits(out):
    return getattr(out, "logits", out)


def test_parse_spec():
    assert parse_spec("timm:deit_tiny_patch16_224") == Source("timm", "deit_tiny_patch16_224")
    assert parse_spec("hf:some/dir") == Source("hf", "some/dir")
    assert parse_spec("py:a/b.py:build") == Source("py", "a/b.py:build")
    assert parse_spec("model.pt") == Source("file", "model.pt")
    with pytest.raises(VitccError, match="empty model spec"):
        parse_spec("torchvision:")


# ---------------------------------------------------------------- timm
def test_timm_built_directly_says_its_shape(tmp_path):
    """A VisionTransformer made without create_model has no pretrained_cfg: patch_embed tells the shape."""
    from timm.models.vision_transformer import VisionTransformer
    m = VisionTransformer(img_size=64, patch_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    assert input_shape_for(m) == (1, 1, 64, 64)
    torch.save(m, tmp_path / "m.pt")
    loaded = load_model(str(tmp_path / "m.pt"))
    assert input_shape_for(loaded) == (1, 1, 64, 64)
    x = torch.randn(input_shape_for(loaded))
    assert torch.equal(loaded(x), m(x))


# ---------------------------------------------------------------- torchvision
def test_torchvision_vit_loads_runs_and_says_its_shape():
    m = load_model("torchvision:vit_b_16")
    assert type(m).__name__ == "VisionTransformer" and not m.training
    assert input_shape_for(m) == (1, 3, 224, 224)  # .image_size
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_torchvision_shape_from_weights_metadata():
    assert input_shape_for(load_model("torchvision:swin_t")) == (1, 3, 224, 224)  # no .image_size: weights' crop
    assert input_shape_for(load_model("torchvision:swin_v2_t")) == (1, 3, 256, 256)
    with pytest.raises(VitccError, match="cannot tell the input shape of RAFT; pass --input-shape"):
        input_shape_for(load_model("torchvision:raft_small"))  # optical flow: no classification crop


def test_torchvision_weights(tmp_path):
    import torchvision
    m = randomized(torchvision.models.get_model("mobilenet_v3_small", weights=None))
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(m.state_dict(), tmp_path / "w.pt")
    assert same_params(m, load_model("torchvision:mobilenet_v3_small", weights=str(tmp_path / "w.safetensors")))
    assert same_params(m, load_model(str(tmp_path / "w.pt"), arch="torchvision:mobilenet_v3_small"))
    with pytest.raises(VitccError, match=r"does not fit torchvision:squeezenet1_0 \(.*unexpected.*missing"):
        load_model("torchvision:squeezenet1_0", weights=str(tmp_path / "w.pt"))


def test_torchvision_unknown_name_suggests():
    with pytest.raises(VitccError, match="unknown torchvision model 'vit_b_61'; did you mean .*vit_b_16"):
        load_model("torchvision:vit_b_61")


# ---------------------------------------------------------------- hf
@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_dir_loads_and_runs(hf_vit_dir, kind):
    m = load_model(f"hf:{hf_vit_dir(kind)}")
    ref = tiny_hf(kind)
    assert type(m) is type(ref) and not m.training and same_params(m, ref)
    assert m.config._attn_implementation in ("sdpa", "eager")
    assert input_shape_for(m) == (1, 3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = m(x)
        assert type(out) is type(ref(x))
        torch.testing.assert_close(logits(out), logits(ref(x)))


def test_hf_weights_and_arch(hf_vit_dir, tmp_path):
    folder = hf_vit_dir("vit")
    other = randomized(tiny_hf("vit", seed=1))
    save_file(other.state_dict(), str(tmp_path / "w.safetensors"))
    assert same_params(other, load_model(f"hf:{folder}", weights=str(tmp_path / "w.safetensors")))
    assert same_params(other, load_model(str(tmp_path / "w.safetensors"), arch=f"hf:{folder}"))


def test_hf_refusals(hf_vit_dir, tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(VitccError, match="no such directory"):
        load_model(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(VitccError, match="has no config.json"):
        load_model(f"hf:{tmp_path}")
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((hf_vit_dir("vit") / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architectures=["MyRemoteViT"])))
    with pytest.raises(VitccError, match="names architecture 'MyRemoteViT', which is not a transformers class"):
        load_model(f"hf:{folder}")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VitccError, match="holds no .safetensors weights"):
        load_model(f"hf:{folder}")


def test_hf_misfit_weights(hf_vit_dir, tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "wider"
    folder.mkdir()
    config = json.loads((hf_vit_dir("vit") / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, intermediate_size=64)))
    (folder / "model.safetensors").write_bytes((hf_vit_dir("vit") / "model.safetensors").read_bytes())
    with pytest.raises(VitccError, match=r"does not fit ViTForImageClassification \(6 wrong shape\): "
                                         r"vit.* is \(96,\) in the file, \(64,\) in the model; "):
        load_model(f"hf:{folder}")


def test_hf_without_transformers(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what a missing package looks like to import
    with pytest.raises(VitccError, match=r"^hf: models need transformers: pip install -e '\.\[hf\]'$"):
        load_model(f"hf:{tmp_path}")


def test_hf_architecture_fallback(hf_vit_dir, tmp_path):
    """No architectures in config.json: the image-classification Auto class decides."""
    pytest.importorskip("transformers")
    folder = tmp_path / "noarch"
    folder.mkdir()
    config = json.loads((hf_vit_dir("vit") / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "architectures"}))
    (folder / "model.safetensors").write_bytes((hf_vit_dir("vit") / "model.safetensors").read_bytes())
    assert type(load_model(f"hf:{folder}")).__name__ == "ViTForImageClassification"


# ---------------------------------------------------------------- py
MODEL_PY = """
import torch
from helper import WIDTH

class Net(torch.nn.Module):
    def __init__(self, width=WIDTH):
        super().__init__()
        self.image_size = 8
        self.fc = torch.nn.Linear(8, width)

    def forward(self, x):
        return self.fc(x)

def build():
    torch.manual_seed(0)
    return Net()

def needs_args(width):
    return Net(width)

def broken():
    raise RuntimeError("no GPU here")

def not_a_model():
    return [1, 2]

NUMBER = 3
"""


@pytest.fixture
def model_py(tmp_path):
    (tmp_path / "helper.py").write_text("WIDTH = 4\n")
    (tmp_path / "mymodel.py").write_text(MODEL_PY)
    return tmp_path / "mymodel.py"


def test_py_file_class_and_factory(model_py):
    net = load_model(f"py:{model_py}:Net")
    assert type(net).__name__ == "Net" and not net.training and net.fc.out_features == 4  # sibling import works
    built = load_model(f"py:{model_py}:build")
    torch.manual_seed(0)
    assert same_params(built, load_model(f"py:{model_py}:Net"))
    assert input_shape_for(built) == (1, 3, 8, 8)


def test_py_module_from_working_directory(model_py, monkeypatch):
    monkeypatch.chdir(model_py.parent)
    monkeypatch.syspath_prepend(str(model_py.parent))  # for helper; mymodel itself is found through the cwd
    monkeypatch.delitem(sys.modules, "mymodel", raising=False)
    assert type(load_model("py:mymodel:build")).__name__ == "Net"
    monkeypatch.delitem(sys.modules, "mymodel", raising=False)


def test_py_installed_module():
    m = load_model("py:timm.models.vision_transformer:vit_tiny_patch16_224")
    assert isinstance(m, timm.models.vision_transformer.VisionTransformer)
    assert input_shape_for(m) == (1, 3, 224, 224)


def test_py_weights(model_py, tmp_path):
    net = randomized(load_model(f"py:{model_py}:Net"))
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    assert same_params(net, load_model(f"py:{model_py}:Net", weights=str(tmp_path / "w.safetensors")))


@pytest.mark.parametrize("target,message", [
    ("{f}:Nett", "has no attribute 'Nett'; did you mean Net"),
    ("{f}:NUMBER", r"py:.*:NUMBER is a int, not a class or a function that returns a model"),
    ("{f}:needs_args", r"needs_args\(\) raised TypeError: .*called with no arguments"),
    ("{f}:broken", r"broken\(\) raised RuntimeError: no GPU here"),
    ("{f}:not_a_model", r"not_a_model\(\) returned a list, not a torch.nn.Module"),
    ("{d}/missing.py:build", "no such Python file: .*missing.py"),
    ("no_such_module_xyz:build", "no module named 'no_such_module_xyz'"),
    ("{f}", "bad spec py:.*expected py:MODULE:CALLABLE"),
])
def test_py_errors(model_py, target, message):
    with pytest.raises(VitccError, match=message) as e:
        load_model("py:" + target.format(f=model_py, d=model_py.parent))
    assert "\n" not in str(e.value)


def test_py_import_errors(tmp_path):
    (tmp_path / "bad.py").write_text("def oops(:\n")
    (tmp_path / "needs.py").write_text("import not_installed_pkg_xyz\n")
    with pytest.raises(VitccError, match="importing .*bad.py failed: SyntaxError"):
        load_model(f"py:{tmp_path / 'bad.py'}:oops")
    with pytest.raises(VitccError, match="importing .*needs.py failed: ModuleNotFoundError: .*not_installed_pkg_xyz"):
        load_model(f"py:{tmp_path / 'needs.py'}:x")


# ---------------------------------------------------------------- .pt2
def exported(tmp_path, model, x, dynamic=True):
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},) if dynamic else None)
    torch.export.save(ep, tmp_path / "m.pt2")
    return tmp_path / "m.pt2"


def test_pt2_round_trip(tmp_path):
    m = hand_vit(img_size=48, in_chans=1)
    path = exported(tmp_path, m, torch.randn(2, 1, 48, 48))
    loaded = load_model(str(path))
    assert input_shape_for(loaded) == (1, 1, 48, 48)  # as exported, batch 1
    x = torch.randn(5, 1, 48, 48)
    assert not loaded.training and torch.equal(loaded(x), m(x))
    loaded.train()
    loaded.eval()  # ep.module() refuses both; the plain GraphModule does not


def test_pt2_hf_round_trip(tmp_path):
    m = tiny_hf("vit")
    x = torch.randn(1, 3, 32, 32)
    loaded = load_model(str(exported(tmp_path, m, x, dynamic=False)))
    out = loaded(x)
    assert type(out).__name__ == "ImageClassifierOutput"
    torch.testing.assert_close(out.logits, m(x).logits)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_pt2_with_pickled_code_refused(tmp_path):
    path = exported(tmp_path, hand_vit(), torch.randn(1, 3, 32, 32), dynamic=False)
    evil, marker = tmp_path / "evil.pt2", tmp_path / "pwned"
    torch.save(Evil(marker), tmp_path / "payload.pt")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = (tmp_path / "payload.pt").read_bytes()
            dst.writestr(info, data)
    with pytest.raises(VitccError, match="refusing .*evil.pt2: .*sample_inputs/model.pt is not plain tensor data"):
        load_model(str(evil))
    assert not marker.exists()


def test_pt2_errors(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(VitccError, match="cannot read .*bad.pt2: .*expected an ExportedProgram"):
        load_model(str(tmp_path / "bad.pt2"))
    path = exported(tmp_path, hand_vit(), torch.randn(1, 3, 32, 32), dynamic=False)
    with pytest.raises(VitccError, match="--arch only applies to a state-dict file"):
        load_model(str(path), arch="timm:deit_tiny_patch16_224")


# ---------------------------------------------------------------- spec errors and input shapes
def test_spec_errors(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "sd.pt")
    with pytest.raises(VitccError, match="--weights applies to a model spec or a model file"):
        load_model(str(tmp_path / "sd.pt"), arch="timm:deit_tiny_patch16_224", weights="w.pt")
    with pytest.raises(VitccError, match="--arch only applies to a state-dict file; with a torchvision: spec"):
        load_model("torchvision:vit_b_16", arch="timm:deit_tiny_patch16_224")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(VitccError, match="--arch 'model.pt' names no model"):
        load_model(str(tmp_path / "sd.safetensors"), arch="model.pt")
    with pytest.raises(VitccError, match="unknown model spec .*a folder from save_pretrained is hf:DIR"):
        load_model(str(tmp_path))


def test_input_shapes(hf_vit_dir):
    assert input_shape_for(hand_vit(img_size=40, patch=8, in_chans=2)) == (1, 2, 40, 40)
    assert input_shape_for(tiny_hf("swin")) == (1, 3, 32, 32)
    assert input_shape_for(load_model("timm:deit_tiny_patch16_224")) == (1, 3, 224, 224)
    assert input_shape_for(hand_vit(), "2,3,16,16") == (2, 3, 16, 16)
    with pytest.raises(VitccError, match="cannot tell the input shape of Linear; pass --input-shape"):
        input_shape_for(torch.nn.Linear(2, 2))


# timm models, pickles and state dicts: what they load as and the input shape they say
def _timm_vit():
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
    m = _timm_vit()
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
    assert input_shape_for(_timm_vit()) == (1, 3, 32, 32)  # created with img_size=32, cfg still says 224
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


def test_volo_takes_the_channels_of_its_stem_not_of_its_patch_projection():
    """VOLO's patch_embed runs three stem convolutions (3 -> 64 channels) before its proj (64 -> 192):
    the image's channel count is what the first convolution the input reaches reads."""
    m = timm.create_model("volo_d1_224", pretrained=False).eval()
    assert m.patch_embed.proj.in_channels == 64 and m.patch_embed.conv[0].in_channels == 3
    assert input_shape_for(m) == (1, 3, 224, 224)
    assert input_channels(m, (1, 64, 224, 224)) == 3  # the hook stops the run before the stem computes
    with pytest.raises(VitccError, match=r"--input-shape 1,64,224,224 does not fit VOLO: it takes images "
                                         r"\(N, 3, H, W\); pass e.g. --input-shape 1,3,224,224"):
        input_shape_for(m, "1,64,224,224")


def test_a_small_volo_compiles_and_verifies_on_its_images():
    from timm.models.volo import VOLO
    torch.manual_seed(0)
    small = dict(layers=(1, 1), img_size=32, patch_size=8, stem_hidden_dim=16, embed_dims=(32, 64), num_heads=(2, 4),
                 downsamples=(True, False), outlook_attention=(True, False), num_classes=10, post_layers=("ca",))
    gray = VOLO(in_chans=1, **small).eval()
    gray.pretrained_cfg = {"input_size": (3, 32, 32)}  # a cfg left at 3 channels (timm's, for in_chans=1)
    assert input_shape_for(gray) == (1, 1, 32, 32)
    m = VOLO(**small).eval()
    x = torch.randn(input_shape_for(m, "1,3,32,32"))  # refused before: patch_embed.proj takes 16 channels
    r = vitcc.compile(m, "magnitude", sparsity=0.5, example_inputs=(x,))
    assert r.report["max_rel_error"] < 1e-4 and r.report["params_after"] < r.report["params_before"] / 2
    assert {"heads", "head_dim", "mlp", "residual"} <= set(r.report["widths"])
