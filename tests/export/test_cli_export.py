"""``segquant export-onnx``: a pipeline-calibrated artifact → ONNX file → ONNX Runtime check (error + latency),
and one-line errors (exit code 2, nothing written) for what cannot be exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from export_helpers import ROWS

import segquant_core as sq
from segquant_cli.main import main
from segquant_core.detect import example_inputs_for
from segquant_core.recipes import Recipe

segquant_shapes = pytest.importorskip("segquant_shapes")


@pytest.fixture(scope="module")
def pipe_and_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export-cli")
    pipe = segquant_shapes.tiny_random_pipeline("mmdit", seed=0)
    pipe.save_pretrained(root / "pipe")
    sq.quantize_pipeline(
        pipe,
        "w8a8-segquant",
        ["a small red circle on a blue background"],
        num_inference_steps=2,
        steps_per_prompt=2,
        guidance_scale=3.0,
        progress=False,
    )
    sq.save(sq.denoiser_of(pipe), root / "artifact", source={"path": str(root / "pipe"), "component": "transformer"})
    return root / "pipe", root / "artifact"


def test_export_onnx_check_reports_error_and_latencies(
    pipe_and_artifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, art = pipe_and_artifact
    out, report = tmp_path / "model.onnx", tmp_path / "report.json"
    rc = main(
        [
            "export-onnx",
            str(art),
            "--out",
            str(out),
            "--example-size",
            "8x8",
            "--check",
            "--rounds",
            "3",
            "--exporter",
            "torchscript",
            "--json",
            str(report),
        ]
    )  # dynamo: see test_export_models.py
    printed = capsys.readouterr().out
    print(printed)  # the benchmark lines, visible with -s
    assert rc == 0, printed
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "report.json"]
    assert "rel. error vs reference backend" in printed and "OK" in printed and "ONNX Runtime" in printed
    data = json.loads(report.read_text())
    assert data["export"]["quantized_layers"] == 32 and data["export"]["opset"] == 18
    check = data["check"]
    assert check["passed"] and check["rel_error"] < 1e-2
    assert check["ort_ms"] > 0 and check["backend_ms"] > 0 and check["rounds"] == 3
    assert check["target_native_as_fast_as_ort"] is (check["backend_ms"] <= check["ort_ms"])


def test_unexpressible_artifact_fails_with_the_layer_name(
    pipe_and_artifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipe_dir, _ = pipe_and_artifact
    model = sq.denoiser_of(segquant_shapes.tiny_random_pipeline("mmdit", seed=0))
    dynamic = Recipe("w8a8-per-token", activation_granularity="token", dynamic=True, smooth=True, seg=True, dual=True)
    sq.quantize(model, dynamic, [example_inputs_for(model)], rows_per_layer=ROWS, progress=False)
    sq.save(model, tmp_path / "dyn", source={"path": str(pipe_dir)})
    out = tmp_path / "out" / "model.onnx"
    assert main(["export-onnx", str(tmp_path / "dyn"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # (diffusers' loading bar may precede it)
    assert err.startswith("segquant: error: cannot export layer '") and "dynamically" in err
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])


def test_missing_source_and_bad_size_are_one_line_errors(
    pipe_and_artifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, art = pipe_and_artifact
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["source"].pop("path")
    no_source = tmp_path / "no-source"
    no_source.mkdir()
    (no_source / "manifest.json").write_text(json.dumps(manifest))
    (no_source / "model.safetensors").write_bytes((art / "model.safetensors").read_bytes())
    assert main(["export-onnx", str(no_source), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "source.path" in capsys.readouterr().err
    assert main(["export-onnx", str(art), "--out", str(tmp_path / "m.onnx"), "--example-size", "big"]) == 2
    assert "HxW" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_check_times_the_compiled_denoiser_too(pipe_and_artifact, tmp_path: Path) -> None:
    """``check_onnx(compile=True)``: a second alternation against ORT with our denoiser compiled (``aot_eager``
    here: the same graph Inductor gets, without C++ codegen); outputs equal eager; the model is eager again."""
    from segquant_core.compile import is_compiled
    from segquant_core.export import check_onnx, export_onnx

    pipe_dir, art = pipe_and_artifact
    model = sq.denoiser_of(segquant_shapes.load_pipeline(pipe_dir))
    sq.load(art, model)
    kwargs = example_inputs_for(model.eval(), height=8, width=8)
    result = export_onnx(model, kwargs, tmp_path / "m.onnx", exporter="torchscript")
    rep = check_onnx(model, kwargs, result.path, rounds=2, compile=True, compile_backend="aot_eager")
    assert rep.passed and rep.compiled_ms is not None and rep.compiled_ms > 0
    assert rep.compiled_vs_backend is not None and rep.compiled_vs_backend < 1e-5
    assert not is_compiled(model)
    assert rep.to_dict()["compiled_ms"] == rep.compiled_ms


def test_compile_without_check_is_a_one_line_error(
    pipe_and_artifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, art = pipe_and_artifact
    assert main(["export-onnx", str(art), "--out", str(tmp_path / "m.onnx"), "--compile"]) == 2
    assert "--compile needs --check" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
