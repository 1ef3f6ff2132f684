"""The DDP path: `torchrun --nproc_per_node 2` with gloo on CPU, a tiny model and the digits set.

Checks that every rank ends with the same weights, that training changed them, that each rank read its own
half of the training set, and that the validation counts are summed over ranks.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import torch

import vitcc

# the processes import the vitcc this test imported (a worktree's, not an installed one)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(vitcc.__file__)),
                                      os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    sys.path.insert(0, sys.argv[2])
    from conftest import tiny_vit
    from vitcc.training.data import make_loaders
    from vitcc.training.distributed import is_distributed, rank, world_size
    from vitcc.training.finetune import evaluate, finetune

    out = sys.argv[1]
    train, val = make_loaders("digits", (3, 8, 8), batch_size=32, mean=0.5, std=0.5, distributed=True)
    assert is_distributed() and world_size() == 2
    model = tiny_vit(img_size=8, patch_size=4, seed=rank())  # different inits: DDP broadcasts rank 0's
    start = tiny_vit(img_size=8, patch_size=4, seed=0).state_dict()
    history = finetune(model, train, epochs=1, lr=1e-3, progress=False)
    acc = evaluate(model, val)
    torch.save({"state": model.state_dict(), "start": start}, f"{out}/rank{rank()}.pt")
    seen = sorted(i for batch in [list(train.sampler)] for i in batch)
    with open(f"{out}/rank{rank()}.json", "w") as f:
        json.dump({"history": history, "acc": acc, "seen": seen, "val_local": len(val.sampler)}, f)
''')


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_job.py"
    script.write_text(SCRIPT)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), os.path.dirname(os.path.dirname(__file__))],  # tests/: conftest
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 60
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], ranks[0]["start"]["head.weight"])
    assert info[0]["history"]["loss"] == info[1]["history"]["loss"]  # averaged over ranks
    assert not set(info[0]["seen"]) & set(info[1]["seen"])  # each rank its own half of the train set
    assert abs(len(info[0]["seen"]) - len(info[1]["seen"])) <= 1
    assert info[0]["acc"] == info[1]["acc"] and info[0]["acc"]["n"] == info[0]["val_local"] + info[1]["val_local"]


RECIPE_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    sys.path.insert(0, sys.argv[2])
    from timm.utils import ModelEmaV3
    import vitcc
    from conftest import tiny_vit
    from vitcc.training.data import make_loaders
    from vitcc.training.distributed import rank
    from vitcc.training.finetune import finetune
    from vitcc.training.recipe import Recipe

    out = sys.argv[1]
    recipe = Recipe(aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, warmup_epochs=0.5,
                    ema=0.9, drop_path=0.2)
    train, val = make_loaders("digits", (3, 8, 8), batch_size=64, mean=0.5, std=0.5, distributed=True, recipe=recipe)
    small = vitcc.compile(tiny_vit(img_size=8, patch_size=4), "magnitude", sparsity=0.5,
                          example_inputs=(torch.randn(1, 3, 8, 8),)).module
    start = {k: v.clone() for k, v in small.state_dict().items()}
    ema = ModelEmaV3(small, decay=recipe.ema)
    history = finetune(small, train, epochs=1, lr=1e-3, recipe=recipe, ema=ema, val_loader=val)
    torch.save({"state": small.state_dict(), "ema": ema.module.state_dict(), "start": start}, f"{out}/rank{rank()}.pt")
    with open(f"{out}/rank{rank()}.json", "w") as f:
        json.dump(history, f)
''')


def test_two_gloo_processes_with_the_recipe(tmp_path):
    """DeiT's recipe under DDP on the compact graph: drop-path copy wrapped by DDP, mixup per rank, EMA, the
    progress line from rank 0 only."""
    script = tmp_path / "ddp_recipe.py"
    script.write_text(RECIPE_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), os.path.dirname(os.path.dirname(__file__))],
                          capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    hist = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("state", "ema"):
        a, b = ranks[0][key], ranks[1][key]
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(ranks[0]["state"]["head.weight"], ranks[0]["start"]["head.weight"])
    assert not any("drop_path" in k for k in ranks[0]["state"])  # the model itself has no DropPath
    assert hist[0]["loss"] == hist[1]["loss"] and hist[0]["world_size"] == 2
    assert hist[0]["ema_top1"] == hist[1]["ema_top1"] and len(hist[0]["drop_path_rates"]) == 4
    assert proc.stderr.count("fine-tune epoch 1/1") == 1  # rank 0 prints
