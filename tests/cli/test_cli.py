"""The ``segquant`` CLI: plan / quantize / eval on tiny models, and one-line errors with exit code ≠ 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import FluxTransformer2DModel

import segquant_core as sq
from segquant_cli.main import main

segquant_shapes = pytest.importorskip("segquant_shapes")


@pytest.fixture(scope="module")
def tiny_pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pipe") / "tiny-mmdit"
    segquant_shapes.tiny_random_pipeline("mmdit", seed=0).save_pretrained(d)
    return d


def test_plan_json_of_a_model_dir_matches_detect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    model.save_pretrained(tmp_path / "flux")
    assert main(["plan", str(tmp_path / "flux"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    from segquant_core.detect import example_inputs_for

    expected = sq.detect(model, example_inputs_for(model)).to_list()
    assert printed == expected
    single = next(r for r in printed if r["layer"] == "single_transformer_blocks.0.norm.linear")
    assert single["segments"] == {"axis": "out", "sizes": [32, 32, 32]} and single["dual_scale"]


def test_plan_table_of_a_pipeline(tiny_pipe_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(tiny_pipe_dir)]) == 0
    out = capsys.readouterr().out
    assert "norm1.linear" in out and "out 6×" in out


def test_quantize_writes_artifact_and_summary(
    tiny_pipe_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle in the top left on a blue background\n")
    overrides = tmp_path / "overrides.json"
    overrides.write_text(
        json.dumps({"excludes": ["proj_out"], "overrides": [{"pattern": "*.ff.net.2", "dual": False}]})
    )
    out_dir = tmp_path / "art"
    rc = main(
        [
            "quantize",
            str(tiny_pipe_dir),
            "--recipe",
            "w8a8-segquant",
            "--out",
            str(out_dir),
            "--prompts",
            str(prompts),
            "--calib-samples",
            "4",
            "--steps",
            "4",
            "--steps-per-prompt",
            "2",
            "--overrides",
            str(overrides),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "segmented layers" in text and "dual-scale layers" in text and "weight bytes" in text
    manifest = sq.read_manifest(out_dir)
    assert "proj_out" in manifest["excluded"] and "proj_out" not in manifest["layers"]
    ff = manifest["layers"]["transformer_blocks.0.ff.net.2"]
    assert ff["activation"]["dual"] is False
    adaln = manifest["layers"]["transformer_blocks.0.norm1.linear"]
    assert adaln["activation"]["dual"] is True and len(adaln["segments"]["sizes"]) == 6
    assert manifest["calibration"]["samples"] == 4
    # a self-contained checkpoint (format 2): it loads without the float model
    assert manifest["format_version"] == 2 and (out_dir / "config.json").is_file()
    loaded = sq.load_denoiser(out_dir)
    assert type(loaded).__name__ == "SD3Transformer2DModel" and loaded.proj_out.weight.device.type == "cpu"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["quantize", "/does/not/exist", "--recipe", "w8a8", "--out", "/tmp/x"], "no such directory"),
        (["quantize", ".", "--recipe", "w9a9", "--out", "/tmp/x"], "unknown recipe 'w9a9'"),
        (["quantize", ".", "--recipe", "w8a8:dual=maybe", "--out", "/tmp/x"], "expects on/off"),
        (["plan", "/tmp"], "neither a pipeline"),
        (["eval", "/does/not/exist", "--out", "/tmp/x", "--seeds", "a,b"], "--seeds must be"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv: list[str], needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "segquant_cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("segquant: error:") and needle in lines[0], proc.stderr


def test_help_lists_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "segquant_cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("plan", "quantize", "eval"):
        assert cmd in proc.stdout
