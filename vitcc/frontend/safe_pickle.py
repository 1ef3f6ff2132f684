"""Load a `torch.save`d file as data: no code from the file runs, no constructor gets the file's arguments.

A pickle is a program for a stack machine whose instructions can import and call anything. This loader reads the
zip container itself and runs the pickle on Python's pure-Python unpickler with the calling instructions replaced:

- GLOBAL/STACK_GLOBAL (`find_class`) never hands out a real callable. Tensor-rebuild functions (those torch's
  weights-only loader lists, for which we check every argument) and plain containers become checked wrappers;
  allowlisted classes (nn.Module subclasses of torch/torchvision/timm/vitcc, enums) become inert markers.
- REDUCE/INST/OBJ call only those wrappers. On a class marker they do what protocol 2 does for ordinary
  objects, never `cls(*args)`: NEWOBJ, `copyreg.__newobj__` and `copyreg._reconstructor` give `cls.__new__(cls)`,
  an enum member is looked up by value.
- BUILD sets state on objects this loader created, through `nn.Module.__setstate__` (torch.nn's own overrides)
  or `__dict__.update`; state may not shadow methods or properties, nor carry hooks.
- A pickled fx.GraphModule (its forward is Python source that torch would exec) and TorchScript archives are
  refused with a pointer to `--trust-pickle` and `.pt2`. aten ops that read or write files cannot be reached,
  since nothing from the file is ever called.

Memory is bounded by the file: compressed zip members are refused (torch.save writes stored ones), every storage
must be exactly as large as its record, a tensor may not view more elements than its storage holds, and a stored
input shape must describe a tensor of at most 2**31 elements.
"""
from __future__ import annotations

import _compat_pickle, collections, enum, functools, inspect, io, math, pickle, sys, warnings, zipfile
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

import torch

from vitcc.errors import VitccError

__all__ = ["load"]

_ROOTS = ("torch", "torchvision", "timm", "vitcc")
_DENY = ("torch.hub", "torch.jit", "torch.serialization", "torch.utils", "torch.package", "torch.distributed",
         "torch.multiprocessing", "torch._dynamo", "torch._inductor", "torch.compiler", "torch.export", "torch.onnx",
         "torch.nn.parallel", "torch.fx", "torch._higher_order_ops", "torch._export", "torch.testing")
_GRAPH_MODULE = ("refusing to load {path}: it holds a pickled torch.fx GraphModule (e.g. a .pt written by an older "
                 "vitcc), whose forward is Python source that loading would execute; rerun with --trust-pickle if "
                 "you trust this file, or use a .pt2 program (torch.export.save)")
_TRUST = "rerun with --trust-pickle if you trust this file"


def load(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """The object `torch.save` wrote to `path`, rebuilt as data (or by torch.load when `trust_pickle`)."""
    path = Path(path)
    if trust_pickle:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    else:
        obj = _Archive(path).load()
    _check_input_shape(obj, path)
    return obj


# ---------------------------------------------------------------- the zip container
class _Archive:
    """A torch.save zip archive read with zipfile: stored members only, each bounded by the file's size."""

    def __init__(self, path: Path):
        self.path = path
        if not zipfile.is_zipfile(path):
            raise ValueError("not a zip archive written by torch.save (legacy or foreign format)")
        self.zip = zipfile.ZipFile(path)
        size = path.stat().st_size
        names = self.zip.namelist()
        for info in self.zip.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise VitccError(f"refusing to load {path}: member {info.filename} is compressed (torch.save writes "
                                 f"stored members; a compressed one can inflate far beyond the file); {_TRUST}")
            if info.file_size > size:
                raise VitccError(f"refusing to load {path}: member {info.filename} claims {info.file_size} bytes, "
                                 f"more than the file's {size}")
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise VitccError(f"refusing to load {path}: it is a TorchScript archive (torch.jit.save), which holds "
                             f"code; {_TRUST}")
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError("no data.pkl record: not an archive written by torch.save")
        self.prefix = pkl[0][:-len("data.pkl")]
        order = self.prefix + "byteorder"
        if order in names and self.zip.read(order) != sys.byteorder.encode():
            raise VitccError(f"refusing to load {path}: its tensors are {self.zip.read(order)[:8]!r}-endian")
        self.sizes = {n: self.zip.getinfo(n).file_size for n in names}
        self.storages: dict[str, torch.TypedStorage] = {}

    def load(self) -> Any:
        unpickler = _Unpickler(io.BytesIO(self.zip.read(self.prefix + "data.pkl")), self)
        obj = unpickler.load()
        _refuse_markers(obj, self.path)
        return obj

    def storage(self, saved_id) -> torch.TypedStorage:
        """persistent_load: ('storage', StorageType, key, location, numel), checked against its record."""
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] in ("storage", b"storage")):
            raise VitccError(f"refusing to load {self.path}: unknown persistent id {str(saved_id)[:60]}")
        _, stype, key, _location, numel = saved_id
        if not (isinstance(stype, _StorageType) and type(key) is str and type(numel) is int and numel >= 0):
            raise VitccError(f"refusing to load {self.path}: malformed storage reference {str(saved_id)[:60]}")
        if key in self.storages:
            return self.storages[key]
        name = f"{self.prefix}data/{key}"
        nbytes = numel * stype.dtype.itemsize
        if self.sizes.get(name) != nbytes:
            raise VitccError(f"refusing to load {self.path}: storage {key} declares {nbytes} bytes but its record "
                             f"holds {self.sizes.get(name, 'none')}")
        raw = torch.frombuffer(bytearray(self.zip.read(name)), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        typed = torch.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=stype.dtype, _internal=True)
        self.storages[key] = typed
        return typed


def _is_storage_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, torch.storage.TypedStorage) and obj is not torch.TypedStorage


class _StorageType:
    """What a `torch.FloatStorage`-style global stands for in a storage reference: its dtype."""

    def __init__(self, name: str):
        with warnings.catch_warnings():  # the legacy storage classes warn on use
            warnings.simplefilter("ignore")
            self.dtype = getattr(torch, name).dtype


# ---------------------------------------------------------------- what find_class hands out
class _Class:
    """An allowlisted class as the pickle names it: usable only as the target of an object rebuild."""

    def __init__(self, cls: type):
        self.cls = cls


class _Call:
    """A function the pickle may call, with a check of its arguments before the real call."""

    def __init__(self, name: str, fn: Callable, check: Callable[[tuple], bool]):
        self.name, self.fn, self.check = name, fn, check

    def __call__(self, loader: "_Unpickler", args: tuple):
        if not (isinstance(args, tuple) and self.check(args)):
            raise VitccError(f"refusing to load {loader.path}: {self.name} with arguments "
                             f"{_short(args)}; {_TRUST}")
        return self.fn(*args)


_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def _plain(v, depth: int = 3) -> bool:
    """Constants and (shallow) tuples/lists/dicts of them: data that calls nothing."""
    if isinstance(v, _PLAIN) or isinstance(v, (torch.dtype, torch.device, torch.Size)):
        return True
    if depth and isinstance(v, (tuple, list)):
        return all(_plain(x, depth - 1) for x in v)
    if depth and type(v) in (dict, collections.OrderedDict):
        return all(_plain(k, 0) and _plain(x, depth - 1) for k, x in v.items())
    return False


def _ints(v) -> bool:
    return isinstance(v, (tuple, list, torch.Size)) and len(v) <= 64 and all(type(d) is int and d >= 0 for d in v)


def _no_hooks(h) -> bool:
    return h is None or (isinstance(h, dict) and not h)


def _tensor_args(args: tuple) -> bool:
    """(storage, offset, size, stride, requires_grad, hooks[, metadata]): a view inside the storage."""
    if len(args) not in (6, 7) or not isinstance(args[0], torch.TypedStorage):
        return False
    storage, offset, size, stride, grad, hooks, *meta = args
    if not (type(offset) is int and offset >= 0 and _ints(size) and _ints(stride) and len(size) == len(stride)
            and type(grad) is bool and _no_hooks(hooks)):
        return False
    if meta and meta[0] and not (type(meta[0]) is dict and all(type(v) is bool for v in meta[0].values())):
        return False
    numel, extent = math.prod(size), offset + sum((s - 1) * st for s, st in zip(size, stride) if s)
    return numel == 0 or (numel <= storage.size() and extent < storage.size())


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return torch._utils._rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), requires_grad,
                                           collections.OrderedDict(), metadata or None)


def _param_args(args: tuple) -> bool:
    return (len(args) in (3, 4) and type(args[0]) is torch.Tensor and type(args[1]) is bool and _no_hooks(args[2])
            and (len(args) == 3 or _empty_state(args[3])))


def _empty_state(state) -> bool:
    return not state or (isinstance(state, tuple) and len(state) == 2 and not state[0] and not state[1])


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return torch.nn.Parameter(data, requires_grad)


def _from_type_args(args: tuple) -> bool:
    """_rebuild_from_type_v2(func, type, args, state): a checked rebuild, into Tensor or Parameter, no state."""
    return (len(args) == 4 and isinstance(args[0], _Call) and args[0].name in _TENSOR_FNS
            and isinstance(args[1], _Class) and args[1].cls in (torch.Tensor, torch.nn.Parameter)
            and isinstance(args[2], tuple) and _empty_state(args[3]))


def _from_type(call: _Call, new_type: _Class, args: tuple, state):
    if not call.check(args):
        raise VitccError(f"refusing {call.name} with arguments {_short(args)}")
    t = call.fn(*args)
    return t if new_type.cls is torch.Tensor else torch.nn.Parameter(t, t.requires_grad)


# Tensor rebuilds we check argument by argument; only those torch's weights-only loader also allows are enabled.
_TENSOR_FNS: dict[str, tuple[Callable, Callable]] = {
    "torch._utils._rebuild_tensor_v2": (_rebuild_tensor_v2, _tensor_args),
    "torch._utils._rebuild_parameter": (_rebuild_parameter, _param_args),
    "torch._utils._rebuild_parameter_with_state": (_rebuild_parameter, _param_args),
}
try:  # private API; without it we keep our own (smaller) list
    from torch._weights_only_unpickler import _tensor_rebuild_functions
    _TORCH_LIST = {f"{f.__module__}.{f.__name__}" for f in _tensor_rebuild_functions()}
    _TENSOR_FNS = {k: v for k, v in _TENSOR_FNS.items() if k in _TORCH_LIST}
except Exception:  # pragma: no cover
    pass


def _partial_args(args: tuple) -> bool:
    """torchvision keeps `norm_layer = partial(nn.LayerNorm, eps=1e-6)`: a torch.nn norm/activation class only."""
    return (len(args) == 1 and isinstance(args[0], _Class) and args[0].cls.__module__ in _PARTIAL_MODULES)


_PARTIAL_MODULES = {"torch.nn.modules.normalization", "torch.nn.modules.batchnorm", "torch.nn.modules.activation"}


def _partial(cls: _Class) -> functools.partial:
    return functools.partial(cls.cls)


def _partial_state(inst: functools.partial, state, path) -> None:
    """BUILD of a rebuilt partial: the same class, no positional arguments, plain keyword arguments."""
    func, args, kwds, namespace = state if isinstance(state, tuple) and len(state) == 4 else (None,) * 4
    if not (isinstance(func, _Class) and func.cls is inst.func and args == () and not namespace
            and (kwds is None or (type(kwds) is dict and _plain(kwds)))):
        raise VitccError(f"refusing to load {path}: a functools.partial with state {_short(state)}; {_TRUST}")
    inst.__setstate__((inst.func, (), kwds or {}, None))


def _str_args(args: tuple) -> bool:
    return len(args) in (1, 2) and all(type(a) is str for a in args)


def _bytearray_args(args: tuple) -> bool:
    """bytearray(b'...') or bytearray('...', 'latin-1'), never bytearray(n): its size comes from the file's bytes."""
    return (len(args) == 1 and type(args[0]) is bytes) or (len(args) == 2 and _str_args(args))


def _items_args(args: tuple) -> bool:
    return len(args) <= 1 and all(type(a) in (list, tuple, set, frozenset, dict) for a in args)


def _device_args(args: tuple) -> bool:
    return (len(args) in (1, 2) and type(args[0]) is str and len(args[0]) < 32
            and (len(args) == 1 or type(args[1]) in (int, type(None))))


def _device(kind: str, index=None) -> torch.device:
    return torch.device(kind) if index is None else torch.device(kind, index)


def _numbers(n: int) -> Callable[[tuple], bool]:
    return lambda args: len(args) <= n and all(type(a) in (int, float, type(None)) for a in args)


def _newobj_args(args: tuple) -> bool:
    return len(args) >= 1 and isinstance(args[0], _Class) and args[1:] in ((), ((),), ((), {}))


def _reconstructor_args(args: tuple) -> bool:
    return len(args) == 3 and isinstance(args[0], _Class) and args[1] is object and args[2] is None


def _new(cls: _Class, *_empty):
    return _instance(cls.cls)


_CALLS: dict[str, tuple[Callable, Callable]] = {
    **_TENSOR_FNS,
    "torch._tensor._rebuild_from_type_v2": (_from_type, _from_type_args),
    "collections.OrderedDict": (collections.OrderedDict, _items_args),
    "builtins.set": (set, _items_args),
    "builtins.frozenset": (frozenset, _items_args),
    "builtins.bytearray": (bytearray, _bytearray_args),
    "_codecs.encode": (lambda s, enc="utf-8": s.encode(enc), lambda a: _str_args(a) and a[1:] in ((), ("latin1",), ("latin-1",))),
    "builtins.slice": (slice, _numbers(3)),
    "builtins.complex": (complex, _numbers(2)),
    "torch.Size": (torch.Size, lambda a: len(a) == 1 and _ints(a[0])),
    "torch.device": (_device, _device_args),
    "functools.partial": (_partial, _partial_args),
    "copyreg.__newobj__": (_new, _newobj_args),
    "copyreg.__newobj_ex__": (_new, _newobj_args),
    "copyreg._reconstructor": (_new, _reconstructor_args),
}
_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)


def _instance(cls: type):
    """Protocol 2's rebuild of an ordinary object: `cls.__new__(cls)`, state comes later through BUILD."""
    if cls.__new__ is not object.__new__ and not issubclass(cls, torch.nn.Module):
        raise VitccError(f"refusing to rebuild {_qualname(cls)}: it has its own __new__")
    return object.__new__(cls)


def _ok_module(name: str) -> bool:
    return (name.split(".")[0] in _ROOTS
            and not any(name == d or name.startswith(d + ".") for d in _DENY))


def _allowed_class(obj) -> bool:
    """nn.Module subclasses and enums of torch/torchvision/timm/vitcc (GraphModules and ScriptModules excluded)."""
    return (isinstance(obj, type) and _ok_module(obj.__module__)
            and (issubclass(obj, torch.nn.Module) or issubclass(obj, enum.Enum)))


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _short(v) -> str:
    """One short line naming a value from the file (storages and tensors by size, never their data)."""
    if isinstance(v, (tuple, list)):
        s = f"({', '.join(_short(x) for x in v[:4])}{', ...' if len(v) > 4 else ''})"
    elif isinstance(v, (torch.TypedStorage, torch.Tensor)):
        s = f"<{type(v).__name__} of {v.size() if isinstance(v, torch.TypedStorage) else tuple(v.shape)}>"
    elif isinstance(v, _Class):
        s = _qualname(v.cls)
    else:
        s = repr(v)
    s = " ".join(s.split())
    return s if len(s) <= 60 else s[:57] + "..."


# ---------------------------------------------------------------- the unpickler
class _Unpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with every instruction that calls or builds replaced by a checked one."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, archive: _Archive):
        super().__init__(file, encoding="utf-8")
        self.archive, self.path = archive, archive.path
        self.created: set[int] = set()  # ids of objects rebuilt here: the only ones BUILD may give state

    def persistent_load(self, pid):
        return self.archive.storage(pid)

    def find_class(self, module: str, name: str):
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in _CALLS:
            return _Call(full, *_CALLS[full])
        if module == "torch" and _is_storage_class(getattr(torch, name, None)):
            return _StorageType(name)
        if module.split(".")[:2] == ["torch", "fx"]:
            raise VitccError(_GRAPH_MODULE.format(path=self.path))
        obj = _lookup(module, name) if _ok_module(module) and name.isidentifier() else None
        if full in ("torch._tensor.Tensor", "torch.Tensor", "torch.nn.parameter.Parameter") or _allowed_class(obj):
            return _Class(obj)
        if isinstance(obj, _CONSTANTS):
            return obj
        raise VitccError(f"refusing to unpickle {full} from {self.path}: it is not a torch/torchvision/timm/vitcc "
                         f"module class or tensor data; {_TRUST}")

    def _call(self, target, args):
        """REDUCE/INST/OBJ: a checked wrapper, or an enum lookup; a class is never called."""
        if isinstance(target, _Call):
            out = target(self, args)
        elif isinstance(target, _Class) and issubclass(target.cls, enum.Enum) and len(args) == 1:
            out = _enum_member(target.cls, args[0], self.path)
        else:
            what = _qualname(target.cls) if isinstance(target, _Class) else type(target).__name__
            raise VitccError(f"refusing to load {self.path}: it calls {what} with arguments from the file (objects "
                             f"are only rebuilt as data); {_TRUST}")
        self.created.add(id(out))
        return out

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1)
        self.append(self._call(klass, tuple(args)))

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._newobj(cls, args, {}))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._newobj(cls, args, kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _newobj(self, cls, args, kwargs):
        if not isinstance(cls, _Class) or args or kwargs:
            raise VitccError(f"refusing to load {self.path}: NEWOBJ of {_short(cls)} with arguments "
                             f"{_short(args)}; {_TRUST}")
        obj = _instance(cls.cls)
        self.created.add(id(obj))
        return obj

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is functools.partial and id(inst) in self.created:
            return _partial_state(inst, state, self.path)
        if id(inst) not in self.created or isinstance(inst, (enum.Enum, torch.Tensor)) or not hasattr(inst, "__dict__"):
            raise VitccError(f"refusing to load {self.path}: it sets state on a {type(inst).__name__}; {_TRUST}")
        if isinstance(state, tuple) and len(state) == 2 and not state[1]:
            state = state[0]
        if type(state) not in (dict, collections.OrderedDict):
            raise VitccError(f"refusing to load {self.path}: state {_short(state)} for {_qualname(type(inst))}")
        _check_state(type(inst), state, self.path)
        _setstate(inst, state)
    dispatch[pickle.BUILD[0]] = load_build


def _lookup(module: str, name: str):
    try:
        return getattr(import_module(module), name, None)
    except ImportError:
        return None


def _enum_member(cls: type, value, path) -> enum.Enum:
    """`Cls(value)` of an enum without running its code: look the member up."""
    for member in cls:
        if type(member.value) is type(value) and member.value == value:
            return member
    raise VitccError(f"refusing to load {path}: {value!r} is not a member of {_qualname(cls)}")


def _check_state(cls: type, state: dict, path) -> None:
    """Instance state is data: no dunder keys, nothing that shadows a method or property, no hooks."""
    for k, v in state.items():
        bad = None
        if type(k) is not str or k.startswith("__"):
            bad = f"key {_short(k)}"
        elif hasattr(type(inspect.getattr_static(cls, k, None)), "__get__") or callable(inspect.getattr_static(cls, k, None)):
            bad = f"{k!r}, which would replace a method or property"
        elif "hooks" in k and isinstance(v, dict) and any(callable(h) for h in v.values()):
            bad = f"hooks in {k!r}"
        if bad:
            raise VitccError(f"refusing to load {path}: state of {_qualname(cls)} sets {bad}; {_TRUST}")


def _setstate(inst, state: dict) -> None:
    """torch.nn's own __setstate__ (nn.Module fills defaults for old pickles), else a plain __dict__ update."""
    if isinstance(inst, torch.nn.Module):
        setstate = getattr(type(inst), "__setstate__")
        if not getattr(setstate, "__module__", "").startswith("torch.nn."):
            setstate = torch.nn.Module.__setstate__
        setstate(inst, state)
    else:
        inst.__dict__.update(state)


def _refuse_markers(obj, path) -> None:
    """A class reference left as a value (a hook, a `forward` override, ...) could be called later: refuse it."""
    seen, todo = set(), [obj]
    while todo:
        v = todo.pop()
        if id(v) in seen or isinstance(v, (torch.Tensor, *_PLAIN)):
            continue
        seen.add(id(v))
        if isinstance(v, (_Class, _Call, _StorageType)):
            name = _qualname(v.cls) if isinstance(v, _Class) else getattr(v, "name", "a storage type")
            raise VitccError(f"refusing to load {path}: it holds a reference to {name} as a value; {_TRUST}")
        if isinstance(v, dict):
            todo += [*v.keys(), *v.values()]
        elif isinstance(v, (list, tuple, set, frozenset)):
            todo += list(v)
        elif hasattr(v, "__dict__") and not isinstance(v, (type, enum.Enum)):
            todo += list(vars(v).values())


# ---------------------------------------------------------------- stored input shapes
def _check_input_shape(obj, path) -> None:
    """The input shape a model stores (vitcc_input_shape, meta, timm cfg) must describe a sane tensor."""
    if not isinstance(obj, torch.nn.Module):
        return
    from vitcc.frontend.input_shapes import MAX_INPUT_ELEMENTS, stored_input_shape
    try:
        shape = stored_input_shape(obj)
    except VitccError:
        return  # none stored: the user is asked for --input-shape later
    except (TypeError, ValueError, OverflowError):
        raise VitccError(f"refusing to load {path}: its stored input shape is not a list of integers") from None
    if not 1 <= len(shape) <= 8 or any(d <= 0 for d in shape) or math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise VitccError(f"refusing to load {path}: its stored input shape {_short(shape)} is absurd (at most 8 "
                         f"positive sizes and {MAX_INPUT_ELEMENTS:,} elements)")
