"""``ctxext bench``: the CLI end to end on a tiny model, the bandwidth floor, the shipped config, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ctxext.attention.options import TensorizedOptions
from ctxext.bench import SECTIONS, BenchError, BenchSpec, parse_lengths, run_bench
from ctxext.bench.bandwidth import exact_bytes, floor_bytes, tensorized_hop_bytes
from ctxext.bench.measure import measure
from ctxext.bench.sources import BenchSourceError, load_bench_config
from ctxext.cli import app

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    result = runner.invoke(app, ["bench", *map(str, args)])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    return result, " ".join(text.split())


def invoke_retrieval_attention(out, *flags):
    """``ctxext bench`` on a tiny model's attention at 96 tokens with far-block retrieval, one timed call."""
    return invoke(
        "--model", "tiny-random:llama", "--lengths", "96", "--what", "attention", "--device", "cpu",
        "--block-sizes", "16", "--sinks", "4", "--local", "window", "--no-long-range", "--retrieve", "2",
        "--retrieve-block", "8", *flags, "--threads", "1", "--repeats", "1", "--out", out,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)  # triton must be unavailable on CPU for the error cells
        result, text = invoke(
            "--model", "tiny-random:llama", "--lengths", "64,100", "--block-sizes", "16", "--device", "cpu",
            "--backends", "torch,triton", "--grad-checkpointing", "both", "--threads", "1", "--repeats", "2",
            "--out", out,
        )  # fmt: skip
    assert result.exit_code == 0, text
    return out, json.loads((out / "bench.json").read_text()), text


def test_every_cell_is_present(tiny_run):
    _, data, _ = tiny_run
    assert data["lengths"] == [64, 100]
    assert data["methods"] == ["sdpa", "ta-torch", "ta-triton"]
    modes = {"attention": ["fwd", "fwdbwd"], "model": ["prefill", "train", "train+ckpt"]}
    cells = {(c["section"], c["mode"], c["method"], c["n"]): c for c in data["cells"]}
    expected = {(s, m, meth, n) for s, ms in modes.items() for m in ms for meth in data["methods"] for n in (64, 100)}
    assert set(cells) == expected
    assert len(data["cells"]) == len(expected)  # no duplicates


def test_ratios_are_measured_against_sdpa_in_the_same_run(tiny_run):
    _, data, _ = tiny_run
    cells = {(c["section"], c["mode"], c["method"], c["n"]): c for c in data["cells"]}
    for (section, mode, method, n), c in cells.items():
        if method == "ta-triton":
            continue
        assert c["error"] is None, c
        assert c["median_s"] > 0 and len(c["times_s"]) == 2
        assert c["median_s"] == pytest.approx(sorted(c["times_s"])[0] / 2 + sorted(c["times_s"])[1] / 2)
        sdpa = cells[(section, mode, "sdpa", n)]
        assert c["speedup_vs_sdpa"] == pytest.approx(sdpa["median_s"] / c["median_s"])
        if section == "model":
            assert c["tokens_per_s"] == pytest.approx(n / c["median_s"])


def test_bandwidth_floor_is_positive_and_used(tiny_run):
    _, data, _ = tiny_run
    bw = data["info"]["attention"]["bandwidth"]
    assert bw["bytes_per_s"] > 1e8  # any machine copies faster than 100 MB/s
    attention = [c for c in data["cells"] if c["section"] == "attention"]
    for c in attention:
        assert c["floor_bytes"] > 0 and c["floor_s"] == pytest.approx(c["floor_bytes"] / bw["bytes_per_s"])
        if c["median_s"]:
            assert c["x_floor"] == pytest.approx(c["median_s"] / c["floor_s"])
    ta = {(c["mode"], c["n"]): c for c in attention if c["method"] == "ta-torch"}
    assert ta[("fwdbwd", 64)]["floor_bytes"] > ta[("fwd", 64)]["floor_bytes"]
    assert ta[("fwd", 64)]["hops"] == 2  # 64 tokens with block 16: axes (4, 16)


def test_unavailable_backend_is_an_error_cell_not_a_crash(tiny_run):
    _, data, text = tiny_run
    triton = [c for c in data["cells"] if c["method"] == "ta-triton"]
    assert len(triton) == 10
    for c in triton:
        assert c["median_s"] is None and c["speedup_vs_sdpa"] is None
        assert "triton" in c["error"] and "cpu" in c["error"]
    assert "10 of 30 cells failed" in text


def test_outputs_table_json_png(tiny_run):
    out, data, text = tiny_run
    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    assert matplotlib.image.imread(out / "bench.png").ndim == 3
    md = (out / "bench.md").read_text()
    assert "| N | method | time s | vs SDPA |" in md
    assert "## Whole model, one training step with gradient checkpointing" in md
    assert "| 100 | ta-torch |" in text  # the table is printed on the terminal too
    assert data["command"].startswith("ctxext bench --model tiny-random:llama --lengths 64,100")
    assert data["tensorized_options"]["block_sizes"] == [16]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-config"], "--model no-such-config: unknown model or config name"),
        (["--model", "no-such-config"], "llama-3.1-8b"),
        (["--lengths", "4x"], "--lengths: '4x' is not a length"),
        (["--what", "attention,nosuch"], "--what: unknown section 'nosuch'"),
        (["--backends", "cuda"], "--backends: unknown tensorized backend 'cuda'"),
        (["--causal", "sideways"], "--causal: unknown mode 'sideways'"),
        (["--block-sizes", "16,a"], "--block-sizes: 'a' is not an integer"),
        (["--block-sizes", "16", "--retrieve", "2", "--retrieve-block", "5"], "--retrieve-block"),
        (
            ["--block-sizes", "16", "--retrieve", "2", "--retrieve-block", "8", "--retrieve-score-block", "3"],
            "--retrieve-score-block",
        ),
    ],
)
def test_bad_input_fails_clearly(tmp_path, args, message):
    base = [
        "--model",
        "tiny-random:llama",
        "--lengths",
        "64",
        "--what",
        "attention",
        "--out",
        tmp_path,
    ]  # args override
    result, text = invoke(*base, *args)
    assert result.exit_code == 2, text
    assert message in text
    assert not (tmp_path / "bench.json").exists()


def test_a_stopped_bench_writes_the_cells_it_measured(tmp_path, monkeypatch):
    import ctxext.bench.attention as attention_mod

    from .interrupting import raising_on_call

    monkeypatch.setattr(attention_mod, "measure", raising_on_call(attention_mod.measure, 3, KeyboardInterrupt()))
    result, text = invoke(
        "--model", "tiny-random:llama", "--lengths", "64,128", "--what", "attention", "--device", "cpu",
        "--block-sizes", "16", "--threads", "1", "--repeats", "1", "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 130, text
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [(c["mode"], c["method"]) for c in data["cells"]] == [("fwd", "sdpa"), ("fwd", "ta-torch")]
    assert all(c["median_s"] > 0 for c in data["cells"])
    assert "stopped: interrupted after 2 cells" in (tmp_path / "bench.md").read_text()


def test_profile_writes_one_table_per_measured_cell(tmp_path):
    result, text = invoke(
        "--model", "tiny-random:llama", "--lengths", "64", "--what", "attention,model", "--device", "cpu",
        "--block-sizes", "16", "--threads", "1", "--repeats", "1", "--profile", "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, text
    data = json.loads((tmp_path / "bench.json").read_text())
    assert " --profile" in data["command"] and "--profile True" not in data["command"]
    measured = [c for c in data["cells"] if c.get("median_s")]
    assert len(measured) >= 6  # sdpa and ta-torch, attention fwd / fwd+bwd and model prefill / train
    for cell in measured:
        table = Path(cell["profile"]).read_text()
        assert f"{cell['section']} {cell['mode']}, {cell['method']}, N=64" in table
        assert "Self CPU" in table and "aten::" in table  # the operators of that call


def test_the_shipped_attention_is_benchmarked_as_asked(tmp_path):
    """The recipes' attention (sinks, window, no outer hops, retrieved far blocks) reaches the
    timed operator, and the recorded command reproduces it (boolean flags as --flag / --no-flag)."""
    result, text = invoke(
        "--model", "tiny-random:llama", "--lengths", "96", "--what", "attention", "--device", "cpu",
        "--block-sizes", "16", "--sinks", "4", "--local", "window", "--no-long-range", "--retrieve", "2",
        "--retrieve-block", "8", "--retrieve-score-block", "2", "--rope", "axis", "--threads", "1", "--repeats", "1",
        "--out", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, text
    data = json.loads((tmp_path / "bench.json").read_text())
    opts = data["tensorized_options"]
    assert (opts["retrieve"], opts["retrieve_block"], opts["long_range"], opts["sinks"]) == (2, 8, False, 4)
    assert opts["rope"] == "axis" and opts["retrieve_score_block"] == 2
    assert "--no-long-range --retrieve 2 --retrieve-block 8 --retrieve-score-block 2" in data["command"]
    cells = [c for c in data["cells"] if c.get("method") == "ta-torch"]
    assert cells and all(not c.get("error") and c["median_s"] > 0 for c in cells)


def test_parse_lengths():
    assert parse_lengths("1k, 2k,4096,1k") == [1024, 2048, 4096]
    for bad in ("4x", "", "0"):
        with pytest.raises(BenchError, match="--lengths"):
            parse_lengths(bad)


def test_floor_formula_by_hand():
    # B=1, Hq=2, Hkv=1, N=64, D=4, float32, block 16 -> axes (4, 16): a local and one outer hop.
    q, k = 1 * 2 * 64 * 4 * 4, 1 * 1 * 64 * 4 * 4  # bytes of one (B, Hq, L, D) / (B, Hkv, L, D) tensor
    complete = tensorized_hop_bytes(1, 2, 1, 64, 4, 4, TensorizedOptions(block_sizes=(16,)))
    assert complete == [{"in": q + 2 * k, "out": 2 * q}, {"in": q + k + 2 * q, "out": q}]
    dominance = tensorized_hop_bytes(1, 2, 1, 64, 4, 4, TensorizedOptions(block_sizes=(16,), causal="dominance"))
    assert dominance == [{"in": q + 2 * k, "out": q}, {"in": q + k + q, "out": q}]
    assert floor_bytes(complete, "fwd") == (q + 2 * k + 2 * q) + (q + k + 2 * q + q)
    assert floor_bytes(dominance, "fwdbwd") == 3 * (q + 2 * k) + 2 * q + 3 * (2 * q + k) + 2 * q
    # One block: exact attention, one hop, same bytes as SDPA.
    one = tensorized_hop_bytes(1, 2, 1, 16, 4, 4, TensorizedOptions(block_sizes=(16,)))
    assert one == exact_bytes(1, 2, 1, 16, 4, 4)
    # A ragged length is padded to the axes: 65 tokens with block 16 -> 5 x 16 = 80 slots.
    ragged = tensorized_hop_bytes(1, 2, 1, 65, 4, 4, TensorizedOptions(block_sizes=(16,)))
    assert ragged[0]["in"] == (q + 2 * k) * 80 // 64
    with pytest.raises(ValueError, match="mode"):
        floor_bytes(complete, "decode")


def test_measure_records_failures():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    cell = measure(oom, torch.device("cpu"), warmup=1, repeats=2)
    assert cell["median_s"] is None
    assert cell["error"].startswith("OutOfMemoryError: CUDA out of memory")


def test_a_slow_first_call_is_never_the_cells_time():
    """On an H200 a cell whose first call held Triton's compilation (6 s) was reported as 6 s and
    skipped the longer lengths; the steady calls took 0.35 s. Now one more call decides."""
    import time as clock

    durations = iter([0.25] + [0.0] * 10)  # the first call is slow once (compilation), then fast
    cell = measure(lambda: clock.sleep(next(durations)), torch.device("cpu"), warmup=1, repeats=3, max_call_s=0.1)
    assert cell["first_call_s"] >= 0.25 and not cell["over_limit"]
    assert cell["timed_calls"] == 3 and cell["median_s"] < 0.1
    slow = measure(lambda: clock.sleep(0.12), torch.device("cpu"), warmup=1, repeats=3, max_call_s=0.1)
    assert slow["over_limit"] and slow["timed_calls"] == 1 and slow["median_s"] >= 0.12


def test_shipped_llama_31_8b_config():
    config, label = load_bench_config("llama-3.1-8b")
    assert "shipped" in label
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 4096, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (14336, 128256, 131072)
    assert config.rms_norm_eps == 1e-5 and config.dtype == torch.bfloat16
    rope = config.rope_parameters
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert (rope["low_freq_factor"], rope["high_freq_factor"]) == (1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 8192


def test_config_json_file(tmp_path):
    path = tmp_path / "my.json"
    path.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 2}))
    config, _ = load_bench_config(str(path))
    assert config.model_type == "qwen2" and config.hidden_size == 32
    path.write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(BenchSourceError, match="model_type"):
        load_bench_config(str(path))


def test_llama_31_8b_attention_shapes(tmp_path):
    """The 8B config's attention (Hq=32, Hkv=8, D=128) at a short length; the model section is skipped."""
    result = run_bench(
        BenchSpec(model="llama-3.1-8b", what="attention", lengths="128", device="cpu", repeats=1, out=tmp_path),
        log=lambda msg: None,
    )
    assert result["info"]["attention"]["shapes"] == {"batch": 1, "q_heads": 32, "kv_heads": 8, "head_dim": 128}
    assert all(c["error"] is None for c in result["cells"])
    # One block (128 <= 128): tensorized attention moves exactly the bytes of SDPA.
    floors = {c["method"]: c["floor_bytes"] for c in result["cells"] if c["mode"] == "fwd"}
    assert floors["ta-torch"] == floors["sdpa"] == 4 * (2 * 32 + 2 * 8) * 128 * 128


def _fake_section(ctx):
    return [
        {"section": "fake", "mode": "decode", "method": m.name, "n": n, "median_s": 1.0 / n, "peak_mib": None}
        for n in ctx.lengths
        for m in ctx.methods
    ]


def test_a_new_section_plugs_into_the_registry(tmp_path, monkeypatch):
    """How the decode benchmark will be added: one registry entry, reported by the same code."""
    monkeypatch.setitem(SECTIONS, "fake", f"{__name__}:_fake_section")
    result = run_bench(BenchSpec(model="tiny-random:llama", what="fake", lengths="64,128", out=tmp_path), log=print)
    assert {c["method"] for c in result["cells"]} == {"sdpa", "ta-torch"}
    assert all(c["speedup_vs_sdpa"] == 1.0 for c in result["cells"])
    assert "## fake, decode" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes().startswith(PNG_MAGIC)
    assert math.isfinite(result["wall_s"])
