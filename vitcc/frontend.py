"""Model frontend: where a model comes from (vitcc.sources, loaded safely) and how it is captured (vitcc.capture)."""
from __future__ import annotations

import torch
import torch.fx as fx

from vitcc import sources

__all__ = ["load_model", "input_shape_for", "trace"]

load_model, input_shape_for, stored_input_shape = sources.load_model, sources.input_shape_for, sources.stored_input_shape
MAX_INPUT_ELEMENTS = sources.MAX_INPUT_ELEMENTS
_vitcc_meta = sources.recorded_meta


def trace(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Capture `model` with torch.export (see vitcc.capture)."""
    from .capture import capture
    return capture(model, example_inputs)
