"""The GPU check: loraplane's LoRA training steps against diffusers + PEFT on one GPU.

gpu-check.sh runs this with the GPU machine's python3 (which has torch, peft and transformers;
diffusers comes carried as a wheel). The orchestration uses the standard library only, so
`--dry-run` works with any python3 and no torch: it is what `make test` runs.

    gpu_check.py check --bench-bin TRAINER_BENCH --work DIR --json OUT [--dry-run | --cpu] [--budget S]
    gpu_check.py reference DIR --device cuda|cpu [--checkpointing] [--dry-run] --json OUT

`check`, for each case (SD1.5 at 512 px; SDXL at 1024 px with gradient checkpointing on both
sides, as the trainer defaults to on a GPU; tiny models at 64 px on the CPU with --dry-run):
1. `trainer-bench --gpu-check-inputs` writes a random UNet in diffusers' layout and a batch file
   (a latent, its text conditioning, per step the noise and the timestep);
2. `trainer-bench --gpu-check-steps` trains it with rank-16 adapters in bf16 (f32 on the CPU)
   and writes its adapters' initial down matrices;
3. `gpu_check.py reference` trains the same UNet from the same files with PEFT adapters (lora_A
   from loraplane's init, lora_B zero, so both start from the same adapters), bf16 autocast with
   f32 adapters as accelerate's mixed_precision="bf16" runs diffusers' LoRA scripts, AdamW
   (lr 1e-4, weight decay 0.01), the gradient norm clipped at 1.0, min-SNR-5 weighted MSE;
4. each side's peak GPU memory is sampled with nvidia-smi (device memory in use, less what was
   in use before it started: the same measure for both), each side is one process.
The report has, per case, both sides' step times (median after the first step), peak memory,
losses, and the ratios. A case that fails or runs out of time is reported with its error and
the next one still runs, so a lent machine's minutes always give a report.

`check --cpu` runs the tiny cases with both sides training for real on the CPU in f32, where a
machine has torch and diffusers but no GPU (`.tools/bench-venv`, from bench/venv.sh): there the
two implementations' losses agree to f32 rounding, which checks the reference's code path too.

`reference --dry-run` imports no torch: it checks what a real run would read (the batch's
shapes against the UNet config, and that PEFT's target list selects exactly the modules
loraplane put adapters on) and reports that with no figures.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import threading
import time

# What PEFT puts adapters on: the modules loraplane's UNet adapts (checked in every dry run).
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
RANK = 16
ALPHA = 16
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
MIN_SNR_GAMMA = 5.0

# name, family, size, resolution, gradient checkpointing, steps
GPU_CASES = [
    ("sd15-512", "sd15", "full", 512, False, 8),
    ("sdxl-1024", "sdxl", "full", 1024, True, 6),
]
TINY_CASES = [
    ("tiny-sd15-64", "sd15", "tiny", 64, False, 3),
    ("tiny-sdxl-64", "sdxl", "tiny", 64, True, 3),
]


class CheckError(Exception):
    pass


def safetensors_header(path):
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}}."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckError(f"reading {path}: {e}") from e
    header.pop("__metadata__", None)
    return header


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def peft_selects(module):
    """Whether PEFT's `target_modules` list selects a module of this name (its rule for a list
    of names: the whole name, or its last dotted components)."""
    return any(module == t or module.endswith("." + t) for t in TARGETS)


def expected_batch(cfg, resolution, steps):
    """The tensors (name -> (dtype, shape)) a batch for this UNet config must hold."""
    side = resolution // 8
    ch = cfg.get("in_channels", 4)
    cross = cfg["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, list) else cross
    want = {
        "latents": ("F32", [1, ch, side, side]),
        "noise": ("F32", [steps, 1, ch, side, side]),
        "timesteps": ("I64", [steps]),
        "encoder_hidden_states": ("F32", [1, 77, cross]),
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        want["text_embeds"] = ("F32", [1, pooled])
        want["time_ids"] = ("F32", [1, 6])
    return want


def check_inputs(work, resolution):
    """Validates the files a reference run reads; returns what they describe."""
    with open(os.path.join(work, "unet", "config.json")) as f:
        cfg = json.load(f)
    batch = safetensors_header(os.path.join(work, "batch.safetensors"))
    steps = batch.get("timesteps", {}).get("shape", [0])[0]
    for name, (dtype, shape) in expected_batch(cfg, resolution, steps).items():
        got = batch.get(name)
        if got is None or got["dtype"] != dtype or got["shape"] != shape:
            raise CheckError(f"batch tensor {name}: want {dtype} {shape}, found {got}")
    weights = safetensors_header(os.path.join(work, "unet", "diffusion_pytorch_model.safetensors"))
    modules = {k[: -len(".weight")]: v["shape"] for k, v in weights.items() if k.endswith(".weight")}
    selected = {m for m in modules if peft_selects(m)}
    init = safetensors_header(os.path.join(work, "lora_init.safetensors"))
    adapted = {k[: -len(".lora_A.weight")]: v["shape"] for k, v in init.items()}
    if set(adapted) != selected:
        only_ours = sorted(set(adapted) - selected)[:5]
        only_peft = sorted(selected - set(adapted))[:5]
        raise CheckError(
            f"adapters differ: loraplane only {only_ours}, PEFT only {only_peft} "
            f"({len(adapted)} vs {len(selected)})")
    trainable = 0
    for m, shape in adapted.items():
        w = modules[m]
        if shape != [RANK, w[1]]:
            raise CheckError(f"{m}: lora_A {shape} does not fit the weight {w} at rank {RANK}")
        trainable += RANK * (w[0] + w[1])
    return {
        "steps": steps,
        "unet_parameters": sum(numel(v["shape"]) for v in weights.values()),
        "adapters": len(adapted),
        "trainable_parameters": trainable,
    }


def reference(work, device, checkpointing, resolution):
    """Trains the UNet in `work` with diffusers + PEFT; returns the figures."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from safetensors.torch import load_file

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(work, "unet"), torch_dtype=dtype)
    unet.to(dev)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                target_modules=TARGETS))
    init = load_file(os.path.join(work, "lora_init.safetensors"))
    adapters = 0
    with torch.no_grad():
        for name, module in unet.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is None or "default" not in lora_a:
                continue
            a = lora_a["default"].weight
            a.copy_(init[f"{name}.lora_A.weight"].reshape(a.shape))
            module.lora_B["default"].weight.zero_()
            adapters += 1
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # f32 adapters, as diffusers' scripts' cast_training_params
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    batch = load_file(os.path.join(work, "batch.safetensors"), device=str(dev))
    acp = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear").alphas_cumprod.to(dev)
    context = batch["encoder_hidden_states"].to(dtype)
    added = None
    if "text_embeds" in batch:
        added = {"text_embeds": batch["text_embeds"].to(dtype), "time_ids": batch["time_ids"].to(dtype)}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load_seconds = time.perf_counter() - t0

    step_seconds, losses = [], []
    for i in range(batch["timesteps"].shape[0]):
        s0 = time.perf_counter()
        t = batch["timesteps"][i : i + 1]
        eps = batch["noise"][i]
        ab = acp[t].view(-1, 1, 1, 1)
        noisy = (ab.sqrt() * batch["latents"] + (1 - ab).sqrt() * eps).to(dtype)
        with torch.autocast(device_type=dev.type, dtype=dtype, enabled=cuda):
            pred = unet(noisy, t, context, added_cond_kwargs=added).sample
        snr = acp[t] / (1 - acp[t])
        weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
        loss = (((pred.float() - eps) ** 2).mean() * weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - s0)
    out = {
        "implementation": "diffusers + peft (pytorch)",
        "device": device,
        "dtype": "bf16" if dtype == torch.bfloat16 else "f32",
        "gradient_checkpointing": checkpointing,
        "attention": "diffusers default (F.scaled_dot_product_attention)",
        "rank": RANK,
        "adapters": adapters,
        "trainable_parameters": sum(p.numel() for p in params),
        "load_seconds": load_seconds,
        "step_seconds": step_seconds,
        "median_step_seconds": median(step_seconds[1:]),
        "losses": losses,
    }
    if cuda:
        out["torch_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["torch_max_memory_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def median(xs):
    if not xs:
        return None
    v = sorted(xs)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def gpu_memory_used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                          "--id=0"], capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise CheckError(f"nvidia-smi failed: {out.stderr.strip()}")
    return float(out.stdout.strip().splitlines()[0])


def run_measured(cmd, timeout, sample_gpu):
    """Runs one side as its own process (which writes its own JSON); returns its peak GPU
    memory in MiB over the baseline when `sample_gpu`, else None."""
    peak = [None]
    stop = threading.Event()
    if sample_gpu:
        base = gpu_memory_used_mib()

        def sample():
            top = base
            while not stop.wait(0.1):
                try:
                    top = max(top, gpu_memory_used_mib())
                except (CheckError, subprocess.TimeoutExpired):
                    pass
            peak[0] = top - base

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise CheckError(f"{os.path.basename(cmd[0])} ran past {timeout:.0f} s") from e
    finally:
        stop.set()
        if sample_gpu:
            sampler.join()
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CheckError(f"{' '.join(cmd[:2])} failed ({proc.returncode}): {' | '.join(tail)}")
    return peak[0]


def ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def run_case(args, case, deadline):
    name, family, size, resolution, checkpointing, steps = case
    work = os.path.join(args.work, name)
    os.makedirs(work, exist_ok=True)
    device = "cpu" if args.dry_run or args.cpu else "cuda"
    sample_gpu = device == "cuda"
    left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
    result = {"name": name, "family": family, "size": size, "resolution": resolution, "rank": RANK,
              "batch_size": 1, "steps": steps, "gradient_checkpointing": checkpointing}
    bench = [args.bench_bin]
    run_measured(bench + ["--gpu-check-inputs", work, "--family", family, "--size", size,
                          "--resolution", str(resolution), "--steps", str(steps), "--seed", "7"],
                 left(), False)
    ours_json = os.path.join(work, "loraplane.json")
    cmd = bench + ["--gpu-check-steps", work, "--device", device,
                   "--json", ours_json] + (["--checkpointing"] if checkpointing else [])
    peak = run_measured(cmd, left(), sample_gpu)
    with open(ours_json) as f:
        result["loraplane"] = json.load(f)
    result["loraplane"]["peak_gpu_memory_mib"] = peak

    theirs_json = os.path.join(work, "diffusers.json")
    cmd = [sys.executable, os.path.abspath(__file__), "reference", work, "--device", device,
           "--resolution", str(resolution), "--json", theirs_json]
    cmd += (["--checkpointing"] if checkpointing else []) + (["--dry-run"] if args.dry_run else [])
    peak = run_measured(cmd, left(), sample_gpu)
    with open(theirs_json) as f:
        result["diffusers"] = json.load(f)
    result["diffusers"]["peak_gpu_memory_mib"] = peak

    ours, theirs = result["loraplane"], result["diffusers"]
    if ours["adapters"] != theirs["adapters"] or ours["trainable_parameters"] != theirs["trainable_parameters"]:
        raise CheckError(f"the sides train different adapters: {ours['adapters']} adapters, "
                         f"{ours['trainable_parameters']} parameters vs {theirs['adapters']}, "
                         f"{theirs['trainable_parameters']}")
    result["step_time_ratio"] = ratio(ours["median_step_seconds"], theirs.get("median_step_seconds"))
    result["peak_memory_ratio"] = ratio(ours["peak_gpu_memory_mib"], theirs["peak_gpu_memory_mib"])
    if theirs.get("losses"):
        rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours["losses"], theirs["losses"])]
        result["first_loss_relative_difference"] = rel[0]
        result["loss_max_relative_difference"] = max(rel)
    return result


def environment(args):
    env = {"python": sys.version.split()[0]}
    if args.dry_run:
        return env
    if not args.cpu:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader", "--id=0"], capture_output=True, text=True)
        env["gpu"] = out.stdout.strip()
    probe = ("import torch, diffusers, peft; "
             "print(torch.__version__, diffusers.__version__, peft.__version__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckError(f"the reference needs torch, diffusers and peft: {out.stderr.strip()[-300:]}")
    env["torch"], env["diffusers"], env["peft"] = out.stdout.split()
    return env


def check(args):
    deadline = time.monotonic() + args.budget
    report = {"check": "loraplane gpu-check", "dry_run": args.dry_run, "cpu": args.cpu,
              "cases": []}
    try:
        report["environment"] = environment(args)
    except (CheckError, OSError) as e:
        # Still a report: it says what is missing.
        report["environment"] = {"error": str(e)}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"gpu-check: {e}", file=sys.stderr)
        return 1
    for case in TINY_CASES if args.dry_run or args.cpu else GPU_CASES:
        start = time.monotonic()
        try:
            result = run_case(args, case, deadline)
        except (CheckError, OSError, ValueError, KeyError) as e:
            result = {"name": case[0], "error": str(e)}
        result["wall_seconds"] = time.monotonic() - start
        report["cases"].append(result)
        print(json.dumps({k: result.get(k) for k in ("name", "error", "step_time_ratio",
                                                     "peak_memory_ratio", "wall_seconds")}),
              file=sys.stderr)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    failed = [c["name"] for c in report["cases"] if "error" in c]
    if failed:
        print(f"gpu-check: cases failed: {', '.join(failed)} (see {args.json})", file=sys.stderr)
        return 1
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--bench-bin", required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--json", required=True)
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true")
    mode.add_argument("--cpu", action="store_true", help="tiny cases, both sides for real on the CPU")
    c.add_argument("--budget", type=float, default=480.0, help="seconds for all cases")
    r = sub.add_parser("reference")
    r.add_argument("work")
    r.add_argument("--device", default="cuda")
    r.add_argument("--resolution", type=int, required=True)
    r.add_argument("--checkpointing", action="store_true")
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--json", required=True)
    args = ap.parse_args()
    try:
        if args.cmd == "check":
            return check(args)
        facts = check_inputs(args.work, args.resolution)
        if args.dry_run:
            out = {"implementation": "diffusers + peft (dry run: inputs checked, nothing trained)",
                   "gradient_checkpointing": args.checkpointing, "rank": RANK,
                   "median_step_seconds": None, "losses": [], **facts}
        else:
            out = reference(args.work, args.device, args.checkpointing, args.resolution)
            out["unet_parameters"] = facts["unet_parameters"]
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        return 0
    except CheckError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
