"""CPU peers (PT2E static int8, OpenVINO INT8) timed beside our variants: build, run in int8, report vs peers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from torch import nn

from segquant_core.bench.layer import LayerShape, run_layer_bench
from segquant_core.bench.peers import PEERS, PeerUnavailable, mark_against_peers, resolve_peers

TINY = LayerShape("tiny 32×64×96", 32, 64, 96)


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


def _tiny_mlp() -> tuple[nn.Module, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 48)).eval()

    class Wrapped(nn.Module):  # keyword input, as the benches hand it
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    g = torch.Generator().manual_seed(1)
    example = {"x": torch.randn(16, 64, generator=g)}
    calibration = [{"x": torch.randn(16, 64, generator=g)} for _ in range(3)]
    return Wrapped().eval(), example, calibration


@pytest.mark.parametrize("name", ["pt2e", "openvino"])
def test_peer_runs_every_linear_in_int8_close_to_float(name):
    peer_cls = PEERS[name]
    if peer_cls.missing_packages():
        pytest.skip(f"the 'peers' extra is not installed ({', '.join(peer_cls.missing_packages())})")
    module, example, calibration = _tiny_mlp()
    with torch.no_grad():
        ref = module(**example)
    built = resolve_peers([name])[0].build(module, example, calibration)
    assert (built.int8_linears, built.linears) == (2, 2)  # read from the compiled artefact
    (out,) = built.call()
    assert out.shape == ref.shape
    err = float((out.float() - ref).norm() / ref.norm())
    assert 0 < err < 0.05, err  # int8: close to float but not equal to it
    (again,) = built.call()
    assert torch.equal(again.float(), out.float())  # the same prepared inputs every call


@pytest.mark.skipif(not _installed("openvino", "nncf"), reason="the 'peers' extra is not installed")
def test_layer_bench_times_a_peer_in_the_same_run_and_marks_who_is_faster():
    # OpenVINO only: it builds in seconds, where PT2E compiles (its build is covered above)
    peers = resolve_peers(["openvino"])
    rows = run_layer_bench([TINY], rounds=2, include_compile=False, peers=peers)
    by_name = {r["candidate"]: r for r in rows}
    peer = by_name[peers[0].label]
    assert peer["median_ms"] > 0 and 0 < peer["rel_err"] < 0.05 and peer["vs_bf16"] > 0
    assert peer["vs_openvino"] == 1.0 and "faster_than_peers" not in peer
    for name in ("bf16", "segquant w8a8", "segquant w8a8 dual"):
        row = by_name[name]
        assert row["vs_openvino"] == round(peer["median_ms"] / row["median_ms"], 3)
        assert row["faster_than_peers"] is (row["median_ms"] < peer["median_ms"])


def test_rows_are_marked_against_the_peers_of_their_own_case():
    peers = [PEERS["pt2e"](), PEERS["openvino"]()]
    rows = [
        {"shape": "a", "candidate": "segquant w8a8", "median_ms": 2.0},
        {"shape": "a", "candidate": peers[0].label, "median_ms": 3.0},
        {"shape": "a", "candidate": peers[1].label, "median_ms": 4.0},
        {"shape": "b", "candidate": "segquant w8a8", "median_ms": 5.0},
        {"shape": "b", "candidate": peers[0].label, "median_ms": 4.0},
        {"shape": "b", "candidate": peers[1].label, "median_ms": 6.0},
    ]
    mark_against_peers(rows, peers, "shape")
    assert rows[0]["vs_pt2e"] == 1.5 and rows[0]["vs_openvino"] == 2.0 and rows[0]["faster_than_peers"] is True
    assert rows[3]["vs_pt2e"] == 0.8 and rows[3]["vs_openvino"] == 1.2 and rows[3]["faster_than_peers"] is False
    assert rows[4]["vs_openvino"] == 1.5 and "faster_than_peers" not in rows[4]  # a peer row


def test_unknown_or_missing_peer_is_one_readable_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown peer 'tensorrt'"):
        resolve_peers(["tensorrt"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real_find_spec(name, *a)
    )
    with pytest.raises(PeerUnavailable) as info:
        resolve_peers(["openvino"])
    assert "nncf" in str(info.value) and "segquant-serve[peers]" in str(info.value)


def test_cli_bad_peer_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "segquant_cli", "bench", "layer", "--peers", "pt2e,tensorrt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("segquant: error: --peers:") and "tensorrt" in lines[0]
