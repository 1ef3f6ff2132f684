"""Fine-tuning as practitioners do it: DeiT's recipe from timm, drop-path on the compact graph, a new classifier,
mixed precision, devices, progress lines, resuming with the recipe. Tiny models, a slice of digits."""
import copy
import io

import pytest
import torch
from rich.console import Console
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Subset

import vitcc
from vitcc.errors import VitccError
from vitcc.frontend import safe_pickle
from vitcc.training.data import make_loaders
from vitcc.devices import resolve_device
from vitcc.training.finetune import evaluate, finetune
from vitcc.training.recipe import Recipe, resolve_precision
from vitcc.training.surgery import BRANCH_META, drop_path_copy, replace_classifier, residual_branches

from conftest import tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
RECIPE = Recipe(aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, warmup_epochs=0.5,
                ema=0.9, drop_path=0.3)


def small_vit(seed=0, num_classes=10):
    return tiny_vit(img_size=8, patch_size=4, num_classes=num_classes, seed=seed)


def compact(prune="heads,head_dim,mlp,residual", seed=0):
    return vitcc.compile(small_vit(seed), "magnitude", sparsity=0.5, prune=prune, example_inputs=(X[:1],)).module


def subset(loader, step=7, batch=32):
    sub = Subset(loader.dataset, range(0, len(loader.dataset), step))
    return DataLoader(sub, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def digits():
    train, val = make_loaders("digits", (3, 8, 8), batch_size=32, mean=0.5, std=0.5)
    return subset(train), DataLoader(Subset(val.dataset, range(0, 350, 5)), batch_size=64)


@pytest.fixture(scope="module")
def augmented():
    """digits through timm's training transform (RandAugment, random erasing)."""
    train, _ = make_loaders("digits", (3, 8, 8), batch_size=32, mean=0.5, std=0.5, recipe=RECIPE)
    return subset(train, step=14)


@pytest.mark.parametrize("prune", ["heads,head_dim,mlp,residual", "branch"])
def test_drop_path_trains_stochastic_and_leaves_the_program_deterministic(prune, tmp_path):
    small = compact(prune)
    marked = [n for n in small.graph.nodes if BRANCH_META in n.meta]  # the compile records the kept branches
    assert marked and len(residual_branches(small, X)) == len(marked)
    train, placed = drop_path_copy(small, 0.4, X)
    rates = [p["rate"] for p in placed]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4) and rates == sorted(rates)
    assert len(placed) == len(marked) and all(p is q for p, q in zip(train.parameters(), small.parameters()))
    train.train()
    assert not torch.equal(train(X), train(X))  # two calls differ in training mode
    train.eval()
    assert torch.equal(train(X), small(X))  # evaluation never drops
    ref = small(X)
    finetune(small, DataLoader(list(zip(X, torch.arange(6) % 10)), batch_size=6), epochs=1, lr=1e-3,
             recipe=Recipe(drop_path=0.4), progress=False)
    assert not torch.allclose(small(X), ref)  # it trained
    assert not any(n.op == "call_module" for n in small.graph.nodes)  # the model itself has no DropPath
    small.train()
    assert torch.equal(small(X), small(X))
    vitcc.save(small.eval(), tmp_path / "small.pt2", (X[:1],))
    loaded = vitcc.load(tmp_path / "small.pt2").train()
    targets = {str(n.target) for n in loaded.graph.nodes}
    assert not any("bernoulli" in t or "rand" in t for t in targets)
    assert torch.equal(loaded(X), loaded(X)) and torch.allclose(loaded(X), small.eval()(X), atol=1e-5)


def test_drop_path_finds_the_branches_of_a_graph_without_a_record():
    small = compact()
    for n in small.graph.nodes:
        n.meta.pop(BRANCH_META, None)  # as a loaded program: the graph is analysed again
    _, placed = drop_path_copy(small, 0.2, X)
    assert [p["name"] for p in placed] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    with pytest.raises(VitccError, match="an eager model has its own drop-path rate"):
        finetune(small_vit(), DataLoader(list(zip(X, torch.zeros(6, dtype=torch.long))), batch_size=6), epochs=1,
                 recipe=Recipe(drop_path=0.1), progress=False)


def test_num_classes_puts_a_new_head_under_the_same_names():
    small = compact()
    keys = set(small.state_dict())
    info = replace_classifier(small, 4)
    assert info == {"param": "head.weight", "before": 10, "after": 4}
    assert small(X).shape == (6, 4) and set(small.state_dict()) == keys
    assert small.head.bias.abs().max() == 0 and small.head.weight.std() < 0.05  # timm's ViT init
    with pytest.raises(VitccError, match="whole number >= 1"):
        replace_classifier(small, 0)


def test_num_classes_and_the_class_count_check_in_compile(digits):
    train, val = digits
    model = small_vit(num_classes=5)
    with pytest.raises(VitccError, match="the data has 10 classes but the model has 5 outputs; pass --num-classes 10"):
        vitcc.compile(model, "magnitude", sparsity=0.5, example_inputs=(X[:1],), data=(train, val), finetune_epochs=1)
    with pytest.raises(VitccError, match="needs fine-tuning"):
        vitcc.compile(model, "magnitude", sparsity=0.5, example_inputs=(X[:1],), data=(train, val), num_classes=10)
    # no fine-tuning: the calibration still runs (on predictions), the accuracy of a foreign head is not measured
    res = vitcc.compile(model, "taylor", sparsity=0.5, example_inputs=(X[:1],), data=(train, val))
    assert "accuracy_before" not in res.report and "accuracy_after" not in res.report
    assert "10 classes" in res.report["accuracy_skipped"] and res.report["max_abs_error"] < 1e-4
    res = vitcc.compile(model, "magnitude", sparsity=0.5, example_inputs=(X[:1],), data=(train, val),
                        finetune_epochs=1, num_classes=10, lr=2e-3)
    assert res.report["num_classes"] == {"param": "head.weight", "before": 5, "after": 10}
    assert res.module(X).shape == (6, 10) and res.report["accuracy_after"]["n"] == len(val.dataset)
    assert res.report["finetune"]["distill"] is False and "distill_skipped" in res.report["finetune"]
    assert "accuracy_before" not in res.report and "accuracy_pruned" not in res.report


def test_bf16_autocast_on_cpu(digits):
    train, _ = digits
    model = small_vit()
    dtypes = []
    model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if m.training else None)
    before = copy.deepcopy(model.state_dict())
    h = finetune(model, train, epochs=1, lr=2e-3, precision="bf16", progress=False)
    assert h["precision"] == "bf16" and h["device"] == "cpu" and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32
    assert not torch.equal(model.head.weight, before["head.weight"])
    dtypes.clear()
    h = finetune(model, train, epochs=1, lr=2e-3, precision="fp16", progress=False)  # with a GradScaler
    assert h["precision"] == "fp16" and set(dtypes) == {torch.float16} and h["loss"][0] == h["loss"][0]
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    with pytest.raises(VitccError, match="unknown --precision 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))


def test_recipe_checks_and_devices():
    for bad, message in ((dict(drop_path=1.0), "--drop-path must be in"), (dict(ema=1.5), "--ema is the EMA decay"),
                         (dict(mixup=-1), "--mixup must be >= 0"), (dict(aa="autoaug"), "RandAugment policy")):
        with pytest.raises(VitccError, match=message):
            Recipe(**bad)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(VitccError, match="unknown --device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(VitccError, match="no CUDA device"):
            resolve_device("cuda")


def test_progress_prints_a_line_per_epoch_when_not_a_terminal(digits):
    train, val = digits
    out = io.StringIO()
    finetune(small_vit(), train, epochs=2, lr=1e-3, val_loader=val, progress=Console(file=out, width=200),
             label="fine-tune")
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("fine-tune epoch 1/2  loss ")
    assert all("acc " in ln and "val top-1" in ln and " img/s " in ln and "left " in ln for ln in lines)


def test_resume_from_last_with_the_recipe_matches_the_uninterrupted_run(augmented, tmp_path):
    train = augmented
    small = compact()

    def run(model, **kw):
        ema = ModelEmaV3(model, decay=RECIPE.ema)
        finetune(model, train, epochs=2, lr=2e-3, recipe=RECIPE, ema=ema, progress=False, **kw)
        return ema

    straight = copy.deepcopy(small)
    ema = run(straight)
    steps = []

    def stop_in_epoch_2(m):
        steps.append(1)
        if len(steps) > len(train) + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(copy.deepcopy(small), checkpoint_dir=tmp_path, on_step=stop_in_epoch_2)
    last = safe_pickle.load(tmp_path / "last.pt")
    assert last["epoch"] == 1 and last["ema"] is not None and (tmp_path / "epoch001_ema.pt").exists()
    resumed = copy.deepcopy(small)
    resumed_ema = run(resumed, checkpoint_dir=tmp_path, resume=True)
    for got, want in ((resumed, straight), (resumed_ema.module, ema.module)):
        sd, ref = got.state_dict(), want.state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert not torch.equal(straight.head.weight, small.head.weight)


def test_ema_is_evaluated_per_epoch(digits):
    train, val = digits
    h = finetune(small_vit(), train, epochs=1, lr=1e-3, val_loader=val, recipe=Recipe(ema=0.5, mixup=0.5),
                 progress=False)
    assert len(h["ema_top1"]) == 1 and 0.0 <= h["ema_top1"][0] <= 1.0


@pytest.mark.cuda
def test_finetune_on_cuda_in_bf16_with_the_recipe(digits):
    train, val = digits
    small = compact()
    h = finetune(small, train, epochs=1, lr=1e-3, device="cuda", recipe=Recipe(drop_path=0.1, mixup=0.8, ema=0.9),
                 val_loader=val, progress=False)
    assert h["device"].startswith("cuda") and h["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert next(small.parameters()).is_cuda and evaluate(small, val)["n"] == len(val.dataset)


@pytest.mark.cuda
def test_compile_trains_and_calibrates_on_cuda_and_returns_the_model_on_the_cpu(digits):
    train, val = digits
    res = vitcc.compile(small_vit(), "taylor", sparsity=0.5, example_inputs=(X[:1],), data=(train, val),
                        finetune_epochs=1, device="cuda", recipe=Recipe(drop_path=0.1))
    assert res.report["finetune"]["device"].startswith("cuda") and not next(res.module.parameters()).is_cuda
    res = vitcc.compile(small_vit(), "vtp", sparsity=0.3, example_inputs=(X[:1],), data=(train, val),
                        sparsity_epochs=1, device="cuda")
    assert res.report["max_abs_error"] < 1e-4


@pytest.mark.cuda
def test_compile_measures_accuracy_on_the_training_device(digits, monkeypatch):
    """Before pruning as after fine-tuning: a CPU model compiled with device="cuda" is evaluated on the GPU."""
    import vitcc.training.finetune as training
    evaluated_on = []
    monkeypatch.setattr(training, "evaluate", lambda model, loader: evaluated_on.append(
        next(model.parameters()).device.type) or evaluate(model, loader))
    res = vitcc.compile(small_vit(), "magnitude", sparsity=0.5, example_inputs=(X[:1],), data=digits,
                        finetune_epochs=1, device="cuda")
    assert evaluated_on == ["cuda", "cuda", "cuda"] and not next(res.module.parameters()).is_cuda
    assert {"accuracy_before", "accuracy_pruned", "accuracy_after"} <= res.report.keys()
