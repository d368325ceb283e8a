"""PyTorch reference for trainer-bench: LoRA training steps of diffusers' UNet2DConditionModel
with PEFT adapters on CPU, on the same UNet configurations, with the same rank, targets,
resolution, batch size and fp32, reporting CPU seconds per step and peak RSS as JSON.

Run it through run_pytorch_ref.sh (which makes the venv). The UNet configs are the ones
`trainer-bench --unet-configs DIR` writes, so both sides build the identical architecture
(random weights, nothing downloaded). What one step does on both sides: draw noise and a
timestep per sample, DDPM-noise the cached latents, predict epsilon with the UNet, min-SNR-5
weighted MSE, backward, clip the gradient norm at 1.0, AdamW (weight decay 0.01).

    pytorch_ref.py --configs DIR [--steps N] [--full-sd15] [--full-steps N] [--json PATH]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# Latent side = resolution / 8, as the VAE downsamples by 8.
TINY_RESOLUTION = 64
FULL_RESOLUTION = 512
RANK = 16
ALPHA = 16
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TOKENS = 77


def measure(config_path, name, steps, resolution, batch):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    with open(config_path) as f:
        cfg = json.load(f)
    unet = UNet2DConditionModel.from_config(cfg)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    adapters = sum(1 for n, _ in unet.named_modules() if n.endswith("lora_A"))
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    alphas_cumprod = sched.alphas_cumprod

    side = resolution // 8
    cross = cfg["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, list) else cross
    latents = torch.randn(batch, cfg.get("in_channels", 4), side, side)
    context = torch.randn(batch, TEXT_TOKENS, cross)
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {
            "text_embeds": torch.randn(batch, pooled),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                     dtype=torch.float32),
        }

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, context, added_cond_kwargs=added).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = torch.clamp(snr, max=5.0) / snr
        per_sample = ((pred - noise) ** 2).flatten(1).mean(1)
        loss = (per_sample * weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: first-touch allocations, as trainer-bench does
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    cpu = (time.process_time() - cpu0) / steps
    wall = (time.perf_counter() - wall0) / steps
    return {
        "config": name,
        "resolution": resolution,
        "batch_size": batch,
        "rank": RANK,
        "adapters": adapters,
        "steps_measured": steps,
        "cpu_seconds_per_step": cpu,
        "wall_seconds_per_step": wall,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", required=True, help="directory from trainer-bench --unet-configs")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--full-sd15", action="store_true", help="also the full SD1.5 UNet at 512 px")
    ap.add_argument("--full-steps", type=int, default=3)
    ap.add_argument("--only-full", action="store_true", help="skip the tiny configurations")
    ap.add_argument("--json", default="pytorch-ref.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    runs = {
        "tiny-sd15": (args.steps, TINY_RESOLUTION),
        "tiny-sdxl": (args.steps, TINY_RESOLUTION),
        "full-sd15": (args.full_steps, FULL_RESOLUTION),
    }
    if args.one:
        steps, res = runs[args.one]
        path = os.path.join(args.configs, f"{args.one}.json")
        print(json.dumps(measure(path, args.one, steps, res, 1)))
        return 0

    names = [] if args.only_full else ["tiny-sd15", "tiny-sdxl"]
    if args.full_sd15 or args.only_full:
        names.append("full-sd15")
    results = []
    # One child process per configuration, so each peak RSS is its own.
    for name in names:
        cmd = [sys.executable, __file__, "--configs", args.configs, "--one", name,
               "--steps", str(args.steps), "--full-steps", str(args.full_steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(f"pytorch_ref: {name} failed:\n{out.stderr}")
            return 1
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)

    import diffusers
    import peft
    import torch

    report = {
        "implementation": "diffusers + peft on pytorch (cpu, fp32)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "attention": "diffusers default (AttnProcessor2_0: F.scaled_dot_product_attention)",
        "results": results,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
