"""`vitcc evaluate MODEL --data SPEC`: top-1/top-5 accuracy on the validation split."""
from __future__ import annotations

import json
from typing import Optional

import torch
import typer
from rich.console import Console

from vitcc.cli.app import ARCH_HELP, MODEL_HELP, WEIGHTS_HELP, _floats, _load, app
from vitcc.devices import DEVICE_HELP, memory_hint, resolve_device
from vitcc.errors import VitccError


@app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option(..., "--data", help="image folder with train/ and val/, or mnist5k or digits"),
    batch_size: int = typer.Option(64, "--batch-size"),
    mean: Optional[str] = typer.Option(None, "--mean", help="normalisation mean, e.g. 0.5,0.5,0.5 (default: the model's)"),
    std: Optional[str] = typer.Option(None, "--std", help="normalisation std (default: the model's)"),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="e.g. 1,3,224,224"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
    seed: int = typer.Option(0, "--seed", help="seeds a timm: model's random init"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Print MODEL's top-1 and top-5 accuracy on the validation split of --data."""
    dev = resolve_device(device)
    with memory_hint("--batch-size"):
        _evaluate(model, data, batch_size, mean, std, weights, arch, input_shape, trust_pickle, seed, as_json, dev)


def _evaluate(model, data, batch_size, mean, std, weights, arch, input_shape, trust_pickle, seed, as_json, device):
    from vitcc.training.data import data_classes, make_loaders, normalization_for
    from vitcc.training.distributed import init_distributed, is_main
    from vitcc.training.finetune import evaluate
    from vitcc.training.surgery import output_classes
    dev = device
    init_distributed(device=dev)  # under torchrun the validation set is sharded and the counts summed
    torch.manual_seed(seed)
    m, example = _load(model, weights, arch, trust_pickle, input_shape, device)
    model_mean, model_std = normalization_for(m)
    mean_v, std_v = _floats(mean, "--mean"), _floats(std, "--std")
    _, val = make_loaders(data, tuple(example[0].shape[1:]), batch_size=batch_size,
                          mean=model_mean if mean_v is None else mean_v, std=model_std if std_v is None else std_v,
                          distributed=True, pin_memory=dev.type == "cuda")
    if len(val.dataset) == 0:
        raise VitccError(f"the validation split of {data} is empty")
    have, outputs = data_classes(val), output_classes(m, example[0])
    if have is not None and outputs is not None and have != outputs:
        raise VitccError(f"the data has {have} classes but {model} has {outputs} outputs; evaluate a model trained "
                         f"for this data (vitcc compile --num-classes {have} --finetune-epochs N puts a new "
                         "classifier on a compact model)")
    acc = evaluate(m.to(dev), val)
    if not is_main():
        return
    if as_json:
        print(json.dumps(acc))
        return
    Console().print(f"{model} on {data}: top-1 {acc['top1']:.2%}, top-5 {acc['top5']:.2%} ({acc['n']:,} images)",
                    highlight=False)
