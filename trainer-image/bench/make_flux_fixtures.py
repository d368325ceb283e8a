"""Writes trainer-image/tests/fixtures/flux/: a tiny random FLUX.1 transformer made by diffusers
itself (`FluxTransformer2DModel` with random weights, saved with `save_pretrained`, so the
folder has exactly the layout and key names diffusers writes) and `reference.safetensors`:
fixed inputs and what diffusers computes from them. `tests/flux_parity.rs` loads the folder
through the trainer's own loader and must reproduce the outputs, in `make test`, without Python.

Cases (inputs and outputs in `reference.safetensors`):
- `transformer.*`: the whole transformer (double and single blocks, RoPE over (text, h, w),
  q/k RMSNorm, AdaLayerNorm modulation, guidance embedding) on packed latents, T5-like text
  states and a pooled CLIP-like vector, at one sigma and one guidance value, batch 2;
- `rope.*`: FluxPosEmbed's cos/sin tables for the ids of the case above.

    .tools/bench-venv/bin/python trainer-image/bench/make_flux_fixtures.py

(torch and diffusers from trainer-image/bench/venv.sh).
"""

import json
import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "trainer-image", "tests", "fixtures", "flux")
SEED = 20
# A FLUX.1-dev transformer in miniature: every kind of block, guidance embedding on, a
# latent of 4 channels packed 2x2 into 16 input channels per token.
CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
BATCH = 2
LATENT_HW = (8, 6)  # latent rows x columns: 4 x 3 tokens after 2x2 packing
TEXT_TOKENS = 5


def img_ids(h, w):
    """The ids FluxPipeline._prepare_latent_image_ids gives a (h/2) x (w/2) token grid."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def main():
    import diffusers
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    model = FluxTransformer2DModel(**CONFIG)
    # Random weights everywhere: diffusers initialises some projections to zero-ish values
    # that would hide a wrong modulation order.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.eval()
    folder = os.path.join(OUT, "transformer")
    model.save_pretrained(folder)

    torch.set_grad_enabled(False)
    h, w = LATENT_HW
    tokens = (h // 2) * (w // 2)
    g = torch.Generator().manual_seed(SEED + 1)
    hidden = torch.randn(BATCH, tokens, CONFIG["in_channels"], generator=g)
    text = torch.randn(BATCH, TEXT_TOKENS, CONFIG["joint_attention_dim"], generator=g)
    pooled = torch.randn(BATCH, CONFIG["pooled_projection_dim"], generator=g)
    sigma = torch.tensor([0.7, 0.25])
    guidance = torch.tensor([3.5, 1.0])
    ids_img = img_ids(h, w)
    ids_txt = torch.zeros(TEXT_TOKENS, 3)
    out = model(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=sigma, img_ids=ids_img, txt_ids=ids_txt, guidance=guidance,
                return_dict=False)[0]
    cos, sin = model.pos_embed(torch.cat([ids_txt, ids_img], dim=0))
    tensors = {
        "transformer.hidden_states": hidden,
        "transformer.encoder_hidden_states": text,
        "transformer.pooled_projections": pooled,
        "transformer.timestep": sigma,
        "transformer.guidance": guidance,
        "transformer.img_ids": ids_img,
        "transformer.txt_ids": ids_txt,
        "transformer.output": out,
        "rope.cos": cos,
        "rope.sin": sin,
    }
    save_file({k: v.contiguous().float() for k, v in tensors.items()},
              os.path.join(OUT, "reference.safetensors"),
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__,
                        "config": json.dumps(CONFIG)})
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({size} bytes): output {tuple(out.shape)}")


if __name__ == "__main__":
    main()
