"""Denoiser-level fidelity of quantized variants with the `outlined` LoRA (a quick stand-in for full sampling).

For held-out outlined prompts at several flow times, compares one denoiser call of each variant with the
float model: relative error ||v_q - v_fp|| / ||v_fp|| and SNR in dB, with the adapter (side branch on the
quantized layers, fp + adapter as reference), without it, and for merge-then-requantize. Calibration uses
denoiser inputs built like training batches (filled train-side scenes, no adapter), not a pipeline loop.

    python docs/results/lora/denoiser_fidelity.py [--scale 2] [--calib 16] [--threads 2]
"""

import argparse
import json
import math

import numpy as np
import torch

import segquant_core as sq
from segquant_shapes import load_shipped, shipped_pipeline_path
from segquant_shapes.attributes import restyle
from segquant_shapes.captions import canonical_caption
from segquant_shapes.data import generate_examples
from segquant_shapes.render import render_scene
from segquant_shapes.splits import held_out_scenes
from segquant_shapes.text_encoder import encode_prompts


def calls(scenes_images, captions, times, seed):
    g = torch.Generator().manual_seed(seed)
    states, pooled = encode_prompts(captions)
    x0 = torch.from_numpy(np.stack(scenes_images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    out = []
    for t in times:
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t) * x0 + t * noise
        out.append({"hidden_states": xt, "encoder_hidden_states": states, "pooled_projections": pooled,
                    "timestep": torch.full((x0.shape[0],), 1000.0 * t)})
    return out


def snr_db(ref, out):
    return 10 * math.log10(float(ref.pow(2).sum() / (out - ref).pow(2).sum().clamp_min(1e-30)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="w8a8-segquant,w4a8-segquant")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lora = shipped_pipeline_path("mmdit") / "loras" / "outlined"
    rng = np.random.default_rng(0)
    scenes = [restyle(s, "outlined") for s in held_out_scenes()[:8]]
    evals = calls([render_scene(s, rng) for s in scenes], [canonical_caption(s) for s in scenes],
                  (0.3, 0.6, 0.9), seed=1)
    ex = generate_examples(a.calib, seed=5)
    calib = calls([e.image for e in ex], [e.caption for e in ex], (0.2, 0.5, 0.8), seed=2)

    def run(model):
        with torch.no_grad():
            return torch.cat([model(**c).sample for c in evals])

    def fresh():
        return load_shipped("mmdit").transformer.eval()

    fp = fresh()
    ref_plain = run(fp)
    sq.load_lora(fp, lora, "outlined", scale=a.scale)
    ref_lora = run(fp)
    rows = [{"variant": "fp + LoRA vs fp (adapter effect)", "snr_db": snr_db(ref_lora, ref_plain)}]
    for v in a.variants.split(","):
        q = fresh()
        sq.quantize(q, v, calib, progress=False)
        plain = run(q)
        sq.load_lora(q, lora, "outlined", scale=a.scale)
        side = run(q)
        m = fresh()
        sq.load_lora(m, lora, "outlined", scale=a.scale)
        sq.fuse_lora(m)
        sq.quantize(m, v, calib, progress=False)  # calibrated with the adapter merged in
        merged = run(m)
        rows += [{"variant": f"{v} vs fp (no adapter)", "snr_db": snr_db(ref_plain, plain)},
                 {"variant": f"{v} + LoRA side branch vs fp + LoRA", "snr_db": snr_db(ref_lora, side)},
                 {"variant": f"{v} merged-then-requantized vs fp + LoRA", "snr_db": snr_db(ref_lora, merged)}]
        print(json.dumps(rows[-3:]), flush=True)
    print("| comparison | SNR of the velocity (dB) |\n|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['snr_db']:.2f} |")


if __name__ == "__main__":
    main()
