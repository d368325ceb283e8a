"""PyTorch reference for `trainer-bench --flux`: LoRA training steps of diffusers'
FluxTransformer2DModel with PEFT adapters on the CPU, on the same transformer config (the tiny
FLUX.1-dev pipeline in tests/fixtures/flux, or any diffusers FLUX.1 folder), with the same
adapters, rank, token counts, batch size and fp32, reporting CPU seconds per step and peak RSS
as JSON.

What one step does on both sides: draw σ (kohya's resolution-shifted logit-normal) and noise,
x_σ = (1 − σ)·x₀ + σ·ε on cached packed latents, predict the velocity with the transformer
(T5 states and pooled CLIP vector cached, guidance 3.5 embedded), MSE against ε − x₀,
backward, clip the gradient norm at 1.0, AdamW (weight decay 0.01).

    flux_ref.py --model DIR [--steps N] [--resolution PX] [--text-tokens N] [--json PATH]
"""

import argparse
import json
import math
import os
import resource
import time

RANK = 16
ALPHA = 16
# loraplane's default targets (every linear layer of both block kinds).
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
           "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
           "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
           r"single_transformer_blocks.\d+.proj_out"]


def img_ids(rows, cols):
    import torch

    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(cols)[None, :]
    return ids.reshape(-1, 3)


def main():
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a diffusers FLUX.1 folder")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--json", default="flux-ref.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    t = FluxTransformer2DModel.from_pretrained(os.path.join(args.model, "transformer"))
    t.requires_grad_(False)
    # PEFT matches a plain name as a suffix and a regex against the whole path: the top-level
    # proj_out (back to latent channels) stays unadapted, as in loraplane.
    plain = [x for x in TARGETS if "\\" not in x]
    pattern = "|".join([rf".*\.{x}" for x in plain] + [rf"{TARGETS[-1]}"])
    t.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                             target_modules=f"({pattern})"))
    t.train()
    params = [p for p in t.parameters() if p.requires_grad]
    adapters = sum(1 for n, _ in t.named_modules() if n.endswith("lora_A"))
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    cfg = t.config

    side = args.resolution // 16  # latent / 2: packed tokens per side
    tokens = side * side
    latents = torch.randn(1, tokens, cfg.in_channels)
    text = torch.randn(1, args.text_tokens, cfg.joint_attention_dim)
    pooled = torch.randn(1, cfg.pooled_projection_dim)
    ids, txt_ids = img_ids(side, side), torch.zeros(args.text_tokens, 3)
    guidance = torch.tensor([3.5]) if cfg.guidance_embeds else None
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)

    def step():
        noise = torch.randn_like(latents)
        u = torch.sigmoid(torch.randn(1))
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        noisy = (1 - sigma) * latents + sigma * noise
        pred = t(hidden_states=noisy, encoder_hidden_states=text, pooled_projections=pooled,
                 timestep=sigma, img_ids=ids, txt_ids=txt_ids, guidance=guidance).sample
        loss = ((pred - (noise - latents)) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up, as trainer-bench does
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        step()
    import diffusers
    import peft

    report = {
        "implementation": "diffusers + peft on pytorch (cpu, fp32)",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "config": os.path.abspath(args.model), "resolution": args.resolution,
        "image_tokens": tokens, "text_tokens": args.text_tokens, "batch_size": 1, "rank": RANK,
        "adapters": adapters, "steps_measured": args.steps,
        "cpu_seconds_per_step": (time.process_time() - cpu0) / args.steps,
        "wall_seconds_per_step": (time.perf_counter() - wall0) / args.steps,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
