"""Trains a tiny SD1.5, SDXL and FLUX.1-dev LoRA with the real `loraplane-trainer` binary and
loads both output files into a diffusers pipeline with `load_lora_weights`, as a customer
would (FLUX.1: `FluxPipeline`, whose loader converts the kohya file's Black Forest Labs names
and splits its fused q/k/v back).

Fails (exit 1, one line per problem) when diffusers reports unexpected or missing LoRA keys,
when a file does not load, or when loading leaves the trained network's output unchanged (the
adapters did not land on any layer). Run through `check_diffusers_load.sh`, which builds the binaries
and the venv.

    python check_diffusers_load.py --trainer BIN --models DIR --work DIR
"""

import argparse
import hashlib
import io
import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging

FAMILIES = {"sd15": 64, "sdxl": 64, "flux1": 64}


def dataset(path: Path) -> str:
    """Six small PNGs with captions; returns the zip's sha256."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(6):
            img = Image.new("RGB", (80, 72), (40 * i % 256, 90, 200 - 20 * i))
            png = io.BytesIO()
            img.save(png, format="PNG")
            z.writestr(f"img{i}.png", png.getvalue())
            z.writestr(f"img{i}.txt", "a photo of a cat")
    data = buf.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def train(trainer: str, family: str, model: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    zip_path = work / "dataset.zip"
    sha = dataset(zip_path)
    config = {
        "job": {"namespace": "check", "name": f"check-{family}", "uid": f"u-{family}"},
        "baseModel": {"family": family, "path": str(model)},
        "dataset": {"uri": str(zip_path), "sha256": sha},
        "concept": {"type": "character", "triggerWord": "zxqcat"},
        "training": {
            "steps": 4, "rank": 4, "alpha": 2.0, "learningRate": 0.01,
            "lrScheduler": "constant", "lrWarmupSteps": 0, "batchSize": 2,
            "resolution": FAMILIES[family], "seed": 3, "checkpointEvery": 4,
            "mixedPrecision": "fp32",
        },
        "checkpoints": str(work / "ckpt"),
        "output": str(work / "out"),
        "workDir": str(work / "work"),
        "terminationMessagePath": str(work / "termination-log"),
        "logEvery": 1,
    }
    cfg = work / "trainer.json"
    cfg.write_text(json.dumps(config))
    run = subprocess.run([trainer, "--config", str(cfg)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{family}: trainer exited {run.returncode}: {run.stderr.strip()[-500:]}")
    return json.loads((work / "termination-log").read_text())


class Collect(logging.Handler):
    """Keeps diffusers/peft warnings: unexpected or missing keys are reported as warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def key_problem(message: str) -> bool:
    """Whether a diffusers/PEFT warning says LoRA keys did not match the model. "No LoRA keys
    associated to CLIPTextModel…" is expected (only the UNet is trained); the same about the
    UNet is not."""
    m = message.lower()
    if "unexpected key" in m or "missing key" in m:
        return True
    trained = "unet" in m or "transformer" in m
    return m.startswith("no lora keys associated to") and trained


def network_output(pipe, family: str) -> torch.Tensor:
    """The trained network's output (UNet, or FLUX.1's transformer) on fixed random inputs."""
    if family == "flux1":
        return transformer_output(pipe)
    unet = pipe.unet
    cfg = unet.config
    torch.manual_seed(0)
    size = 8
    sample = torch.randn(1, cfg.in_channels, size, size)
    text = torch.randn(1, 77, cfg.cross_attention_dim)
    kwargs = {}
    if family == "sdxl":
        # The tiny SDXL's add-embedding input is pooled text (text_encoder_2's projection) plus
        # six time ids, each embedded with addition_time_embed_dim.
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=text, **kwargs).sample


def transformer_output(pipe) -> torch.Tensor:
    t = pipe.transformer
    cfg = t.config
    torch.manual_seed(0)
    tokens, text = 16, 5
    ids = torch.zeros(tokens, 3)
    ids[:, 1] = torch.arange(tokens) // 4
    ids[:, 2] = torch.arange(tokens) % 4
    with torch.no_grad():
        return t(hidden_states=torch.randn(1, tokens, cfg.in_channels),
                 encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim),
                 pooled_projections=torch.randn(1, cfg.pooled_projection_dim),
                 timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(text, 3),
                 guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None).sample


def sized_kohya_flux_converter(inner_dim: int):
    """diffusers' converter of kohya FLUX.1 files hard-codes the published model's widths for
    the single blocks' fused linear1 (3072 x 3, 12288); a tiny model has other widths. This is
    the same converter with those two numbers set to the tiny model's, nothing else changed,
    so its splitting of the fused, block-diagonal adapters is what the check exercises."""
    import inspect

    from diffusers.loaders import lora_conversion_utils as lcu

    src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    src = src.replace("dims=[3072, 3072, 3072, 12288]",
                      f"dims=[{inner_dim}, {inner_dim}, {inner_dim}, {4 * inner_dim}]")
    namespace = dict(vars(lcu))
    exec(src, namespace)  # noqa: S102 - diffusers' own source, two constants changed
    return namespace["_convert_kohya_flux_lora_to_diffusers"]


def check(family: str, model: Path, out: Path) -> list[str]:
    problems = []
    outputs = {}
    files = {
        "diffusers": out / "pytorch_lora_weights.safetensors",
        "kohya": next(
            (p for p in sorted(out.glob("*.safetensors")) if p.name != "pytorch_lora_weights.safetensors"),
            None,
        ),
    }
    for fmt, path in files.items():
        if path is None or not path.exists():
            problems.append(f"{family}/{fmt}: no output file in {out}")
            continue
        diffusers_logging.set_verbosity_error()
        pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
        diffusers_logging.set_verbosity_warning()
        before = network_output(pipe, family)
        if family == "flux1" and fmt == "kohya":
            from diffusers.loaders import lora_pipeline

            t = pipe.transformer.config
            lora_pipeline._convert_kohya_flux_lora_to_diffusers = sized_kohya_flux_converter(
                t.num_attention_heads * t.attention_head_dim)
        sink = Collect()
        loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
        for lg in loggers:
            lg.addHandler(sink)
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="check")
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{family}/{fmt}: load_lora_weights failed: {e}")
            continue
        finally:
            for lg in loggers:
                lg.removeHandler(sink)
        keys = [m for m in sink.messages if key_problem(m)]
        if keys:
            problems.append(f"{family}/{fmt}: diffusers reported: {' | '.join(keys)[:400]}")
        after = network_output(pipe, family)
        outputs[fmt] = after
        delta = (after - before).abs().max().item()
        if not delta > 0:
            problems.append(f"{family}/{fmt}: loading changed nothing in the network's output")
        print(f"{family}/{fmt}: {path.name} loaded with load_lora_weights, "
              f"{len(sink.messages)} warnings, network output moved by {delta:.3g}")
    if len(outputs) == 2:
        # Both files carry the same update: the network must compute the same with either.
        gap = (outputs["kohya"] - outputs["diffusers"]).abs().max().item()
        print(f"{family}: kohya and diffusers files give outputs {gap:.3g} apart")
        if gap > 1e-4:
            problems.append(f"{family}: the two files change the network differently ({gap:.3g})")
    return problems


def main() -> int:
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # Loading the tiny models warns about weights they do not carry (the SDXL VAE decoder,
    # which training never runs); only what load_lora_weights says is checked.
    transformers_logging.set_verbosity_error()
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", required=True)
    ap.add_argument("--models", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    args = ap.parse_args()
    problems = []
    for family in FAMILIES:
        summary = train(args.trainer, family, args.models / family, args.work / family)
        if summary.get("outcome") != "succeeded":
            problems.append(f"{family}: trainer outcome {summary.get('outcome')}")
            continue
        problems += check(family, args.models / family, args.work / family / "out")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
