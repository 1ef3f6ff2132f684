"""Where a model comes from: parse a model spec, build the model, load its weights, tell its input shape.

Specs that build a model (and take `--weights FILE`, or name the model of a state-dict file as `--arch`):
`timm:NAME`, `torchvision:NAME`, `hf:DIR` (a `save_pretrained` folder) and `py:MODULE:CALLABLE` /
`py:path/to/file.py:CALLABLE` (the user's own code, imported because the user named it). Files: `.pt2` (an
ExportedProgram), `.pt`/`.pth` (a torch.save'd module, unpickled through an allowlist, or a state dict) and
`.safetensors` (a state dict). Nothing here runs code a file brings with it.
"""
from __future__ import annotations

import difflib, functools, importlib, importlib.util, io, os, sys, warnings, zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.fx as fx

from vitcc.errors import VitccError, first_line
from vitcc.frontend.input_shapes import recorded_meta

__all__ = ["Source", "parse_spec", "build", "load_model"]

FORMS = ("timm:NAME (e.g. timm:deit_tiny_patch16_224), torchvision:NAME, hf:DIR (a save_pretrained folder), "
         "py:MODULE:CALLABLE or py:path/to/file.py:CALLABLE, an ExportedProgram (.pt2), a torch.save'd module "
         "(.pt/.pth), or a state dict (.pt/.pth/.safetensors) together with --arch")
BUILDERS = ("timm", "torchvision", "hf", "py")
NO_TRANSFORMERS = "hf: models need transformers: pip install -e '.[hf]'"


@dataclass(frozen=True)
class Source:
    """A parsed spec: `kind` is one of BUILDERS or "file"; `target` is the name, folder, py target or path."""
    kind: str
    target: str

    def __str__(self) -> str:
        return self.target if self.kind == "file" else f"{self.kind}:{self.target}"


def parse_spec(spec: str) -> Source:
    """Split `kind:target`; anything else is a file path (Windows drive letters never reach here)."""
    kind, sep, target = spec.partition(":")
    if sep and kind in BUILDERS:
        if not target:
            raise VitccError(f"empty model spec {spec!r}: expected {FORMS}")
        return Source(kind, target)
    return Source("file", spec)


# ---------------------------------------------------------------- builders
def build(source: Source) -> torch.nn.Module:
    """The model a builder spec names, with random weights (or the weights an hf: folder holds)."""
    builders = {"timm": _timm_model, "torchvision": _torchvision_model, "hf": _hf_model, "py": _py_model}
    if source.kind not in builders:
        raise VitccError(f"{source} does not name a model to build: expected timm:NAME, torchvision:NAME, hf:DIR "
                         "or py:MODULE:CALLABLE")
    return builders[source.kind](source.target)


def _unknown(kind: str, name: str, known: list[str], listing: str) -> VitccError:
    close = difflib.get_close_matches(name, known, n=5)
    return VitccError(f"unknown {kind} model {name!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                          else f"; see {listing}"))


def _timm_model(name: str) -> torch.nn.Module:
    import timm
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models(), "timm.list_models()")
    return timm.create_model(name, pretrained=False)


def _torchvision_model(name: str) -> torch.nn.Module:
    from torchvision import models
    if name not in models.list_models():
        raise _unknown("torchvision", name, models.list_models(), "torchvision.models.list_models()")
    model = models.get_model(name, weights=None)
    crop = _torchvision_crop(name)
    if crop and not isinstance(getattr(model, "image_size", None), int):
        model.vitcc_input_shape = crop  # e.g. swin_t: only its weights' preprocessing says 224
    return model


def _torchvision_crop(name: str) -> tuple[int, ...] | None:
    """The RGB crop the builder's default weights were trained on (their ImageClassification transform)."""
    from torchvision import models
    try:
        default = models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return None
    t = getattr(default, "transforms", None)
    if not (isinstance(t, functools.partial) and getattr(t.func, "__name__", "") == "ImageClassification"
            and "crop_size" in t.keywords):
        return None
    crop = t.keywords["crop_size"]
    return (1, 3, *((crop, crop) if isinstance(crop, int) else crop))


# hf: a save_pretrained folder, built with the transformers class its config names (never remote code).
def _transformers():
    try:
        import transformers
    except ImportError:
        raise VitccError(NO_TRANSFORMERS) from None
    return transformers


def _hf_config(folder: Path):
    tf = _transformers()
    if not folder.is_dir():
        raise VitccError(f"no such directory: {folder} (hf:DIR names a folder written by save_pretrained)")
    if not (folder / "config.json").is_file():
        raise VitccError(f"{folder} has no config.json: hf:DIR expects a folder written by save_pretrained")
    try:
        return tf.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise VitccError(f"cannot read {folder / 'config.json'}: {first_line(e)}") from None


def _hf_class(config, folder: Path) -> type:
    """config.architectures[0] if it is a transformers class, else what the image-classification/base Auto maps to."""
    tf = _transformers()
    names = getattr(config, "architectures", None) or []
    if names:
        cls = getattr(tf, names[0], None)
        if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel)):
            raise VitccError(f"{folder / 'config.json'} names architecture {names[0]!r}, which is not a transformers "
                             "class; vitcc runs no remote code: load your own model with py:MODULE:CALLABLE")
        return cls
    for auto in (tf.AutoModelForImageClassification, tf.AutoModel):
        if type(config) in auto._model_mapping:
            cls = auto._model_mapping[type(config)]
            return cls[0] if isinstance(cls, (tuple, list)) else cls
    raise VitccError(f"{folder / 'config.json'} names no architecture and transformers maps no model to "
                     f"model_type {config.model_type!r}")


def _hf_model(target: str, with_weights: bool = True) -> torch.nn.Module:
    """SDPA where the class supports it (one fused op with its scale as an argument, exports cleanly), else eager."""
    folder = Path(target)
    config = _hf_config(folder)
    cls = _hf_class(config, folder)
    impl = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    if not with_weights:
        return cls._from_config(config, attn_implementation=impl).float()
    if not any(folder.glob("*.safetensors")):
        raise VitccError(f"{folder} holds no .safetensors weights: write it with save_pretrained (safetensors is its "
                         "default), or pass --weights FILE")
    try:
        model, info = cls.from_pretrained(str(folder), config=config, use_safetensors=True, local_files_only=True,
                                          attn_implementation=impl, output_loading_info=True,
                                          ignore_mismatched_sizes=True)  # reported below, in one line
    except Exception as e:
        raise VitccError(f"cannot load {folder}: {first_line(e)}") from None
    _refuse_misfit(folder, cls.__name__, wrong=[f"{k} is {tuple(a)} in the file, {tuple(b)} in the model"
                                                for k, a, b in sorted(info.get("mismatched_keys", []))],
                   unexpected=sorted(info.get("unexpected_keys", [])), missing=sorted(info.get("missing_keys", [])))
    return model.float()


# py: the user's own code: a class or factory called with no arguments.
def _py_model(target: str) -> torch.nn.Module:
    where, sep, attr = target.rpartition(":")
    label = f"py:{target}"
    if not (sep and where and attr):
        raise VitccError(f"bad spec {label}: expected py:MODULE:CALLABLE or py:path/to/file.py:CALLABLE")
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    module = _import_file(Path(where)) if is_file else _import_module(where)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            raise VitccError(f"{where} has no attribute {part!r}" + (f"; did you mean {', '.join(close)}?"
                                                                     if close else ""))
        obj = getattr(obj, part)
    return _call_factory(obj, label)


def _call_factory(obj, label: str) -> torch.nn.Module:
    if isinstance(obj, torch.nn.Module):
        return obj  # a module instance at module level is fine too
    if not callable(obj):
        raise VitccError(f"{label} is a {type(obj).__name__}, not a class or a function that returns a model")
    try:
        model = obj()
    except Exception as e:
        raise VitccError(f"{label}() raised {type(e).__name__}: {first_line(e)} (it is called with no arguments: "
                         "give them defaults, or name a factory)") from None
    if not isinstance(model, torch.nn.Module):
        raise VitccError(f"{label}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


@contextmanager
def _on_sys_path(folder: str) -> Iterator[None]:
    """Imports next to the user's file (or from the working directory) resolve, as with `python file.py`."""
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _import_module(name: str):
    try:
        with _on_sys_path(os.getcwd()):
            return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise VitccError(f"no module named {e.name!r}: install it, run vitcc from the folder that holds it, "
                             "or name the file: py:path/to/file.py:CALLABLE") from None
        raise VitccError(f"importing {name} failed: {first_line(e)}") from None
    except Exception as e:
        raise VitccError(f"importing {name} failed: {type(e).__name__}: {first_line(e)}") from None


def _import_file(path: Path):
    if path.suffix != ".py" or not path.is_file():
        raise VitccError(f"no such Python file: {path}")
    name = f"vitcc_py_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # what importing does: dataclasses and pickling look classes up here
    try:
        with _on_sys_path(str(path.resolve().parent)):
            spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise VitccError(f"importing {path} failed: {type(e).__name__}: {first_line(e)}") from None
    return module


# ---------------------------------------------------------------- weights
def _cannot_read(path, e: Exception, expected: str = "a torch.save'd module, a state dict (.pt) or a .safetensors "
                                                      "file") -> VitccError:
    return VitccError(f"cannot read {path}: {first_line(e)}; expected {expected}")


def _existing(path) -> Path:
    if not Path(path).is_file():
        raise VitccError(f"no such file: {path}")
    return Path(path)


def _read_state_dict(path) -> dict:
    path = _existing(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            from vitcc.frontend import safe_pickle
            sd = safe_pickle.load(path)  # torch's weights-only loader lets a file ask for bytearray(10**10)
    except Exception as e:
        raise _cannot_read(path, e) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        sd = sd[key] if isinstance(sd, dict) and isinstance(sd.get(key), dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VitccError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
    return sd


def _refuse_misfit(path, arch: str, *, wrong: list[str], unexpected: list[str], missing: list[str]) -> None:
    kinds = {"wrong shape": wrong, "unexpected": [f"unexpected {k}" for k in unexpected],
             "missing": [f"missing {k}" for k in missing]}
    if any(kinds.values()):
        counts = ", ".join(f"{len(v)} {k}" for k, v in kinds.items() if v)
        examples = "; ".join([e for v in kinds.values() for e in v[:2]][:4])
        raise VitccError(f"{path} does not fit {arch} ({counts}): {examples}")


def _load_state(model: torch.nn.Module, sd: dict, path, arch: str) -> None:
    own = model.state_dict()
    _refuse_misfit(path, arch, wrong=[f"{k} is {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
                                      for k, v in sd.items() if k in own and v.shape != own[k].shape],
                   unexpected=[k for k in sd if k not in own], missing=[k for k in own if k not in sd])
    model.load_state_dict(sd, strict=True)


def _built_with_weights(source: Source, weights) -> torch.nn.Module:
    """Random weights replaced by the file's; an hf: folder's own weights are skipped when a file replaces them."""
    model = _hf_model(source.target, with_weights=False) if source.kind == "hf" else build(source)
    _load_state(model, _read_state_dict(weights), weights, str(source))
    return model


# ---------------------------------------------------------------- files
def _pickled_module(path: Path, trust_pickle: bool):
    from vitcc.frontend import safe_pickle
    try:
        obj = safe_pickle.load(path, trust_pickle=trust_pickle)
    except VitccError:
        raise
    except Exception as e:
        raise _cannot_read(path, e) from None
    if isinstance(obj, fx.GraphModule):
        obj.meta.update(recorded_meta(obj))
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, dict):
        raise VitccError(f"{path} holds a state dict: pass --arch timm:NAME (or torchvision:NAME, hf:DIR, "
                         "py:MODULE:CALLABLE) to say which model it belongs to")
    raise VitccError(f"{path} holds a {type(obj).__name__}; expected {FORMS}")


def _refuse_pt2_pickles(path: Path) -> None:
    """torch.export.load unpickles the archive's tensors with weights_only=False: each must pass weights_only first."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                base = name.rsplit("/", 1)[-1]
                if base.startswith(("custom_obj", "opaque_obj")):
                    raise VitccError(f"refusing {path}: it holds a pickled Python object ({name}); rerun with "
                                     "--trust-pickle if you trust this file")
                blob = z.read(name)
                if blob[:4] == b"PK\x03\x04":  # a torch.save'd tensor or sample input
                    try:
                        torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
                    except Exception as e:
                        raise VitccError(f"refusing {path}: {name} is not plain tensor data ({first_line(e)}); "
                                         "rerun with --trust-pickle if you trust this file") from None
    except zipfile.BadZipFile as e:
        raise _cannot_read(path, e, "an ExportedProgram written by torch.export.save") from None


def _exported_program(path: Path, trust_pickle: bool) -> fx.GraphModule:
    """ep.module() refuses .train()/.eval(): hand back a plain GraphModule over the same graph and tensors."""
    if not trust_pickle:
        _refuse_pt2_pickles(path)
    _import_output_classes(path)
    try:
        with warnings.catch_warnings():  # torch 2.11's loader warns about its own read-only byte buffers
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            ep = torch.export.load(str(path))
    except Exception as e:
        raise _cannot_read(path, e, "an ExportedProgram written by torch.export.save") from None
    from vitcc.frontend.capture import unlift
    gm = unlift(ep)
    shape = _exported_shape(ep)
    if shape:
        gm.vitcc_input_shape = shape
    return gm


# packages whose pytree-registered output classes (HF's ModelOutput) a .pt2 may name; registered on import
_OUTPUT_PACKAGES = ("transformers.",)


def _import_output_classes(path: Path) -> None:
    """A program returning an HF ModelOutput names its class in the output spec; pytree can rebuild it only
    once the class's module is imported (transformers imports lazily), so import the modules it names."""
    import json
    import torch.utils._pytree as pytree
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("models/model.json"))
            graph = json.loads(z.read(name))["graph_module"]
        specs = [e["signature"][k] for e in graph["module_call_graph"] if not e["fqn"] and e.get("signature")
                 for k in ("in_spec", "out_spec")]
    except Exception:  # not this layout: torch.export.load reports what is wrong
        return
    registered = {v.serialized_type_name for v in getattr(pytree, "SUPPORTED_SERIALIZED_TYPES", {}).values()}
    for spec in specs:
        for t in _spec_types(json.loads(spec)):
            module = t.rpartition(".")[0]
            if t not in registered and t.startswith(_OUTPUT_PACKAGES) and importlib.util.find_spec(module.split(".")[0]):
                try:
                    importlib.import_module(module)
                except Exception:
                    pass  # torch.export.load names the class it cannot rebuild


def _spec_types(node) -> Iterator[str]:
    """Every type name in a serialized pytree spec ([protocol, {"type", "children_spec"}])."""
    if isinstance(node, list):
        for x in node:
            yield from _spec_types(x)
    elif isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield node["type"]
        yield from _spec_types(node.get("children_spec", []))


def _exported_shape(ep) -> tuple[int, ...] | None:
    """The first user input's shape as exported (its placeholder's example value), batch 1."""
    names = set(ep.graph_signature.user_inputs)
    val = next((n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in names), None)
    dims = list(getattr(val, "shape", ()))[1:]
    if val is None or not all(isinstance(d, int) for d in dims):
        return None
    return (1, *dims)


def _is_program_archive(path: Path) -> bool:
    """torch.export.save's zip (vitcc writes it for `-o x.pt` too) holds an `archive_format` record."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == "archive_format" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_file(path: Path, arch: str | None, trust_pickle: bool) -> torch.nn.Module:
    if path.suffix not in (".pt", ".pth", ".safetensors", ".pt2"):
        hint = "; a folder from save_pretrained is hf:DIR" if path.is_dir() else ""
        raise VitccError(f"unknown model spec {str(path)!r}: expected {FORMS}{hint}")
    _existing(path)
    if path.suffix == ".pt2" or _is_program_archive(path):
        if arch:
            raise VitccError("--arch only applies to a state-dict file; a .pt2 program carries its own model")
        return _exported_program(path, trust_pickle)
    if path.suffix == ".safetensors" or arch:
        if not arch:
            raise VitccError(f"{path} holds a state dict: pass --arch timm:NAME (or torchvision:NAME, hf:DIR, "
                             "py:MODULE:CALLABLE) to say which model it belongs to")
        source = parse_spec(arch)
        if source.kind == "file":
            raise VitccError(f"--arch {arch!r} names no model: expected timm:NAME, torchvision:NAME, hf:DIR or "
                             "py:MODULE:CALLABLE")
        return _built_with_weights(source, path)
    return _pickled_module(path, trust_pickle)


def load_model(spec: str, *, weights: str | None = None, arch: str | None = None,
               trust_pickle: bool = False) -> torch.nn.Module:
    """Load `spec` (see FORMS) in eval mode; never unpickles untrusted globals unless trust_pickle."""
    source = parse_spec(spec)
    if source.kind == "file":
        if weights and (arch or Path(spec).suffix == ".safetensors"):
            raise VitccError("--weights applies to a model spec or a model file; pass a state-dict file as the "
                             "model with --arch")
        model = _load_file(Path(spec), arch, trust_pickle)
        if weights:
            _load_state(model, _read_state_dict(weights), weights, spec)  # e.g. a fine-tuning checkpoint
        return model.eval()
    if arch:
        raise VitccError(f"--arch only applies to a state-dict file; with a {source.kind}: spec use --weights FILE")
    return (_built_with_weights(source, weights) if weights else build(source)).eval()
