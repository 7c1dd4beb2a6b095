"""Quick check: style adherence of fp + adapter on held-out outlined prompts (one seed)."""
import sys
import torch
import segquant_core as sq
from segquant_shapes import load_shipped
from segquant_shapes.adherence import aggregate, check_image
from segquant_shapes.attributes import restyle
from segquant_shapes.captions import canonical_caption
from segquant_shapes.splits import held_out_scenes

torch.set_num_threads(2)
pipe = load_shipped("mmdit"); pipe.set_progress_bar_config(disable=True)
prompts = [canonical_caption(restyle(s, "outlined")) for s in held_out_scenes()[: int(sys.argv[2])]]
for scale in [float(x) for x in sys.argv[3].split(",")]:
    if scale:
        sq.load_lora(pipe.transformer, sys.argv[1], "o", scale=scale)
    out = pipe(prompts, generator=[torch.Generator().manual_seed(0) for _ in prompts], num_inference_steps=20,
               guidance_scale=3.0, output_type="pil").images
    print(scale, aggregate([check_image(im, p) for im, p in zip(out, prompts)]), flush=True)
    if scale:
        sq.unload_lora(pipe.transformer)
