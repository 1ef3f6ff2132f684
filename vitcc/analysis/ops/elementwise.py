"""Elementwise ops: broadcasting ties same-size axes; size-1 axes tie nothing. Timed as one kernel each."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from vitcc.analysis.ops.table import Family

aten = torch.ops.aten
family = Family("elementwise")

_NAMES = ["abs", "neg", "exp", "log", "sqrt", "rsqrt", "erf", "sin", "cos", "sign", "reciprocal", "square",
          "gelu", "relu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "mish", "elu",
          "leaky_relu", "softplus", "clamp", "clamp_min", "clamp_max", "clone", "contiguous", "alias", "detach",
          "lift_fresh_copy", "_to_copy", "to", "dropout", "zeros_like", "ones_like", "full_like", "empty_like",
          "rand_like", "randn_like", "fill", "zero", "floor", "ceil", "round", "logical_not", "bitwise_not",
          "add", "sub", "rsub", "mul", "div", "pow", "maximum", "minimum", "where", "masked_fill", "lerp", "copy",
          "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "bitwise_and", "bitwise_or",
          "remainder", "fmod", "atan2", "addcmul", "addcdiv", "nan_to_num", "erfinv", "log1p", "expm1", "silu_",
          "gelu_", "relu_", "sigmoid_", "tanh_", "add_", "sub_", "mul_", "div_", "clamp_", "copy_", "fill_",
          "zero_", "masked_fill_", "hardswish_", "hardtanh_", "hardsigmoid_", "mish_", "elu_", "leaky_relu_",
          "pow_", "neg_", "exp_", "sqrt_", "rsqrt_", "abs_", "float_power", "dropout_"]
PACKETS = [getattr(aten, n) for n in _NAMES if hasattr(aten, n)]


@family.coupling(*PACKETS)
def broadcast(a, node: fx.Node) -> Any:
    """Every tensor operand takes part in the broadcast (pow.Scalar's tensor is its second argument)."""
    ts = [a.type_of(x) for x in node.args if isinstance(x, fx.Node)]
    ts += [a.type_of(v) for v in node.kwargs.values() if isinstance(v, fx.Node)]
    return a.broadcast(ts)


@family.coupling(aten.type_as, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty)
def like_first(a, node: fx.Node) -> Any:
    """type_as takes only a dtype from its second operand; new_* make fresh tensors of fixed size."""
    x = a.type_of(node.args[0])
    if node.target.overloadpacket is aten.type_as:
        return x
    return a.out_type()
