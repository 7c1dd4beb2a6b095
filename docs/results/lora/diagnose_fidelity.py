"""Why a quantized variant loses fidelity with an adapter: calibration vs what is inherent (issue 18, item 2).

One denoiser call per variant on held-out outlined scenes (with the trigger) at flow times 0.3 / 0.6 / 0.9;
SNR of the predicted velocity against the float model (with the adapter: against fp + adapter). Compared:

* ``plain``: the variant without the adapter, vs fp (its own no-adapter fidelity);
* ``side``: the default: calibrated without the adapter on untriggered (filled) train scenes, adapter
  attached afterwards as the side branch;
* ``side, calibrated with adapter``: calibrated with the adapter active on triggered (outlined) train
  scenes, then the same side branch (not acceptable as a default: adapters are chosen per request);
* ``merged``: merge-then-requantize, calibrated on the triggered scenes.

For static-scale variants it also counts the share of activation values outside the calibrated range
(clipped), with and without the adapter, on the same inputs.

    python docs/results/lora/diagnose_fidelity.py --adapter DIR --scale 1 [--calib 16]
"""
# ruff: noqa: T201  (a measurement script: it prints its table)

import argparse
import math

import numpy as np
import torch

import segquant_core as sq
from segquant_shapes import load_shipped
from segquant_shapes.attributes import restyle
from segquant_shapes.captions import canonical_caption
from segquant_shapes.data import generate_examples
from segquant_shapes.render import render_scene
from segquant_shapes.splits import held_out_scenes, train_scenes
from segquant_shapes.text_encoder import encode_prompts


def calls(images, captions, times, seed):
    g = torch.Generator().manual_seed(seed)
    states, pooled = encode_prompts(captions)
    x0 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    out = []
    for t in times:
        noise = torch.randn(x0.shape, generator=g)
        out.append(
            {
                "hidden_states": (1 - t) * x0 + t * noise,
                "encoder_hidden_states": states,
                "pooled_projections": pooled,
                "timestep": torch.full((x0.shape[0],), 1000.0 * t),
            }
        )
    return out


def snr_db(ref, out):
    return 10 * math.log10(float(ref.pow(2).sum() / (out - ref).pow(2).sum().clamp_min(1e-30)))


class ClipCounter:
    """Counts activation values beyond each static segment's calibrated code range."""

    def __init__(self, model):
        self.clipped = self.total = 0
        self.handles = [
            m.register_forward_pre_hook(self._hook)
            for m in model.modules()
            if isinstance(m, sq.SegLinear) and m.cfg.activation is not None and not m.cfg.activation.dynamic
        ]

    def _hook(self, layer, args):
        x = args[0].reshape(-1, layer.in_features).float()
        sizes, lo = layer.cfg.segments.sizes, 0
        for size, seg in zip(sizes, layer.segs):
            xs = x[:, lo : lo + size] if layer.cfg.segments.axis == "in" else x
            lo += size
            if seg.smooth is not None:
                xs = xs / seg.smooth
            fmt, s = seg.activation.fmt, seg.act_scale
            hi, neg = float(s[0]) * fmt.qmax, float(s[-1]) * abs(fmt.qmin)
            self.clipped += int(((xs > hi) | (xs < -neg)).sum())
            self.total += xs.numel()

    def share(self):
        return self.clipped / max(self.total, 1)

    def remove(self):
        for h in self.handles:
            h.remove()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--adapter", required=True)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="w8a8-segquant,w4a8-segquant")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    held = [restyle(s, "outlined") for s in held_out_scenes()[:8]]
    evals = calls([render_scene(s, rng) for s in held], [canonical_caption(s) for s in held], (0.3, 0.6, 0.9), 1)
    ex = generate_examples(a.calib, seed=5)
    calib_plain = calls([e.image for e in ex], [e.caption for e in ex], (0.2, 0.5, 0.8), seed=2)
    pool = train_scenes()  # a spread of train scenes (the first ones share colour and shape)
    trig = [restyle(pool[int(i)], "outlined") for i in rng.permutation(len(pool))[: a.calib]]
    calib_trig = calls([render_scene(s, rng) for s in trig], [canonical_caption(s) for s in trig], (0.2, 0.5, 0.8), 3)

    def run(model):
        with torch.no_grad():
            return torch.cat([model(**c).sample for c in evals])

    def fresh(adapter=False):
        m = load_shipped("mmdit").transformer.eval()
        if adapter:
            sq.load_lora(m, a.adapter, "a", scale=a.scale)
        return m

    ref_plain, ref_lora = run(fresh()), run(fresh(True))
    print(f"| comparison (adapter scale {a.scale:g}) | SNR of the velocity (dB) | clipped activations |")
    print("|---|---|---|")
    print(f"| fp + LoRA vs fp (how much the adapter changes the output) | {snr_db(ref_lora, ref_plain):.2f} | |")
    for v in a.variants.split(","):
        q = fresh()
        sq.quantize(q, v, calib_plain, progress=False)
        counter = ClipCounter(q)
        plain = run(q)
        clip_plain = counter.share()
        counter.clipped = counter.total = 0
        sq.load_lora(q, a.adapter, "a", scale=a.scale)
        side = run(q)
        clip_side = counter.share()
        counter.remove()
        static = bool(counter.handles)
        q2 = fresh(True)  # calibrated with the adapter active, on triggered scenes
        sq.quantize(q2, v, calib_trig, progress=False)
        sq.unload_lora(q2)
        sq.load_lora(q2, a.adapter, "a", scale=a.scale)
        counter2 = ClipCounter(q2)
        side_cal = run(q2)
        clip_cal = counter2.share()
        counter2.remove()
        m = fresh(True)
        sq.fuse_lora(m)
        sq.quantize(m, v, calib_trig, progress=False)
        merged = run(m)

        def c(x, static=static):
            return f"{100 * x:.3f} %" if static else "dynamic"

        print(f"| {v} vs fp, no adapter | {snr_db(ref_plain, plain):.2f} | {c(clip_plain)} |")
        print(f"| {v} + LoRA side branch vs fp + LoRA (default) | {snr_db(ref_lora, side):.2f} | {c(clip_side)} |")
        print(f"| {v} + LoRA, calibrated with the adapter on | {snr_db(ref_lora, side_cal):.2f} | {c(clip_cal)} |")
        print(f"| {v} merged-then-requantized vs fp + LoRA | {snr_db(ref_lora, merged):.2f} | |", flush=True)


if __name__ == "__main__":
    main()
