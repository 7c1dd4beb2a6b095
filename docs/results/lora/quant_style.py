"""Style adherence of a quantized variant + outlined LoRA (scale 2), same prompts/seed as quick_style.py."""
import sys
import torch
import segquant_core as sq
from segquant_shapes import load_shipped, shipped_pipeline_path
from segquant_shapes.adherence import aggregate, check_image
from segquant_shapes.attributes import restyle
from segquant_shapes.captions import canonical_caption
from segquant_shapes.data import generate_examples
from segquant_shapes.splits import held_out_scenes
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from denoiser_fidelity import calls

torch.set_num_threads(2)
pipe = load_shipped("mmdit"); pipe.set_progress_bar_config(disable=True)
ex = generate_examples(16, seed=5)
sq.quantize(pipe.transformer, sys.argv[1], calls([e.image for e in ex], [e.caption for e in ex], (0.2, 0.5, 0.8), seed=2), progress=False)
sq.load_lora(pipe.transformer, shipped_pipeline_path("mmdit") / "loras" / "outlined", "o", scale=2.0)
prompts = [canonical_caption(restyle(s, "outlined")) for s in held_out_scenes()[:8]]
out = pipe(prompts, generator=[torch.Generator().manual_seed(0) for _ in prompts], num_inference_steps=20,
           guidance_scale=3.0, output_type="pil").images
print(sys.argv[1], aggregate([check_image(im, p) for im, p in zip(out, prompts)]), flush=True)
