"""CPU peers timed beside our variants: PyTorch PT2E static int8 and OpenVINO INT8 (``pip install '.[peers]'``).

``resolve_peers`` turns ``--peers pt2e,openvino`` into peer objects (one readable error for an unknown name
or a missing package); ``mark_against_peers`` adds, to every row of a table, its speed against each peer
measured in the same run and whether it beat all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from segquant_core.bench.peers.base import PEERS_EXTRA, Peer, PeerModel, PeerUnavailable
from segquant_core.bench.peers.openvino import OpenVinoInt8
from segquant_core.bench.peers.pt2e import Pt2eInt8

PEERS: dict[str, type[Peer]] = {p.name: p for p in (Pt2eInt8, OpenVinoInt8)}

__all__ = ["PEERS", "PEERS_EXTRA", "Peer", "PeerModel", "PeerUnavailable", "mark_against_peers", "resolve_peers"]


def resolve_peers(names: Iterable[str]) -> list[Peer]:
    """Peer objects for ``names``; ``ValueError`` for an unknown name, ``PeerUnavailable`` for a missing package."""
    names = list(names)
    unknown = [n for n in names if n not in PEERS]
    if unknown:  # before any package check, so a typo is reported as a typo
        raise ValueError(f"unknown peer {unknown[0]!r} (choose from {', '.join(PEERS)})")
    for name in names:
        PEERS[name].require()
    return [PEERS[name]() for name in names]


def mark_against_peers(
    rows: list[dict[str, Any]],
    peers: list[Peer],
    case_key: str,
    *,
    name_key: str = "candidate",
    time_key: str = "median_ms",
) -> None:
    """Per row: ``vs_<peer>`` (peer time / row time: > 1 means the row is faster) for each peer of the same
    case, and ``faster_than_peers`` (faster than every peer of that case). ``name_key`` / ``time_key``: the
    columns holding a row's name and its time (``variant`` / ``s_per_image`` in the pipeline bench)."""
    medians = {(r[case_key], r[name_key]): r[time_key] for r in rows}
    for row in rows:
        ratios = {}
        for peer in peers:
            t = medians.get((row[case_key], peer.label))
            if t is not None:
                ratios[f"vs_{peer.name}"] = round(t / row[time_key], 3)
        row.update(ratios)
        if row[name_key] not in {p.label for p in peers} and ratios:
            row["faster_than_peers"] = all(v > 1.0 for v in ratios.values())
