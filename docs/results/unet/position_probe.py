"""Why the shipped UNet places shapes at chance: can each shipped denoiser tell where a pixel is?

For each of the five positions, "a large white square at <position> on a black background", on the first
denoising step (flow time t = 1, where the pipeline starts): the predicted clean image averaged over 16
noise draws, the centroid of its bright mass, and that centroid's distance from the position's anchor (the
anchors are 14 px apart). A model that reads the position word puts the five centroids near their anchors
from the first step on; one that ignores it puts them all in the same place (small ``centroid_spread_px``,
the mean distance of the five centroids from their mean).

Usage: ``python docs/results/unet/position_probe.py [--json OUT]`` (under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from segquant_cli.models import load_pipeline
from segquant_core.calibrate.capture import denoiser_of
from segquant_shapes.attributes import POSITION_ANCHORS, POSITIONS, Scene, ShapeSpec
from segquant_shapes.captions import canonical_caption
from segquant_shapes.models import predict_velocity

DRAWS = 16


def _prompt(position: str) -> str:
    return canonical_caption(Scene("black", (ShapeSpec("square", "white", "large", position),)))


def _clean_prediction(pipe, x: torch.Tensor, prompt: str) -> torch.Tensor:
    """Predicted clean image at t = 1: the flow is x_t = (1 - t) x0 + t noise and v = noise - x0, so x0 = x_t - v."""
    states, pooled = pipe.encode_prompt([prompt] * x.shape[0])
    t = torch.ones(x.shape[0])
    with torch.no_grad():
        v = predict_velocity(denoiser_of(pipe), x, t, states, pooled)
    return x - v


def probe(pipe) -> dict[str, object]:
    """The five centroids of one pipeline's first-step prediction, their distances and their spread."""
    noise = torch.randn(DRAWS, pipe.pixel_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    distances, centroids = {}, {}
    for position in POSITIONS:
        brightness = _clean_prediction(pipe, noise, _prompt(position)).mean(0).mean(0)
        mass = (brightness - brightness.median()).clamp(min=0)
        cx, cy = float((mass * xs).sum() / mass.sum()), float((mass * ys).sum() / mass.sum())
        ax, ay = POSITION_ANCHORS[position]
        distances[position] = round(math.hypot(cx - ax, cy - ay), 1)
        centroids[position] = (round(cx, 1), round(cy, 1))
    mx = sum(x for x, _ in centroids.values()) / len(centroids)
    my = sum(y for _, y in centroids.values()) / len(centroids)
    return {
        "centroid_xy": centroids,
        "centroid_distance_px": distances,
        "mean_centroid_distance_px": round(sum(distances.values()) / len(distances), 1),
        "centroid_spread_px": round(sum(math.hypot(x - mx, y - my) for x, y in centroids.values()) / 5, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {name: probe(load_pipeline(f"shipped:{name}")) for name in ("mmdit", "flux", "unet")}
    for name, r in results.items():
        print(
            f"{name:6s} centroid off its anchor by {r['mean_centroid_distance_px']} px on average, spread "
            f"{r['centroid_spread_px']} px; centroids (x, y) {r['centroid_xy']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
