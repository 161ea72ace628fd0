"""report/: records from a tiny checkpoint and bench JSONs, the page's numbers, the CLI, and a real browser."""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import mpokit
from mpokit.cli.inspect import layer_rows
from mpokit.cli.main import main
from mpokit.io.checkpoint import read_meta
from mpokit.report import build_report
from mpokit.report.collect import read_checkpoint, read_inputs
from mpokit.report.points import points

BENCH = {"model": "tiny", "tokens": 512, "rows": [
    {"method": "dense", "budget": 1.0, "perplexity": 10.25, "disk_mb": 0.5, "decode_tok_s": 900.0},
    {"method": "mpo", "budget": 0.8, "perplexity": 11.5, "disk_mb": 0.4, "decode_tok_s": 1000.5},
    {"method": "mpo", "budget": 0.5, "perplexity": 19.75, "disk_mb": 0.25, "decode_tok_s": 1200.25},
    {"method": "svd", "budget": 0.5, "perplexity": 1234567.0, "disk_mb": 0.25, "decode_tok_s": 1100.0},
    {"method": "svd", "budget": 0.3, "perplexity": None, "note": "diverged"},  # not plotted, still tabled
]}
NO_SIZE = {"settings": {"lr": 1e-4}, "rows": [{"task": "sst2", "accuracy": 0.875}, {"task": "sst2", "accuracy": 0.5}]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny checkpoint with its compression report, eval JSONs of it and of its source, two bench JSONs."""
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = tiny_llama()
    report = mpokit.compress_(model, mpokit.MPOConfig(max_bond=4))
    ckpt = mpokit.save_compressed(model, root / "ckpt", extra={"source": "tiny-llama", "report": report.to_dict()})
    (root / "eval_ckpt.json").write_text(json.dumps({"model": str(ckpt), "perplexity": 12.5, "bytes": 40000}))
    (root / "eval_dense.json").write_text(json.dumps({"model": "tiny-llama", "perplexity": 10.125, "bytes": 90000}))
    (root / "bench.json").write_text(json.dumps(BENCH))
    (root / "no_size.json").write_text(json.dumps(NO_SIZE))
    names = ["ckpt", "eval_ckpt.json", "eval_dense.json", "bench.json", "no_size.json"]
    return root, [root / n for n in names]


@pytest.fixture(scope="module")
def page(inputs):
    """The page of all inputs and its figure names (built once: drawing takes seconds)."""
    return build_report(inputs[1])


def _header_bytes(weights: Path) -> int:
    with weights.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return weights.stat().st_size - 8 - n


def test_checkpoint_records(inputs):
    root, _ = inputs
    ck = read_checkpoint(root / "ckpt")
    meta = read_meta(root / "ckpt")
    inspected = {r["layer"]: r for r in layer_rows(meta)}
    assert {li.name for li in ck.layers} == set(meta["layers"]) and len(ck.layers) == 14  # 2 blocks x 7
    for li in ck.layers:
        spec, row = meta["layers"][li.name], inspected[li.name]
        assert (li.type, li.rank, li.params, li.dense_params) == ("MPOLinear", max(spec["bonds"]), row["params"],
                                                                  row["dense_params"])
        assert li.rel_error == pytest.approx(row["rel_error"]) and li.rel_error > 0  # from the stored report
        assert li.bytes == 4 * li.params  # float32 cores
    assert {li.block for li in ck.layers} == {0, 1} and ck.layers[0].kind == "self_attn.q_proj"
    # the breakdown covers every stored byte of the weights file, nothing twice (tied head stored once)
    assert ck.total_bytes == _header_bytes(root / "ckpt" / "model.safetensors")
    assert sum(ck.bytes_by_type.values()) == sum(ck.bytes_by_module.values()) == ck.total_bytes
    assert ck.bytes_by_type["embedding"] == 128 * 64 * 4 and "norm" in ck.bytes_by_type


def test_checkpoint_without_report(tmp_path):
    """Specs alone still give layout, rank and sizes; what only the report knows is said to be missing."""
    torch.manual_seed(0)
    model = tiny_llama(layers=1)
    mpokit.compress_(model, mpokit.MPOConfig(max_bond=2))
    ck = read_checkpoint(mpokit.save_compressed(model, tmp_path / "ckpt"))
    assert {(li.layout, li.rank, li.rel_error) for li in ck.layers} == {("mpo", 2, None)} and len(ck.layers) == 7
    assert all(li.kept_bytes == pytest.approx(li.kept_params) and li.kept_params < 1 for li in ck.layers)  # fp32
    assert any("no compression report" in n for n in ck.notes) and ck.perplexity is None


def test_eval_results_attach_to_their_checkpoint(inputs):
    _, paths = inputs
    records = read_inputs(paths)
    ck = records[0]
    assert (ck.perplexity, ck.dense_perplexity, ck.perplexity_from) == (12.5, 10.125, "eval_ckpt.json")
    assert records[1].used_by == "ckpt" and records[2].used_by == "ckpt (dense model)"
    pts, notes = points(records)
    labels = {(p.series, p.label): p for p in pts}
    assert labels[("checkpoints", "ckpt")].quality == 12.5 and ("checkpoints", "ckpt: dense") in labels
    bench = [p for p in pts if p.series.startswith("bench.json")]
    assert len(bench) == 4 and {p.series for p in bench} == {"bench.json: dense", "bench.json: mpo",
                                                             "bench.json: svd"}
    # within a series, a point is named by what tells it apart (the unplotted svd row counts)
    assert [p.label for p in bench] == ["dense", "mpo budget=0.8", "mpo budget=0.5", "svd budget=0.5"]
    assert any("bench.json: 1 of 5 rows not plotted" in n for n in notes)
    assert any(n.startswith("no_size.json: table only: no size field") for n in notes)


class _Tables(HTMLParser):
    """data-table name -> rows of (text, data-value) per cell; and every src/href."""

    def __init__(self):
        super().__init__()
        self.tables, self.links, self._cell = {}, [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href")]
        if tag == "table":
            self._rows = self.tables.setdefault(a.get("data-table"), [])
        elif tag == "tr":
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = [a.get("data-value"), ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._rows[-1].append(tuple(self._cell))
            self._cell = None


def _column(rows, name):
    k = [text for _, text in rows[0]].index(name)
    return [r[k] for r in rows[1:]]


def test_page_numbers_equal_inputs(inputs, page):
    paths, (page, names) = inputs[1], page
    assert names == ["quality-perplexity-MiB", "decode-MiB", "checkpoint-0-breakdown", "checkpoint-0-heatmap"]
    parsed = _Tables()
    parsed.feed(page)
    bench = parsed.tables["table-3-rows"]
    for field in ("perplexity", "disk_mb", "decode_tok_s"):
        cells = _column(bench, field)
        want = [r.get(field) for r in BENCH["rows"]]
        assert [None if v is None else float(v) for v, _ in cells] == want  # exact values in data-value
        assert all(w is None or float(text.replace(",", "")) == pytest.approx(w, rel=1e-3)
                   for (_, text), w in zip(cells, want))  # and shown rounded
    meta = read_meta(paths[0])
    errors = {r["name"]: r["rel_error"] for r in meta["report"]["layers"]}
    layers = parsed.tables["checkpoint-0-layers"]
    shown = dict(zip([t for _, t in _column(layers, "layer")], [float(v) for v, _ in _column(layers, "rel_error")]))
    assert shown == errors
    summary = {r[0][1]: r[1][0] for r in parsed.tables["checkpoint-0-summary"][1:]}
    assert float(summary["perplexity"]) == 12.5 and float(summary["dense perplexity"]) == 10.125
    assert float(summary["perplexity / dense"]) == 12.5 / 10.125
    assert "no_size.json: table only" in page and "accuracy" in page
    # self-contained: every image inline, nothing fetched, no script
    assert parsed.links and all(v.startswith("data:image/png;base64,") for v in parsed.links)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I) and "<script" not in page
    assert page.isascii()


@pytest.mark.parametrize("bad, expected", [
    ("missing.json", "no such file or folder"),
    ("not_json.json", "not JSON"),
    ("folder", "got a folder without mpokit.json"),
    ("scalar.json", "a JSON int, not an object"),
])
def test_cli_bad_input_exits_2(inputs, tmp_path, capsys, bad, expected):
    (tmp_path / "not_json.json").write_text("{not json")
    (tmp_path / "scalar.json").write_text("3")
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["report", str(inputs[1][3]), str(tmp_path / bad), "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and expected in err and err.startswith("mpokit: error:") and "\n" not in err
    assert not (tmp_path / "r.html").exists()


def test_cli_refuses_to_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "r.html"
    out.write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main(["report", str(inputs[1][3]), "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    with pytest.raises(SystemExit) as e:
        main(["report", str(inputs[1][3]), "--out", str(tmp_path)])  # a folder
    assert e.value.code == 2
    assert main(["report", str(inputs[1][3]), "--out", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and not list(tmp_path.glob(".r.html*"))


# ---- a real browser ------------------------------------------------------------------
# Injected into a copy of the page: for every image, its decoded size and the share of non-white
# pixels (drawn into a canvas), and every table's rendered text, written into the DOM.
PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(img => {
    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    const d = c.width ? g.getImageData(0, 0, c.width, c.height).data : [];
    let ink = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200) ink++;
    const r = img.getBoundingClientRect();
    return {name: img.dataset.figure, w: img.naturalWidth, h: img.naturalHeight, ink: ink / Math.max(1, d.length / 4),
            x: r.left + scrollX, y: r.top + scrollY, rw: r.width, rh: r.height};
  });
  const tables = {};
  for (const t of document.querySelectorAll('table[data-table]'))
    tables[t.dataset.table] = [...t.rows].map(tr => [...tr.cells].map(td => td.textContent));
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({images, tables, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


def _browser() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p), None)


def _chromium(browser, tmp_path, *args):
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--mute-audio",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(_browser() is None, reason="no headless browser found (install Debian's `chromium`; "
                                                ".ci/run does so when it can)")
def test_page_in_headless_chromium(page, tmp_path):
    import html

    from matplotlib.image import imread

    page, names = page
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    browser, width = _browser(), 1300
    dom = _chromium(browser, tmp_path, "--virtual-time-budget=10000", f"--window-size={width},900", "--dump-dom",
                    probe.as_uri()).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the page's probe did not run; dump starts {dom[:300]!r}"
    result = json.loads(html.unescape(found.group(1)))
    images = result["images"]
    assert [i["name"] for i in images] == names and len(names) == 4
    for i in images:  # decoded, laid out, and not blank
        assert i["w"] > 100 and i["h"] > 100 and i["rw"] > 100 and i["rh"] > 50, i
        assert 0.01 < i["ink"] < 0.9, i
    rows = result["tables"]["table-3-rows"]
    k = rows[0].index("perplexity")
    shown = [r[k] for r in rows[1:]]
    assert [float(s.replace(",", "")) if s else None for s in shown][:4] == pytest.approx(
        [r["perplexity"] for r in BENCH["rows"][:4]], rel=1e-3) and shown[4] == ""
    summary = dict(result["tables"]["checkpoint-0-summary"][1:])
    assert float(summary["perplexity"]) == 12.5
    # the screenshot: every image's region holds drawn pixels (not a blank box)
    shot = tmp_path / "page.png"
    height = min(int(result["height"]) + 10, 16000)
    _chromium(browser, tmp_path, f"--window-size={width},{height}", f"--screenshot={shot}", probe.as_uri())
    pixels = imread(shot)[..., :3]  # (H, W, 3) floats in [0, 1]
    for i in images:
        y0, x0 = int(i["y"]), int(i["x"])
        region = pixels[y0:y0 + int(i["rh"]), x0:x0 + int(i["rw"])]
        assert region.size and region.std() > 0.05 and (region.min(axis=-1) < 0.8).mean() > 0.01, i["name"]


def test_compress_and_eval_write_their_run_as_a_report(tmp_path, capsys):
    import json as _json

    from mpokit.cli.main import main
    from test_export_gguf import TOKENIZER, tiny_model

    src = tmp_path / "src"
    tiny_model().save_pretrained(src)
    TOKENIZER.save_pretrained(src)
    out, page = tmp_path / "q", tmp_path / "compress.html"
    assert main(["compress", "--model", str(src), "--method", "quant", "--bits", "4", "--group-size", "32",
                 "--out", str(out), "--report", str(page)]) == 0
    assert page.is_file() and "<img" in page.read_text()
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    js, page2 = tmp_path / "e.json", tmp_path / "eval.html"
    assert main(["eval", str(out), "--text", str(text), "--tokens", "96", "--context", "48", "--json", str(js),
                 "--report", str(page2)]) == 0
    assert repr(_json.loads(js.read_text())["perplexity"]) in page2.read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # an existing page is refused before the run
        main(["compress", "--model", str(src), "--method", "quant", "--out", str(tmp_path / "q2"),
              "--report", str(page)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err and not (tmp_path / "q2").exists()
