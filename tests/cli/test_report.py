"""The HTML/PNG report: the page's picture and tables say what report.json says, the CLI writes all or
nothing, and a real browser renders the page (where chromium is installed) without a console message."""
import json
import os
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import vitcc
from vitcc.cli import run
from vitcc.report import write

from conftest import tiny_swin, tiny_vit

SVG = "{http://www.w3.org/2000/svg}"
SHAPE = ["--input-shape", "1,3,32,32"]


def compiled(model, size, sparsity=0.5, **kw):
    """A verified compile's report as report.json holds it."""
    r = vitcc.compile(model, "magnitude{p=1}", sparsity=sparsity, example_inputs=(torch.randn(1, 3, size, size),),
                      **kw)
    assert r.report["verify"]["tensors"]
    return json.loads(json.dumps(r.report, default=str))


def page(report, tmp_path):
    path = tmp_path / "report.html"
    write(report, path)
    text = path.read_text()
    return text, ET.fromstring(text.split("\n", 1)[1])  # the page is well-formed XML after its doctype


def table(root, ident):
    t = root.find(f".//table[@id='{ident}']")
    return [[c.text or "" for c in tr] for tr in t.find("tbody")]


def bars_match_groups(root, report):
    """One bar group per block, in model order; each bar is the sum of the groups its tooltip names."""
    groups = {g["name"]: g for g in report["groups"]}
    blocks = root.findall(f".//{SVG}g[@class='block']")
    assert [b.get("data-name") for b in blocks] == [b["name"] for b in report["blocks"]]
    drawn = set()
    for svg_block, block in zip(blocks, report["blocks"]):
        for bar in svg_block.findall(f"{SVG}g[@class='bar']"):
            names = bar.get("data-groups").split()
            size, kept = sum(groups[n]["size"] for n in names), sum(len(groups[n]["kept"]) for n in names)
            assert (int(bar.get("data-size")), int(bar.get("data-kept"))) == (size, kept)
            removed = bar.get("data-removed") == "true"  # a removed branch's groups keep nothing
            assert bar.find(f"{SVG}text").text == ("removed" if removed else f"{kept:,}/{size:,}")
            assert all(groups[n]["block"] == block["name"] or n == block["residual"] for n in names)
            drawn |= set(names) - {block["residual"]}
    assert drawn == {g["name"] for g in report["groups"] if g["block"] is not None}
    return blocks


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_page_draws_every_block_and_shows_the_report_figures(name, tmp_path):
    model, size = (tiny_vit(), 32) if name == "vit" else (tiny_swin(), 56)
    report = compiled(model, size)
    text, root = page(report, tmp_path)
    assert "<script" not in text and "src=" not in text and "href=" not in text and "default-src 'none'" in text
    blocks = bars_match_groups(root, report)
    assert len(blocks) == (2 if name == "vit" else 4)  # depth 2; Swin: two stages of two
    stages = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "section"]
    if name == "swin":
        assert [b["residual"] for b in report["blocks"]] == ["residual.0"] * 2 + ["residual.1"] * 2
        assert stages == ["stage 1: 2 blocks, residual 12/24", "stage 2: 2 blocks, residual 24/48"]
        mlp = [int(b.get("data-size")) for blk in blocks for b in blk.findall(f"{SVG}g[@class='bar']")
               if ".mlp." in b.get("data-groups")]
        assert mlp == [96, 96, 192, 192]  # embed 24 (stage 1) and 48 (stage 2), mlp ratio 4
    else:
        assert stages == []
    summary = table(root, "summary")
    assert summary[0] == ["parameters", f"{report['params_before']:,}", f"{report['params_after']:,}",
                          f"{report['params_after'] / report['params_before']:.1%}"]
    assert summary[1][:3] == ["MACs", f"{report['macs_before']:,}", f"{report['macs_after']:,}"]
    tensors = report["verify"]["tensors"]
    assert table(root, "verify") == [[t["name"], f"{t['max_abs_error']:.3g}", f"{t['max_rel_error']:.3g}",
                                      f"{t['scale']:.3g}", "worst" if t["name"] == report["verify"]["worst"] else ""]
                                     for t in tensors]
    assert [r[:2] for r in table(root, "pipeline")][:-1] == [
        [p["name"], ", ".join(f"{k}={v}" for k, v in p["options"].items())] for p in report["passes"]]
    assert ["magnitude", "p=1"] in [r[:2] for r in table(root, "pipeline")]
    assert "None: every op had a rule" in text and not report["frozen"]


def test_a_removed_branch_is_a_gap_in_its_block(tmp_path):
    report = compiled(tiny_vit(), 32, keep={"blocks.1.attn": [], "blocks.0.mlp.hidden": range(96)})
    assert report["removed_branches"] == ["blocks.1.attn"]
    _, root = page(report, tmp_path)
    bars_match_groups(root, report)
    removed = {b.get("data-groups") for b in root.iter(f"{SVG}g")
               if b.get("class") == "bar" and b.get("data-removed") == "true"}
    assert removed == {"blocks.1.attn.heads", "blocks.1.attn.qk_dim", "blocks.1.attn.v_dim"}


def test_frozen_ops_and_groups_are_shown_with_their_reasons(tmp_path):
    table_ = vitcc.default_table()

    @table_.rule(torch.ops.aten.gelu.default)
    def refuse(a, node):
        raise IndexError("planted bug")  # freezes what gelu touches: both MLPs' hidden neurons

    report = compiled(tiny_vit(), 32, rules=table_)
    _, root = page(report, tmp_path)
    assert table(root, "frozen") == [[f["node"], f["op"], f["reason"]] for f in report["frozen"]] and report["frozen"]
    frozen = [b for b in root.iter(f"{SVG}g") if b.get("class") == "bar" and "frozen:" in b.find(f"{SVG}title").text]
    assert len(frozen) == 2 and all(b.get("data-kept") == b.get("data-size") for b in frozen)
    bars_match_groups(root, report)


def test_accuracy_before_pruned_and_after_fine_tuning(tmp_path, one_thread):
    report = compiled(tiny_vit(img_size=8, patch_size=4), 8, data="digits", finetune_epochs=1, batch_size=128)
    _, root = page(report, tmp_path)
    assert table(root, "accuracy") == [[label, f"{report[k]['top1']:.2%}", f"{report[k]['top5']:.2%}", "359"]
                                       for k, label in (("accuracy_before", "before pruning"),
                                                        ("accuracy_pruned", "pruned, before fine-tuning"),
                                                        ("accuracy_after", "after fine-tuning"))]


def test_latency_is_shown_where_it_was_measured(tmp_path, one_thread):
    """With branches prunable: narrowing alone can save nothing measurable on a 0.9 ms model (a busy CI machine
    once measured every group at its minimum 2% slower than dense), removing a branch always does."""
    report = compiled(tiny_vit(), 32, sparsity=0.02, target="latency", prune="residual,heads,mlp,branch")
    _, root = page(report, tmp_path)
    lat = report["latency_model"]
    row = next(r for r in table(root, "summary") if r[0].startswith("latency, predicted"))
    assert row[1:3] == [f"{lat['predicted_ms_before']:.3g} ms", f"{lat['predicted_ms_after']:.3g} ms"]
    plain = compiled(tiny_vit(), 32)
    _, root = page(plain, tmp_path)
    assert not any(r[0].startswith("latency") for r in table(root, "summary"))  # nothing measured, nothing shown


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "vit.pt"
    torch.save(tiny_vit(), path)
    return str(path)


def test_cli_writes_html_and_png_reports_and_redraws_a_json_one(model_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    html, png, rep = tmp_path / "r.html", tmp_path / "r.png", tmp_path / "r.json"
    assert run(["compile", model_file, "--report", str(html), "--align", "1", *SHAPE]) == 0
    assert model_file in html.read_text()
    assert run(["compile", model_file, "--report", str(png), "--align", "1", *SHAPE]) == 0
    width, height = png_size(png)
    assert width > 1000 and height > 150  # five columns side by side, two blocks
    assert run(["compile", model_file, "--report", str(rep), "--align", "1", *SHAPE]) == 0
    report = json.loads(rep.read_text())
    assert run(["report", str(rep), "-o", str(tmp_path / "again.html")]) == 0
    _, root = page(report, tmp_path)
    again = ET.fromstring((tmp_path / "again.html").read_text().split("\n", 1)[1])
    assert ET.tostring(again) == ET.tostring(root)  # the same page as compile would have written
    assert len(again.findall(f".//{SVG}g[@class='block']")) == 2
    assert run(["report", str(rep), "-o", str(tmp_path / "again.png")]) == 0
    assert png_size(tmp_path / "again.png") == (width, height)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.html", "again.png", "r.html", "r.json", "r.png",
                                                          "report.html"]


def test_weights_zeroed_in_place_are_shown_as_weights_not_as_kept_channels(model_file, tmp_path, capsys):
    """dimap{granularity=weight} keeps every channel and zeroes 30% of the QKV, PRJ and MLP weights: the
    terminal, the page and the picture count nonzero weights per family, not 100% kept widths."""
    pytest.importorskip("matplotlib")
    rep, png = tmp_path / "r.json", tmp_path / "r.png"
    assert run(["compile", model_file, "--passes", "dimap{granularity=weight}", "--sparsity", "0.3",
                "--report", str(rep), *SHAPE]) == 0
    out = capsys.readouterr().out
    report = json.loads(rep.read_text())
    per_weight, ws = report["weight_sparsity"]["per_weight"], report["weight_sparsity"]
    assert report["budget"]["sparsity"] == 0.3 and sum(w["zeros"] for w in per_weight.values()) == ws["zeros"] > 0
    families = {}
    for w in per_weight.values():
        size, zeros = families.get(w["family"], (0, 0))
        families[w["family"]] = (size + w["size"], zeros + w["zeros"])
    assert set(families) == {"QKV", "PRJ", "MLP"} and all(abs(z / n - 0.3) < 0.01 for n, z in families.values())
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.count("│") == 5]
    for family, (size, zeros) in families.items():
        assert [f"{family} weights, nonzero", f"{size:,}", f"{size - zeros:,}", f"{1 - zeros / size:.1%}"] in rows
    assert ["parameters, nonzero", f"{report['params_before']:,}", f"{report['params_after'] - ws['zeros']:,}",
            f"{(report['params_after'] - ws['zeros']) / report['params_before']:.1%}"] in rows
    assert not any(r[0].startswith(("MLP neurons", "attention heads", "residual width")) for r in rows)
    assert "weights zeroed in place" in out
    text, root = page(report, tmp_path)
    summary = table(root, "summary")
    assert ["QKV weights, nonzero", f"{families['QKV'][0]:,}", f"{families['QKV'][0] - families['QKV'][1]:,}",
            f"{1 - families['QKV'][1] / families['QKV'][0]:.1%}"] in summary and "sparsity 0.3" in text
    assert not root.findall(f".//{SVG}g[@class='bar']")  # no width was pruned: no channel bars
    for block in root.findall(f".//{SVG}g[@class='block']"):
        bars = block.findall(f"{SVG}g[@class='weights']")
        assert len(bars) == 3
        for bar in bars:
            names = bar.get("data-weights").split()
            assert names and all(n.startswith(block.get("data-name") + ".") for n in names)
            assert int(bar.get("data-size")) == sum(per_weight[n]["size"] for n in names)
            assert int(bar.get("data-kept")) == sum(per_weight[n]["size"] - per_weight[n]["zeros"] for n in names)
    write(report, png)
    assert png_size(png)[0] > 1000


def test_lowrank_ranks_are_rank_dims_and_the_mlp_keeps_its_width(model_file, tmp_path, capsys):
    """The width between a factorised projection's down and up is kind rank: the MLP column holds the MLP's
    192 neurons per block (not MLP plus ranks), and the ranks get a column and a summary row of their own."""
    rep = tmp_path / "r.json"
    assert run(["compile", model_file, "--passes", "lowrank", "--sparsity", "0.3", "--report", str(rep), *SHAPE]) == 0
    out = capsys.readouterr().out
    report = json.loads(rep.read_text())
    ranks = [g for g in report["groups"] if g["kind"] == "rank"]
    assert sorted(g["name"] for g in ranks) == sorted(f"{t}.rank" for t in report["lowrank"]["projections"])
    assert [g["size"] for g in report["groups"] if g["kind"] == "mlp"] == [192, 192]  # tiny_vit: 4 x 48
    w = report["widths"]
    assert w["rank"]["after"] < w["rank"]["before"] and w["mlp"]["before"] == 384
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.count("│") == 5]
    assert ["rank dims of low-rank factors (4 groups)", f"{w['rank']['before']:,}", f"{w['rank']['after']:,}",
            f"{w['rank']['after'] / w['rank']['before']:.1%}"] in rows
    assert ["MLP neurons (2 groups)", "384", f"{w['mlp']['after']:,}", f"{w['mlp']['after'] / 384:.1%}"] in rows
    _, root = page(report, tmp_path)
    bars_match_groups(root, report)
    for block in root.findall(f".//{SVG}g[@class='block']"):
        kinds = {}
        for bar in block.findall(f"{SVG}g[@class='bar']"):
            names = bar.get("data-groups").split()
            kinds.setdefault(frozenset(g["kind"] for g in report["groups"] if g["name"] in names), []).append(bar)
        assert int(kinds[frozenset({"mlp"})][0].get("data-size")) == 192
        assert sum(int(b.get("data-size")) for b in kinds[frozenset({"rank"})]) == \
            sum(g["size"] for g in ranks if g["block"] == block.get("data-name"))


def test_report_says_which_vitcc_and_torch_made_it_when_and_what_scale_means(model_file, tmp_path, capsys):
    from datetime import datetime, timezone
    from importlib.metadata import version
    rep, html = tmp_path / "r.json", tmp_path / "r.html"
    before = datetime.now(timezone.utc).replace(microsecond=0)
    assert run(["compile", model_file, "--sparsity", "0", "--report", str(rep), *SHAPE]) == 0
    assert "(relative 0, every tensor exact)" in capsys.readouterr().out  # nothing removed: no worst tensor
    report = json.loads(rep.read_text())
    assert report["versions"] == {"vitcc": version("vitcc"), "torch": torch.__version__}
    assert before <= datetime.fromisoformat(report["date"]) <= datetime.now(timezone.utc)
    assert run(["report", str(rep), "-o", str(html)]) == 0
    text = html.read_text()
    assert f"vitcc {version('vitcc')}, torch {torch.__version__} on {report['date']}" in text
    assert "<b>scale</b> is the tensor's largest |masked| value" in text
    assert f"≤ {report['verify']['atol']:g} + {report['verify']['rtol']:g} × scale" in text


def test_report_adds_the_latency_vitcc_bench_measured(model_file, tmp_path, capsys, one_thread):
    small, rep, bench, html = (tmp_path / n for n in ("small.pt2", "r.json", "bench.json", "r.html"))
    assert run(["compile", model_file, "-o", str(small), "--report", str(rep), *SHAPE]) == 0
    assert run(["bench", model_file, str(small), "--runtime", "eager", "--rounds", "2", "--warmup", "0",
                "--json", str(bench), *SHAPE]) == 0
    assert run(["report", str(rep), "--bench", str(bench), "-o", str(html)]) == 0
    root = ET.fromstring(html.read_text().split("\n", 1)[1])
    stats = json.loads(bench.read_text())["runs"][0]["stats"]
    row = next(r for r in table(root, "summary") if r[0].startswith("latency, eager batch 1 (vitcc bench"))
    assert row[1:3] == [f"{stats['model']['wall']:.3g} ms", f"{stats['compiled']['wall']:.3g} ms"]
    assert run(["report", str(rep), "--bench", str(rep), "-o", str(tmp_path / "x.html")]) == 2
    assert "is not a `vitcc bench MODEL COMPILED --json` file" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_inspect_html_draws_one_bar_per_group_by_kind(model_file, tmp_path, capsys):
    path = tmp_path / "groups.html"
    assert run(["inspect", model_file, "--json", *SHAPE]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert run(["inspect", model_file, "--html", str(path), *SHAPE]) == 0
    root = ET.fromstring(path.read_text().split("\n", 1)[1])
    drawn = root.findall(f".//{SVG}g[@class='group']")
    assert len(drawn) == 1 + 2 * 4  # the residual stream, and per block heads, q/k dim, v dim, MLP
    sections = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "section"]
    assert sections == ["residual (1 group)", "heads (2 groups)", "head_dim (4 groups)", "mlp (2 groups)"]
    sizes = {g.get("data-name"): int(g.find(f"{SVG}g").get("data-size")) for g in drawn}
    assert sizes == {g["name"]: g["size"] for g in groups}
    assert sizes["residual"] == 48 and sizes["blocks.1.attn.heads"] == 3 and sizes["blocks.1.mlp.hidden"] == 192
    assert "None: every group can be pruned" in path.read_text()


@pytest.mark.parametrize("argv, needle", [
    (["compile", "timm:no_such_model", "--report", "{tmp}/r.txt", *SHAPE], "unknown format .txt"),
    (["report", "{tmp}/bad.json", "-o", "{tmp}/out.html"], "is not JSON"),
    (["report", "{tmp}/groups.json", "-o", "{tmp}/out.html"], "is not a vitcc compile report"),
    (["report", "{tmp}/bad.json", "-o", "{tmp}/out.pdf"], "unknown format .pdf; name a .html or .png file"),
    (["report", "{tmp}/missing.json", "-o", "{tmp}/out.html"], "does not exist"),
    (["inspect", "timm:no_such_model", "--html", "{tmp}/g.svg", *SHAPE], "name a .html file"),
])
def test_bad_report_input_is_one_line_exit_2_and_writes_nothing(argv, needle, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"groups": [')
    (tmp_path / "groups.json").write_text('{"groups": [], "frozen": []}')
    before = sorted(tmp_path.iterdir())
    assert run([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitcc: error:") and "\n" not in err and needle in err, err
    assert sorted(tmp_path.iterdir()) == before


def test_png_without_matplotlib_names_the_extra_before_any_work(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: import raises ImportError
    assert run(["compile", "timm:no_such_model", "--report", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install -e ".[report]"' in err and "\n" not in err and "no_such_model" not in err
    assert not list(tmp_path.iterdir())


def chromium():
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def screenshot(browser, html, png, tmp_path):
    """Render `html` headless; the console messages chromium logged (a page with no scripts should log none)."""
    cmd = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1280,1400",
           html.as_uri()]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and png.exists(), done.stderr[-2000:]
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_chromium_renders_the_page_without_console_messages(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="reading the screenshot needs Pillow (the report extra has it)")
    browser = chromium()
    probe = tmp_path / "probe.html"  # the check can see a console message: the policy refuses this script
    probe.write_text("<!DOCTYPE html><html><head><meta http-equiv=\"Content-Security-Policy\" "
                     "content=\"default-src 'none'\"/></head><body><script>1</script></body></html>")
    assert screenshot(browser, probe, tmp_path / "probe.png", tmp_path)
    report = compiled(tiny_swin(), 56)
    html, png = tmp_path / "report.html", tmp_path / "shot.png"
    write(report, html)
    assert screenshot(browser, html, png, tmp_path) == []
    image = Image.open(png).convert("RGB")
    colours = {c for _, c in image.getcolors(1 << 24)}
    dark = sum(n for n, (r, g, b) in image.getcolors(1 << 24) if r + g + b < 300)
    assert dark > 2000, "blank page: almost no text drawn"
    drawn = {(0x00, 0x72, 0xB2), (0xE6, 0x9F, 0x00), (0xCC, 0x79, 0xA7)}  # kept heads, MLP, residual bars
    assert drawn <= colours, "the picture's bars are not on the screenshot"
