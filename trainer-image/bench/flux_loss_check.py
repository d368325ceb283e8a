"""Does loraplane's FLUX.1 LoRA learn its images as well as diffusers' own LoRA training?

Trains the tiny FLUX.1-dev pipeline (tests/fixtures/flux, made by diffusers) on the same small
dataset twice with the same settings: once with the real `loraplane-trainer` binary, once with
diffusers + PEFT in PyTorch (the training step of diffusers' `train_dreambooth_lora_flux.py`:
VAE latents and prompt embeddings cached, σ uniform over the scheduler's training sigmas,
x_σ = (1 − σ)·x₀ + σ·ε, velocity target, guidance 3.5, AdamW, gradient clipping at 1.0). Then
measures, in PyTorch, the denoising loss of the base model and of both LoRAs on the training
images over a fixed grid of σ and fixed noise. Exit 1 when loraplane's LoRA lowers the loss
by less than diffusers' does (within 10 %).

    flux_loss_check.py --trainer BIN [--steps N] [--work DIR] [--json PATH]
"""

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "trainer-image" / "tests" / "fixtures" / "flux"
RESOLUTION = 64
RANK, ALPHA, LR, GUIDANCE = 4, 4.0, 1e-3, 3.5
# PEFT's default adapter init (kaiming-uniform `lora_A`, zero `lora_B`), the one loraplane uses.
# diffusers' example script asks for "gaussian", whose larger initial `lora_A` learns faster in
# the first steps; the comparison is of the training, not of the init.
INIT = True
TRIGGER = "zxqcat"
CAPTIONS = ["a photo of a cat", "a cat on a red sofa", "a cat in the snow", "a black cat",
            "a cat sleeping", "a cat portrait"]
# loraplane's default targets: every linear layer of both block kinds.
TARGETS = (r".*\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
           r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp)"
           r"|single_transformer_blocks\.\d+\.proj_out")


def images():
    from PIL import Image

    out = []
    for i in range(len(CAPTIONS)):
        img = Image.new("RGB", (RESOLUTION, RESOLUTION))
        img.putdata([((x * (3 + i)) % 256, (y * (5 + 2 * i)) % 256, (40 * i + x + y) % 256)
                     for y in range(RESOLUTION) for x in range(RESOLUTION)])
        out.append(img)
    return out


def train_loraplane(trainer, steps, work: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, (img, cap) in enumerate(zip(images(), CAPTIONS)):
            png = io.BytesIO()
            img.save(png, format="PNG")
            z.writestr(f"img{i}.png", png.getvalue())
            z.writestr(f"img{i}.txt", cap)
    (work / "dataset.zip").write_bytes(buf.getvalue())
    config = {
        "job": {"namespace": "check", "name": "flux-check", "uid": "u-flux"},
        "baseModel": {"family": "flux1", "path": str(MODEL)},
        "dataset": {"uri": str(work / "dataset.zip"),
                    "sha256": hashlib.sha256(buf.getvalue()).hexdigest()},
        "concept": {"type": "character", "triggerWord": TRIGGER},
        "training": {"steps": steps, "rank": RANK, "alpha": ALPHA, "learningRate": LR,
                     "lrScheduler": "constant", "lrWarmupSteps": 0, "batchSize": 1,
                     "resolution": RESOLUTION, "seed": 5, "checkpointEvery": steps,
                     "mixedPrecision": "fp32", "timestepSampling": "uniform",
                     "guidanceScale": GUIDANCE},
        "checkpoints": str(work / "ckpt"), "output": str(work / "out"),
        "workDir": str(work / "work"), "terminationMessagePath": str(work / "termination-log"),
        "logEvery": steps,
    }
    (work / "trainer.json").write_text(json.dumps(config))
    run = subprocess.run([trainer, "--config", str(work / "trainer.json")],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"flux_loss_check: trainer exited {run.returncode}: {run.stderr[-400:]}")
    return work / "out" / "pytorch_lora_weights.safetensors"


def cached_inputs(pipe):
    """VAE latents (shifted, scaled, packed) and prompt embeddings, as the diffusers script."""
    import torch

    import numpy as np

    pixels = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32))
                          .permute(2, 0, 1) / 127.5 - 1 for img in images()])
    vae = pipe.vae
    latents = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) \
        * vae.config.scaling_factor
    b, c, h, w = latents.shape
    packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5) \
        .reshape(b, (h // 2) * (w // 2), c * 4)
    prompts = [f"{TRIGGER}, {c}" for c in CAPTIONS]
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None,
                                                  max_sequence_length=512)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return packed, embeds, pooled, text_ids, ids.reshape(-1, 3)


def predict(t, x, sigma, embeds, pooled, text_ids, img_ids):
    import torch

    return t(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
             timestep=sigma, img_ids=img_ids, txt_ids=text_ids,
             guidance=torch.full((x.shape[0],), GUIDANCE)).sample


def train_diffusers(pipe, inputs, steps):
    import torch
    from peft import LoraConfig

    packed, embeds, pooled, text_ids, img_ids = inputs
    t = pipe.transformer
    t.requires_grad_(False)
    t.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=INIT,
                             target_modules=TARGETS))
    params = [p for p in t.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        i = step % packed.shape[0]
        x0 = packed[i:i + 1]
        noise = torch.randn(x0.shape, generator=g)
        index = int(torch.randint(0, 1000, (1,), generator=g))
        sigma = (1000 - index) / 1000
        pred = predict(t, (1 - sigma) * x0 + sigma * noise, torch.tensor([sigma]),
                       embeds[i:i + 1], pooled[i:i + 1], text_ids, img_ids)
        loss = ((pred - (noise - x0)) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return t


def denoising_loss(t, inputs):
    """Mean velocity MSE over every training image, σ in 0.1..0.9, four fixed noises each."""
    import torch

    packed, embeds, pooled, text_ids, img_ids = inputs
    g = torch.Generator().manual_seed(1234)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(packed.shape[0]):
            x0 = packed[i:i + 1]
            for sigma in [0.1 * k for k in range(1, 10)]:
                for _ in range(4):
                    noise = torch.randn(x0.shape, generator=g)
                    pred = predict(t, (1 - sigma) * x0 + sigma * noise, torch.tensor([sigma]),
                                   embeds[i:i + 1], pooled[i:i + 1], text_ids, img_ids)
                    total += ((pred - (noise - x0)) ** 2).mean().item()
                    n += 1
    return total / n


def main():
    import torch
    from diffusers import FluxPipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trainer", required=True)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--work")
    ap.add_argument("--json", default="flux-loss-check.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    ours_file = train_loraplane(args.trainer, args.steps, work)

    load = lambda: FluxPipeline.from_pretrained(str(MODEL), torch_dtype=torch.float32)  # noqa: E731
    pipe = load()
    with torch.no_grad():
        inputs = cached_inputs(pipe)
    base = denoising_loss(pipe.transformer, inputs)
    pipe.load_lora_weights(str(ours_file.parent), weight_name=ours_file.name)
    ours = denoising_loss(pipe.transformer, inputs)
    theirs = denoising_loss(train_diffusers(load(), inputs, args.steps), inputs)
    report = {"steps": args.steps, "rank": RANK, "learning_rate": LR, "images": len(CAPTIONS),
              "resolution": RESOLUTION, "loss_base": base, "loss_loraplane": ours,
              "loss_diffusers": theirs, "reduction_loraplane": base - ours,
              "reduction_diffusers": base - theirs}
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if base - ours < 0.9 * (base - theirs):
        print("flux_loss_check: loraplane's LoRA lowers the loss less than diffusers'",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
