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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), os.path.dirname(os.path.dirname(__file__))],  # tests/: conftest
                          capture_output=True, text=True, timeout=120, env=env)
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
