"""Writes trainer-image/tests/fixtures/previews.safetensors: what diffusers itself renders from
the tiny random SD1.5 and SDXL models the trainer's tests build (same writer, same seed), so
`tests/preview_parity.rs` can check the trainer's VAE decoder, samplers and guidance against
diffusers in `make test` without Python.

For each family: the VAE decoder's output for fixed latents, and the whole pipeline's image
(Euler and DDIM, 3 steps, guidance 5, 64 px) for a fixed prompt from fixed `latents=`. The
inputs are formulas both sides compute (see `wave`), so only the outputs are stored.

    .tools/bench-venv/bin/python trainer-image/bench/make_preview_fixtures.py

(needs the Rust toolchain to write the models, and torch, diffusers and transformers:
trainer-image/bench/venv.sh).
"""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "trainer-image", "tests", "fixtures", "previews.safetensors")
# Must match tests/preview_parity.rs.
SEED = 9
PROMPT = "a photo of zxq dog"
STEPS = 3
GUIDANCE = 5.0
SIZE = 64
LATENT = (1, 4, 8, 8)


def wave(shape, a, b, scale):
    """scale * sin(a * i + b) over the flat index i, row-major."""
    import torch

    n = 1
    for d in shape:
        n *= d
    i = torch.arange(n, dtype=torch.float64)
    return (torch.sin(a * i + b) * scale).to(torch.float32).reshape(shape)


def main():
    import diffusers
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline)
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("sd15", "sdxl"):
            model = os.path.join(tmp, family)
            subprocess.run(
                ["cargo", "run", "--quiet", "-p", "loraplane-trainer", "--bin", "trainer-bench", "--",
                 "--write-tiny-model", model, "--family", family, "--seed", str(SEED)],
                cwd=ROOT, check=True)
            vae = AutoencoderKL.from_pretrained(os.path.join(model, "vae"))
            z = wave(LATENT, 0.37, 0.5, 1.2)
            out[f"{family}.vae_decode"] = vae.decode(z / vae.config.scaling_factor).sample.contiguous()

            if family == "sd15":
                pipe = StableDiffusionPipeline.from_pretrained(
                    model, safety_checker=None, requires_safety_checker=False)
            else:
                pipe = StableDiffusionXLPipeline.from_pretrained(model)
            pipe.set_progress_bar_config(disable=True)
            for name, kind in (("euler", EulerDiscreteScheduler), ("ddim", DDIMScheduler)):
                pipe.scheduler = kind.from_config(pipe.scheduler.config)
                image = pipe(
                    prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    height=SIZE, width=SIZE, latents=wave(LATENT, 0.61, 0.3, 1.1),
                    output_type="pt",
                ).images
                out[f"{family}.{name}"] = image.contiguous()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(out, OUT, metadata={"diffusers": diffusers.__version__, "torch": torch.__version__,
                                  "prompt": PROMPT, "steps": str(STEPS), "guidance": str(GUIDANCE)})
    print(f"wrote {OUT}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(out.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
