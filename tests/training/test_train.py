"""Fine-tuning and evaluation on tiny models and a small slice of the digits set."""
import copy
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import vitcc
from vitcc.frontend import safe_pickle
from vitcc.frontend.sources import load_model
from vitcc.training.data import make_loaders
from vitcc.errors import Interrupted, VitccError, signals_received_in
from vitcc.training.finetune import distillation_loss, evaluate, finetune

from conftest import tiny_vit


pytestmark = pytest.mark.usefixtures("one_thread")


def small_vit(seed=0, num_classes=10):
    return tiny_vit(img_size=8, patch_size=4, num_classes=num_classes, seed=seed)


@pytest.fixture(scope="module")
def digits():
    train, val = make_loaders("digits", (3, 8, 8), batch_size=32, mean=0.5, std=0.5)
    sub = DataLoader(Subset(train.dataset, range(0, 1400, 7)), batch_size=32, shuffle=True,
                     generator=torch.Generator().manual_seed(0))  # 200 images, all classes
    return sub, DataLoader(Subset(val.dataset, range(0, 350, 5)), batch_size=64)


def mean_kl(student, teacher, loader):
    with torch.no_grad():
        return sum(distillation_loss(student(x), teacher(x)).item() for x, _ in loader) / len(loader)


def test_finetune_reduces_loss_and_reports_history(digits):
    train, val = digits
    model = small_vit()
    h = finetune(model, train, epochs=3, lr=3e-3, val_loader=val, progress=False)
    assert len(h["loss"]) == len(h["acc"]) == len(h["val_top1"]) == 3
    assert h["loss"][-1] < h["loss"][0] and h["acc"][-1] > h["acc"][0]
    assert not model.training


def test_same_seed_same_weights_other_seed_other_weights(digits):
    train, _ = digits
    runs = []
    for seed in (0, 0, 1):
        model = small_vit()
        finetune(model, train, epochs=2, lr=1e-3, seed=seed, progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_distillation_pulls_the_student_to_the_teacher(digits):
    train, _ = digits
    teacher, student = small_vit(seed=1), small_vit(seed=2)
    a = torch.randn(4, 10)
    assert distillation_loss(a, a).abs().item() < 1e-6 and distillation_loss(a, a.flip(1)).item() > 0
    before = mean_kl(student, teacher, train)
    finetune(student, train, epochs=2, lr=2e-3, teacher=teacher, kd_weight=1.0, temperature=2.0, progress=False)
    assert mean_kl(student, teacher, train) < 0.5 * before
    assert not teacher.training


def test_extra_loss_and_on_step_hooks(digits):
    train, _ = digits
    model = small_vit()
    calls = {"extra": 0, "step": 0}

    def extra(m):
        calls["extra"] += 1
        assert m is model
        return 1e-3 * m.head.weight.abs().sum()

    def step(m):
        calls["step"] += 1
        m.head.bias.zero_()  # a projection: runs after every optimizer step

    h = finetune(model, train, epochs=2, extra_loss=extra, on_step=step, progress=False)
    assert calls == {"extra": 2 * len(train), "step": 2 * len(train)}
    assert len(h["extra"]) == 2 and h["extra"][0] > 0
    assert model.head.bias.abs().max() == 0


def test_evaluate_top1_top5():
    class Fixed(torch.nn.Module):  # always ranks classes 0 > 1 > ... > 9
        def forward(self, x):
            return torch.arange(10, 0, -1, dtype=torch.float).expand(len(x), 10)

    y = torch.tensor([0, 0, 3, 4, 7, 9, 1, 5])
    loader = DataLoader(list(zip(torch.zeros(8, 1), y)), batch_size=3)
    assert evaluate(Fixed(), loader) == {"top1": 2 / 8, "top5": 5 / 8, "n": 8}


def test_a_stop_signal_that_was_swallowed_ends_training_at_the_next_step(digits):
    """The CLI's handler raised it, but code that catches everything ate it: the run stops at the next step
    instead of training for hours."""
    train, _ = digits
    steps = []
    with signals_received_in([signal.SIGTERM]), pytest.raises(Interrupted, match="SIGTERM"):
        finetune(small_vit(), train, epochs=2, on_step=lambda *a: steps.append(a), progress=False)
    assert steps == []


def test_labels_outside_the_model_are_an_error(digits):
    train, val = digits
    with pytest.raises(VitccError, match="only 5 outputs"):
        evaluate(small_vit(num_classes=5), val)


def test_finetune_compact_graphmodule_with_checkpoints_and_resume(digits, tmp_path):
    train, val = digits
    small = vitcc.compile(small_vit(), "magnitude", sparsity=0.5, example_inputs=(torch.randn(1, 3, 8, 8),)).module
    straight = copy.deepcopy(small)
    finetune(straight, train, epochs=2, lr=2e-3, progress=False)
    assert not torch.equal(straight.head.weight, small.head.weight)
    interrupted, steps = copy.deepcopy(small), []

    def stop_in_epoch_2(m):
        steps.append(1)
        if len(steps) > len(train) + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, train, epochs=2, lr=2e-3, checkpoint_dir=tmp_path, on_step=stop_in_epoch_2, progress=False)
    assert (tmp_path / "epoch001.pt").exists() and (tmp_path / "last.pt").exists()
    assert not (tmp_path / "epoch002.pt").exists()
    ckpt = safe_pickle.load(tmp_path / "epoch001.pt")  # a checkpoint is data: a state dict, no trust needed
    assert ckpt["epoch"] == 1 and ckpt["model"].keys() == small.state_dict().keys()
    vitcc.save(small, tmp_path / "small.pt2")  # the compiled structure the weights go into
    saved = load_model(str(tmp_path / "small.pt2"), weights=str(tmp_path / "epoch001.pt"), trust_pickle=True)
    assert torch.equal(saved.head.weight, ckpt["model"]["head.weight"]) and evaluate(saved, val)["n"] == len(val.dataset)
    resumed = copy.deepcopy(small)
    h = finetune(resumed, train, epochs=2, lr=2e-3, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert len(h["loss"]) == 2 and (tmp_path / "epoch002.pt").exists()
    sd, want = resumed.state_dict(), straight.state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in want)  # resuming gives the uninterrupted result


def test_compact_graph_trains_through_aten_ops(digits):
    from torch import nn
    from vitcc.training.finetune import _unused_parameters
    train, _ = digits
    small = vitcc.compile(small_vit(), "magnitude", sparsity=0.5, example_inputs=(torch.randn(1, 3, 8, 8),)).module
    assert not any(n.op == "call_module" for n in small.graph.nodes)  # parameters are get_attr nodes
    x, y = next(iter(train))
    small.train()
    torch.nn.functional.cross_entropy(small(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in small.parameters())
    assert not _unused_parameters(small)  # DDP needs no unused-parameter search on a compact graph
    small.register_parameter("stray", nn.Parameter(torch.zeros(3)))
    assert _unused_parameters(small)


def test_dropout_and_drop_path_are_captured_in_eval_mode():
    """The compact graph's train flags are baked in: fine-tuning it runs without dropout or drop path."""
    import timm
    torch.manual_seed(0)
    eager = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=48,
                              depth=1, num_heads=3, num_classes=10, drop_rate=0.5, proj_drop_rate=0.5,
                              drop_path_rate=0.5)
    x = torch.randn(4, 3, 8, 8)
    small = vitcc.compile(eager, "magnitude", sparsity=0.0, example_inputs=(x[:1],)).module
    drops = [n for n in small.graph.nodes if n.target is torch.ops.aten.dropout.default]
    assert drops and all(n.args[2] is False for n in drops)
    eager.train(), small.train()
    assert not torch.equal(eager(x), eager(x))
    assert torch.equal(small(x), small(x)) and small.training
    eager.eval()
    assert torch.allclose(small(x), eager(x), atol=1e-5)
