"""Hostile `.pt` files, built as an attacker would (pickle opcodes by hand, `__reduce__` tricks, forged zips), fed
to `vitcc inspect`, `vitcc compile` and `vitcc.load`. Each must end in a one-line error with exit 2 and leave no
trace: no file written, the canary FIFO never opened for reading, no process started, no code compiled or exec'd,
and a bounded peak of Python memory (a fresh process bounds the rest of the memory class)."""
from __future__ import annotations

import os, pickle, subprocess, sys, threading, time, tracemalloc, zipfile
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torchvision

import vitcc
from vitcc.frontend import safe_pickle
from vitcc.cli import run
from vitcc.errors import VitccError

from conftest import tiny_vit

SHAPE = ["--input-shape", "1,3,32,32"]
PEAK_LIMIT = 200 * 2 ** 20


# ---------------------------------------------------------------- watching for side effects
_EVENTS: list = []
_WATCH: dict = {}  # while armed: "dir" (the canary folder), "poller" (the FIFO watcher's thread id)
_PROCESS_EVENTS = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.popen")


def _audit(event: str, args) -> None:
    where = _WATCH.get("dir")
    if where is None or threading.get_ident() == _WATCH.get("poller"):
        return
    if event in _PROCESS_EVENTS or event == "open" and args and where in str(args[0]):
        _EVENTS.append(f"{event} {str(args)[:80]}")
    elif event in ("exec", "compile") and args and _mentions(args[0], where):
        _EVENTS.append(f"{event} of code naming the canary")


def _mentions(code, where: str) -> bool:
    """Source text or a code object that names the canary folder: a payload's code, compiled or run."""
    consts = getattr(code, "co_consts", None)
    text = " ".join(map(str, consts)) if consts is not None else str(code)
    return where in text or "eval_with_key" in str(getattr(code, "co_filename", ""))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while a Canary is watching


class Canary:
    """A folder the payloads aim at: `marker` must never appear, `secret` is a FIFO whose opening is detected."""

    def __init__(self, root: Path):
        self.dir = root / "canary"
        self.dir.mkdir()
        self.marker, self.secret = self.dir / "pwned", self.dir / "secret"
        os.mkfifo(self.secret)
        self.reads: list[str] = []

    @contextmanager
    def watching(self):
        stop = threading.Event()

        def poll():  # a writer can open a FIFO only while someone has it open for reading
            while not stop.is_set():
                try:
                    fd = os.open(self.secret, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    time.sleep(0.002)
                    continue
                self.reads.append("secret opened for reading")
                try:
                    os.write(fd, b"\0" * 64)
                except BrokenPipeError:  # the reader is gone already: its opening is what counted
                    pass
                finally:
                    os.close(fd)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        _EVENTS.clear()
        tracemalloc.start()
        _WATCH.update(dir=str(self.dir), poller=t.ident)
        try:
            yield
        finally:
            _WATCH.clear()
            self.peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            stop.set()
            t.join()

    def assert_untouched(self):
        assert not self.marker.exists(), "the payload created a file"
        assert sorted(p.name for p in self.dir.iterdir()) == ["secret"], "the payload wrote into the canary folder"
        assert not self.reads, self.reads
        assert not _EVENTS, f"side effects: {_EVENTS}"
        assert self.peak < PEAK_LIMIT, f"peak Python memory {self.peak / 2**20:.0f} MB"


@pytest.fixture
def canary(tmp_path):
    return Canary(tmp_path)


# ---------------------------------------------------------------- building pickles by hand
class Ops(bytes):
    """Raw pickle opcodes, spliced in as they are."""


def enc(v, proto: int) -> bytes:
    """Opcodes pushing a plain value (ints, strings, bytes, None, bools, tuples, lists, dicts, Ops)."""
    if isinstance(v, Ops):
        return bytes(v)
    if v is None or isinstance(v, bool):
        return {None: pickle.NONE, True: pickle.NEWTRUE, False: pickle.NEWFALSE}[v]
    if isinstance(v, int):
        return (pickle.BININT + v.to_bytes(4, "little", signed=True) if -2**31 <= v < 2**31
                else pickle.LONG1 + bytes([len(b := v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True))]) + b)
    if isinstance(v, str):
        b = v.encode()
        return pickle.BINUNICODE + len(b).to_bytes(4, "little") + b
    if isinstance(v, bytes):
        return (pickle.BINBYTES + len(v).to_bytes(4, "little") + v if proto >= 3
                else call(glob("_codecs", "encode", proto), v.decode("latin1"), "latin1", proto=proto))
    if isinstance(v, tuple):
        return pickle.MARK + b"".join(enc(x, proto) for x in v) + pickle.TUPLE
    if isinstance(v, list):
        return pickle.EMPTY_LIST + pickle.MARK + b"".join(enc(x, proto) for x in v) + pickle.APPENDS
    if isinstance(v, dict):
        return pickle.EMPTY_DICT + pickle.MARK + b"".join(enc(k, proto) + enc(x, proto) for k, x in v.items()) + pickle.SETITEMS
    raise TypeError(v)


def glob(module: str, name: str, proto: int) -> Ops:
    if proto >= 4:
        return Ops(enc(module, proto) + enc(name, proto) + pickle.STACK_GLOBAL)
    return Ops(pickle.GLOBAL + f"{module}\n{name}\n".encode())


def call(fn: bytes, *args, proto: int) -> Ops:
    """REDUCE: fn(*args)."""
    return Ops(bytes(fn) + enc(tuple(args), proto) + pickle.REDUCE)


def newobj(cls: bytes, *args, proto: int) -> Ops:
    return Ops(bytes(cls) + enc(tuple(args), proto) + pickle.NEWOBJ)


def build(obj: bytes, state, proto: int) -> Ops:
    return Ops(bytes(obj) + enc(state, proto) + pickle.BUILD)


def program(body: bytes, proto: int) -> bytes:
    return pickle.PROTO + bytes([proto]) + bytes(body) + pickle.STOP


def archive(path: Path, pkl: bytes, records: dict | None = None, compress: bool = False) -> Path:
    """A torch.save-shaped zip: archive/data.pkl, archive/byteorder, archive/data/<key>."""
    kind = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", kind) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", sys.byteorder)
        z.writestr("archive/version", "3\n")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def storage(key: str, numel: int, proto: int, dtype: str = "FloatStorage") -> Ops:
    """A persistent reference to storage `key` of `numel` elements (what torch.save writes)."""
    return Ops(enc(("storage", glob("torch", dtype, proto), key, "cpu", numel), proto) + pickle.BINPERSID)


def tensor(key: str, numel: int, size: tuple, stride: tuple, proto: int) -> Ops:
    return call(glob("torch._utils", "_rebuild_tensor_v2", proto), storage(key, numel, proto), 0, size, stride, False,
                call(glob("collections", "OrderedDict", proto), proto=proto), proto=proto)


class Reduces:
    """`__reduce__` trick: pickles as fn(*args), whatever fn is."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# ---------------------------------------------------------------- the payloads: name -> (canary, proto, tmp) -> file
def graph_module_code(c, proto, tmp):
    """Class 1: a GraphModule whose forward source runs os.system (torch would exec it while loading)."""
    code = f"def forward(self, x):\n    return x\nimport os\nos.system('touch {c.marker}')\n"
    return _saved(tmp, Reduces(fx.graph_module.reduce_graph_module, {"_code": code}, "import torch\n"), proto)


def graph_module_escape(c, proto, tmp):
    """Class 1: no import in sight; reaches os through a real object's globals, as the review did."""
    code = (f"def forward(self, x):\n    x.__class__.__init__.__globals__['os'].system('touch {c.marker}')\n"
            "    return x\n")
    return _saved(tmp, Reduces(fx.graph_module.reduce_graph_module, {"_code": code}, ""), proto)


def graph_module_real(c, proto, tmp):
    """Class 1: a genuine traced GraphModule, torch.save'd (what an older vitcc wrote)."""
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    return _saved(tmp, gm, proto)


def graph_module_package(c, proto, tmp):
    return archive(tmp / "evil.pt", program(call(glob("torch.fx.graph_module", "reduce_package_graph_module", proto),
                                                 "importer", {"_code": "def forward(self):\n    pass\n"}, proto=proto), proto))


def aten_from_file(c, proto, tmp):
    """Class 2: torch.from_file (aten::from_file) reading the secret."""
    return archive(tmp / "evil.pt", program(call(glob("torch", "from_file", proto), str(c.secret), False, 16,
                                                 proto=proto), proto))


def aten_ops_namespace(c, proto, tmp):
    """Class 2: the aten op itself, by its dotted name and through getattr on torch.ops."""
    get = glob("builtins", "getattr", proto)
    ops = call(get, call(get, glob("torch", "ops", proto), "aten", proto=proto), "from_file", proto=proto)
    return archive(tmp / "evil.pt", program(call(ops, str(c.secret), False, 16, proto=proto), proto))


def aten_in_graph(c, proto, tmp):
    """Class 2: a GraphModule whose code calls torch.ops.aten.from_file."""
    code = f"def forward(self, x):\n    return torch.ops.aten.from_file('{c.secret}', False, 16)\n"
    return _saved(tmp, Reduces(fx.graph_module.reduce_graph_module, {"_code": code}, "import torch\n"), proto)


def torch_load_save(c, proto, tmp):
    """Class 2: torch.load of the secret inside torch.save to the marker."""
    inner = call(glob("torch", "load", proto), str(c.secret), proto=proto)
    return archive(tmp / "evil.pt", program(call(glob("torch", "save", proto), inner, str(c.marker), proto=proto), proto))


def os_system(c, proto, tmp):
    """Class 3: the classic."""
    return _saved(tmp, {"model": Reduces(os.system, f"touch {c.marker}")}, proto)


def subprocess_reduce(c, proto, tmp):
    return _saved(tmp, Reduces(subprocess.call, ["touch", str(c.marker)]), proto)


def eval_exec_getattr(c, proto, tmp):
    """Class 3: builtins.eval, and getattr(__import__('os'), 'system') chains."""
    get, imp = glob("builtins", "getattr", proto), glob("builtins", "__import__", proto)
    system = call(get, call(imp, "os", proto=proto), "system", proto=proto)
    body = enc([call(glob("builtins", "eval", proto), f"__import__('os').system('touch {c.marker}')", proto=proto),
                call(glob("builtins", "exec", proto), f"open('{c.marker}', 'w')", proto=proto),
                call(system, f"touch {c.marker}", proto=proto)], proto)
    return archive(tmp / "evil.pt", program(body, proto))


def module_constructor(c, proto, tmp):
    """Class 3: REDUCE on allowed nn.Module classes, i.e. their constructors with the file's arguments."""
    body = enc([call(glob("torch.nn.modules.linear", "Linear", proto), 10 ** 5, 10 ** 5, proto=proto),
                call(glob("timm.models.vision_transformer", "VisionTransformer", proto), 10 ** 5, proto=proto)], proto)
    return archive(tmp / "evil.pt", program(body, proto))


def module_newobj_args(c, proto, tmp):
    """Class 3: NEWOBJ with arguments, and copyreg.__newobj__ / _reconstructor with a real base."""
    lin = glob("torch.nn.modules.linear", "Linear", proto)
    body = enc([newobj(lin, 10 ** 5, 10 ** 5, proto=proto),
                call(glob("copyreg", "__newobj__", proto), lin, 10 ** 5, 10 ** 5, proto=proto),
                call(glob("copyreg", "_reconstructor", proto), lin, lin, (10 ** 5, 10 ** 5), proto=proto)], proto)
    return archive(tmp / "evil.pt", program(body, proto))


def inst_opcode(c, proto, tmp):
    """Class 3: protocol 0/1's INST and OBJ, which call the class with the marked arguments."""
    inst = pickle.MARK + enc(f"touch {c.marker}", 2) + pickle.INST + b"os\nsystem\n"
    obj = pickle.MARK + glob("torch.nn.modules.linear", "Linear", 2) + enc(10 ** 5, 2) + enc(10 ** 5, 2) + pickle.OBJ
    return archive(tmp / "evil.pt", program(enc([Ops(obj), Ops(inst)], proto), proto))


def setstate_abuse(c, proto, tmp):
    """Class 3: BUILD state that replaces forward, smuggles a class in as a hook, or sets dunders."""
    lin = glob("torch.nn.modules.linear", "Linear", proto)
    ident = glob("torch.nn.modules.linear", "Identity", proto)
    body = enc([build(newobj(ident, proto=proto), {"forward": newobj(lin, proto=proto)}, proto),
                build(newobj(ident, proto=proto), {"_forward_hooks": {0: lin}}, proto),
                build(newobj(ident, proto=proto), {"__class__": lin}, proto),
                build(call(glob("collections", "OrderedDict", proto), proto=proto), {"x": 1}, proto)], proto)
    return archive(tmp / "evil.pt", program(body, proto))


def partial_trick(c, proto, tmp):
    """Class 3: functools.partial of a constructor, with the file's arguments in its state."""
    p = call(glob("functools", "partial", proto), glob("torch.nn.modules.linear", "Linear", proto), proto=proto)
    body = build(p, (glob("torch.nn.modules.linear", "Linear", proto), (10 ** 5, 10 ** 5), {}, None), proto)
    return archive(tmp / "evil.pt", program(body, proto))


def copyreg_tricks(c, proto, tmp):
    """Class 3: copyreg's reconstructors aimed at os.system and at a class with state."""
    body = enc([call(glob("copyreg", "__newobj__", proto), glob("os", "system", proto), f"touch {c.marker}",
                     proto=proto)], proto)
    return archive(tmp / "evil.pt", program(body, proto))


def huge_storage(c, proto, tmp):
    """Class 4: 16 bytes on disk, 40 GB declared."""
    return archive(tmp / "evil.pt", program(tensor("0", 10 ** 10, (10 ** 10,), (1,), proto), proto), {"0": b"\0" * 16})


def huge_view(c, proto, tmp):
    """Class 4: a small storage viewed as a huge expanded tensor (stride 0), to be materialised later."""
    return archive(tmp / "evil.pt", program(tensor("0", 4, (10 ** 5, 10 ** 5), (0, 0), proto), proto),
                   {"0": b"\0" * 16})


def zip_bomb(c, proto, tmp):
    """Class 4: a deflated record that inflates to 256 MB (and a storage declaring exactly that)."""
    path = tmp / "evil.pt"
    n = 2 ** 28
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", program(tensor("0", n // 4, (n // 4,), (1,), proto), proto))
        with z.open("archive/data/0", "w") as f:
            for _ in range(n // 2 ** 20):
                f.write(bytes(2 ** 20))
    return path


def forged_size(c, proto, tmp):
    """Class 4: a stored member whose header claims more bytes than the file has."""
    path = archive(tmp / "evil.pt", program(enc(1, proto), proto))
    data = bytearray(path.read_bytes())
    cd = data.rfind(b"PK\x01\x02")  # last central directory entry (byteorder); sizes at +20 and +24
    data[cd + 20:cd + 28] = (2 ** 31).to_bytes(4, "little") * 2
    path.write_bytes(bytes(data))
    return path


def bytes_requests(c, proto, tmp):
    """Class 4: bytearray(10**10), b'x' * 10**10 and bytes(10**10)."""
    body = enc([call(glob("builtins", "bytearray", proto), 10 ** 10, proto=proto),
                call(glob("operator", "mul", proto), b"x", 10 ** 10, proto=proto),
                call(glob("builtins", "bytes", proto), 10 ** 10, proto=proto)], proto)
    return archive(tmp / "evil.pt", program(body, proto))


def truncated_length(c, proto, tmp):
    """Class 4: a BINBYTES8 claiming 2**40 bytes."""
    return archive(tmp / "evil.pt", program(pickle.BINBYTES8 + (2 ** 40).to_bytes(8, "little") + b"xx", proto))


def absurd_input_shape(c, proto, tmp):
    """Class 4: a genuine module that stores an input shape of 10**14 elements (compile would allocate it)."""
    m = tiny_vit()
    m.vitcc_input_shape = (10 ** 4, 3, 10 ** 5, 10 ** 5)
    return _saved(tmp, m, proto)


def absurd_cfg_shape(c, proto, tmp):
    m = tiny_vit()
    m.patch_embed.img_size = (10 ** 6, 10 ** 6)
    return _saved(tmp, m, proto)


def _saved(tmp: Path, obj, proto: int) -> Path:
    torch.save(obj, tmp / "evil.pt", pickle_protocol=proto)
    return tmp / "evil.pt"


PAYLOADS = {f.__name__: f for f in (
    graph_module_code, graph_module_escape, graph_module_real, graph_module_package,
    aten_from_file, aten_ops_namespace, aten_in_graph, torch_load_save,
    os_system, subprocess_reduce, eval_exec_getattr, module_constructor, module_newobj_args, inst_opcode,
    setstate_abuse, partial_trick, copyreg_tricks,
    huge_storage, huge_view, zip_bomb, forged_size, bytes_requests, truncated_length, absurd_input_shape,
    absurd_cfg_shape)}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitcc: error:") and "Traceback" not in err and "\n" not in err, err
    return err


@pytest.mark.parametrize("proto", [2, 4])
@pytest.mark.parametrize("name", list(PAYLOADS))
def test_hostile_file_is_refused_without_side_effects(name, proto, canary, tmp_path, capsys):
    path = PAYLOADS[name](canary, proto, tmp_path)
    capsys.readouterr()
    out = tmp_path / "out.pt2"
    with canary.watching():
        assert run(["inspect", str(path), *SHAPE]) == 2
        inspect_err = _one_line_error(capsys)
        assert run(["compile", str(path), "-o", str(out), *SHAPE]) == 2
        compile_err = _one_line_error(capsys)
        with pytest.raises(VitccError) as e:
            vitcc.load(path)
    canary.assert_untouched()
    assert not out.exists() and not out.with_name("out.pt2.tmp").exists()
    assert inspect_err == compile_err and "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("name", ["graph_module_code", "graph_module_real", "aten_in_graph"])
def test_graph_module_points_at_trust_and_pt2(name, canary, tmp_path):
    with pytest.raises(VitccError, match=r"pickled torch\.fx GraphModule.*--trust-pickle.*\.pt2"):
        vitcc.load(PAYLOADS[name](canary, 2, tmp_path))


def test_real_graph_module_loads_with_trust(canary, tmp_path):
    gm = vitcc.load(graph_module_real(canary, 2, tmp_path), trust_pickle=True)
    assert isinstance(gm, fx.GraphModule) and gm(torch.ones(1, 4)).shape == (1, 4)


_MEMORY_SCRIPT = """
import resource, sys
from vitcc.errors import VitccError
from vitcc.frontend.sources import load_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    try:
        load_model(path)
        raise SystemExit(f"{path} loaded")
    except VitccError:
        pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_memory_payloads_stay_bounded_in_a_fresh_process(canary, tmp_path):
    """tracemalloc sees Python's allocations only; a fresh process's peak RSS sees torch's too."""
    paths = []
    for name in ("huge_storage", "huge_view", "zip_bomb", "forged_size", "bytes_requests", "module_constructor",
                 "absurd_input_shape"):
        d = tmp_path / name
        d.mkdir()
        paths.append(str(PAYLOADS[name](canary, 2, d)))
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *paths], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout
    assert int(proc.stdout.split()[-1]) < PEAK_LIMIT


# ---------------------------------------------------------------- what must still load without trust
@pytest.mark.parametrize("proto", [2, 4])
def test_pickled_timm_vit_loads_and_compiles_without_trust(proto, canary, tmp_path, capsys):
    m = tiny_vit()
    path = tmp_path / "vit.pt"
    torch.save(m, path, pickle_protocol=proto)
    with canary.watching():
        loaded = vitcc.load(path)
    canary.assert_untouched()
    x = torch.randn(1, 3, 32, 32)
    assert type(loaded) is type(m) and torch.equal(loaded(x), m(x))
    assert run(["compile", str(path), "--sparsity", "0.5", "--align", "8", "-o", str(tmp_path / "small.pt2")]) == 0


def test_torchvision_vit_with_its_norm_layer_partial(tmp_path):
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32,
                                             mlp_dim=64, num_classes=10).eval()
    torch.save(m, tmp_path / "tv.pt")
    loaded = vitcc.load(tmp_path / "tv.pt")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), m(x)) and loaded.norm_layer.keywords == {"eps": 1e-6}


def test_state_dict_and_training_state_load_as_data(tmp_path):
    m = tiny_vit()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                "history": {"loss": [1.0]}}, tmp_path / "last.pt")
    state = safe_pickle.load(tmp_path / "last.pt")
    assert all(torch.equal(state["model"][k], v) for k, v in m.state_dict().items())
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("name", ["os_system", "torch_load_save"])
def test_the_watchers_see_what_a_trusted_load_does(name, canary, tmp_path):
    """Control: with --trust-pickle torch runs the payload, and the canary notices (a process, a read)."""
    path = PAYLOADS[name](canary, 2, tmp_path)
    with canary.watching(), suppress(Exception):  # torch.load of the FIFO's 64 zero bytes fails after reading
        safe_pickle.load(path, trust_pickle=True)
    with pytest.raises(AssertionError):
        canary.assert_untouched()
