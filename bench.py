"""
The plan and the benchmarks of a training run: what train.py prints at start-up (parameters, FLOPs, memory per GPU,
what fits), what `train.py --dry_run=True` prints without data or weights, what `train.py --bench=True` measures,
and the loss-curve PNG written at each evaluation. Imports no script: train.py passes what it built.
"""

import json
import os
import re
import time

import torch

import opcount

# dense bf16 tensor-core peak FLOP/s by a substring of torch.cuda.get_device_name: opcount.GPUS holds the datasheet
# figures (one table); the names here are what CUDA reports ("NVIDIA H100 80GB HBM3" is the SXM part)
_P = {k: v[0] for k, v in opcount.GPUS.items()}
PEAK_BF16_FLOPS = {"H100 PCIe": _P["H100 PCIe"], "H100": _P["H100 SXM"], "H200": _P["H200"], "H800": _P["H100 SXM"],
                   "GH200": _P["H100 SXM"], "A100": _P["A100 80GB"], "A800": _P["A100 80GB"], "L40S": _P["L40S"],
                   "RTX 4090": _P["RTX 4090"], "B200": 2250e12}
def flops_per_sample(cfg, tokens):
    """Model FLOPs per training sample (forward + backward = 3x forward; recomputation from activation
    checkpointing not counted, as MFU is usually quoted): per-token matmuls (self-attention q/k/v/out and the
    MLP; cross-attention is skipped with the all-zero text of action models) plus the joint self-attention."""
    D, L = cfg.model_channels, cfg.num_blocks
    per_token = 2 * L * (4 * D * D + 2 * D * D * cfg.mlp_ratio)
    attn = L * 4 * tokens * tokens * D                                          # QK^T and AV over all tokens
    return 3 * (per_token * tokens + attn)


def peak_flops(device):
    """Dense bf16 peak of a CUDA device (None on CPU or an unknown GPU: no MFU is printed)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def memory_plan(cfg, n_params, n_trainable, saved, batch_size, shards=1, ema_params=None, frozen_bytes=4,
                autocast_copies=False, fsdp=False):
    """Bytes per GPU of the model state and the activations. Trainable weights are fp32 masters with an fp32
    gradient and two fp32 AdamW moments; frozen weights take frozen_bytes each (2 for a bf16 frozen base under
    LoRA); the EMA is fp32 (ema_params: how many it covers, default all). FSDP shards all of it `shards` ways and
    adds the bf16 copies of the two blocks gathered at a time. Activations come from the op count
    (opcount.saved_activations of one sample, `saved` = {checkpointing: (activation, parameter bytes)}), times the
    batch, plus autocast's bf16 copies of the fp32 weights the backward keeps (autocast_copies: no FSDP, no bf16
    base); with per-block checkpointing, one block's worth more while it is recomputed."""
    frozen = n_params - n_trainable
    ema_n = n_params if ema_params is None else ema_params
    plan = {"weights": (4 * n_trainable + frozen_bytes * frozen) / shards,
            "grads": 4 * n_trainable / shards,
            "optimizer": 8 * n_trainable / shards,
            "ema": 4 * ema_n / shards,
            "gathered": 2 * 2 * n_params / cfg.num_blocks if fsdp else 0}
    plan["model_state"] = sum(plan.values())
    (act, copies), (act_ckpt, _) = saved[False], saved[True]
    copies = copies if autocast_copies else 0
    plan["activations"] = act * batch_size + copies
    plan["activations_checkpointed"] = (act_ckpt + act / cfg.num_blocks) * batch_size + copies / cfg.num_blocks
    return plan


def fits_verdict(est_bytes, cards=(24, 48, 80), reserve_gb=3.0):
    """Which card sizes the estimate fits, keeping reserve_gb for the CUDA context (~0.5-1 GB), the tokenizer's
    encode buffers and allocator fragmentation."""
    return ", ".join(f"{gb} GB: {'fits' if est_bytes / 2 ** 30 + reserve_gb <= gb else 'does not fit'}"
                     for gb in cards)


def summary(c, raw, tok, shapes, world, device, say=print, bf16=None):
    """The start-up summary: parallelism, parameters trainable/frozen, tokens, FLOPs, memory per GPU, what fits."""
    import lora
    cfg, G = raw.cfg, c["batch_size"] * c["grad_accum"] * world
    bf16 = (c["dtype"] == "bfloat16" or (c["dtype"] == "auto" and torch.device(device).type == "cuda")) \
        if bf16 is None else bf16
    frozen = [n for n, p in raw.named_parameters() if not p.requires_grad]
    n_all = sum(p.numel() for p in raw.parameters())
    n_train = n_all - sum(p.numel() for p in raw.parameters() if not p.requires_grad)
    fsdp = c["parallel"] == "fsdp" and world > 1
    say(f"nanocosmos train | world {world} x {torch.device(device).type} | parallel "
        f"{c['parallel'] if world > 1 else 'none'} | dtype {'bf16 autocast, fp32 master' if bf16 else 'fp32'}")
    say(f"model {c['model_size']}: {n_all / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable, "
        f"{(n_all - n_train) / 1e6:.2f}M frozen) | action {cfg.action_mode} ({cfg.action_in_features} in) | "
        f"view emb {cfg.n_views_emb} | activation ckpt {c['activation_checkpointing']} | compile {c['compile'] or 'off'}")
    if lora.enabled(raw):
        say(lora.describe(raw, c["init_from"]))
    elif frozen:   # the same names in every block are listed once as blocks.*.
        names = sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", n) for n in frozen})
        say(f"frozen (zero gradient with the all-zero text): {len(frozen)} tensors: {', '.join(names)}")
    fl = flops_per_sample(cfg, shapes.tokens)
    say(f"data: {shapes.V} views x {shapes.T} frames {shapes.H}x{shapes.W} -> latent {tok.latent_channels}x{shapes.t}"
        f"x{shapes.h}x{shapes.w} per view ({c['tokenizer']} tokenizer) | {shapes.tokens} tokens/sample | batch "
        f"{c['batch_size']} x accum {c['grad_accum']} x world {world} = {G} samples, {G * shapes.tokens} tokens/step")
    say(f"compute: {fl / 1e9:.4g} GFLOP/sample, {fl * G / 1e12:.4g} TFLOP/step (fwd + bwd, no recomputation)")
    lr = getattr(raw, "lora", None)
    n_ema = sum(p.numel() for n, p in raw.named_parameters() if p.requires_grad or not lr) if c["ema"] else 0
    frozen_bytes = 2 if lr and lr["base_dtype"] == "bfloat16" else 4
    saved = {ck: opcount.saved_activations(raw, shapes.V, shapes.T, shapes.t, shapes.h, shapes.w, ck,
                                           torch.bfloat16 if bf16 else torch.float32) for ck in (False, True)}
    m = memory_plan(cfg, n_all, n_train, saved, c["batch_size"], shards=world if fsdp else 1, ema_params=n_ema,
                    frozen_bytes=frozen_bytes, autocast_copies=bf16 and not fsdp and frozen_bytes == 4, fsdp=fsdp)
    gb = lambda b: f"{b / 2 ** 30:.2f}"  # noqa: E731
    say(f"memory per GPU: model state {gb(m['model_state'])} GB = weights {gb(m['weights'])} + grads {gb(m['grads'])}"
        f" + AdamW {gb(m['optimizer'])} + EMA {gb(m['ema'])}"
        + (f" + gathered bf16 blocks {gb(m['gathered'])} (sharded {world} ways)" if fsdp else " (replicated)")
        + f" | activations {gb(m['activations'])} GB, {gb(m['activations_checkpointed'])} GB with checkpointing"
        + (" (on)" if c["activation_checkpointing"] else " (off)"))
    n_tok = sum(p.numel() for p in tok.parameters())
    tok_bytes = n_tok * (2 if bf16 and n_tok else 4)
    say(f"tokenizer {c['tokenizer']}: {n_tok / 1e6:.1f}M params, {gb(tok_bytes)} GB, frozen")
    est = m["model_state"] + m["activations_checkpointed" if c["activation_checkpointing"] else "activations"] + tok_bytes
    say(f"plan: ~{gb(est)} GB per GPU (model state + activations + tokenizer; plus the CUDA context and the "
        f"tokenizer's encode, ~1-3 GB) | " + fits_verdict(est))
    return m


def dry_run(c, raw, tok, shapes, say=print):
    """The plan of the configured run for plan_gpus processes (torchrun's WORLD_SIZE when launched by it), from a
    model built on the meta device: nothing is read, nothing trained, no GPU needed."""
    world = int(os.environ.get("WORLD_SIZE", 0)) or c["plan_gpus"]
    summary(c, raw, tok, shapes, world, "cuda", say=say, bf16=c["dtype"] != "float32")
    compiled = bool(c["compile"])
    say(f"op count of one sample's DiT step (bf16 autocast, activation ckpt {c['activation_checkpointing']}, "
        f"{'compiled: opcount.Fusion estimate' if compiled else 'eager'}), priced on {c['plan_gpu']} (opcount.py; "
        f"roofline at 70% GEMM / 50% attention / 80% bandwidth efficiency):")
    s = shapes
    counts = opcount.count_run(raw, s.V, s.T, s.t, s.h, s.w, 1, c["activation_checkpointing"], compiled)
    opcount.report(counts, c["plan_gpu"], say=lambda s: say("  " + s))
    say(f"dry run: planned for {world} GPU(s) (plan_gpus); nothing was read or trained")
    return raw


def time_steps(step_fn, steps, warmup, flops_per_step, device, say=print, world=1, samples=None, tokens_per_sample=None):
    """Time step_fn (one full training step) `steps` times after `warmup` untimed steps; prints and returns step
    time, steps/s, samples/s and tokens/s over the world and, on a known GPU, MFU per GPU (flops_per_step: the step's model FLOPs on this process)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps + warmup):
        sync()
        t0 = time.perf_counter()
        step_fn()
        sync()
        times.append(time.perf_counter() - t0)
    dt = sum(times[warmup:]) / max(1, len(times[warmup:]))
    res = {"step_s": dt, "steps_per_s": 1 / dt}
    if samples:     # per step of this process; summed over the world's processes
        res["samples_per_s"] = samples * world / dt
        res["tokens_per_s"] = res["samples_per_s"] * (tokens_per_sample or 0)
    if peak_flops(device):
        res["mfu"] = flops_per_step / dt / peak_flops(device)
    if device.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        import resource
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    say(f"bench: {steps} steps after {warmup} warm-up: " + " | ".join(f"{k} {v:.4g}" for k, v in res.items()))
    return res


def loss_curves(log_path, png_path, size=(240, 640)):
    """A PNG of the run's curves from log.jsonl: training loss (blue), val loss (orange) and action gain (green,
    its own scale), against the step. No plotting library: lines drawn into a uint8 image."""
    import numpy as np
    from sample import write_png
    recs = [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []
    series = {(31, 119, 180): [(r["step"], r["loss"]) for r in recs if "loss" in r],
              (255, 127, 14): [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r],
              (44, 160, 44): [(r["step"], r["action_gain"]) for r in recs if "action_gain" in r]}
    H, W = size
    img = np.full((H, W, 3), 255, np.uint8)
    img[H - 11, 10:W - 10] = img[10:H - 10, 10] = 0                    # axes
    steps = [s for pts in series.values() for s, _ in pts] or [0, 1]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    for colour, pts in series.items():
        if len(pts) < 2:
            continue
        ys = np.array([y for _, y in pts], float)
        lo, hi = float(ys.min()), float(max(ys.max(), ys.min() + 1e-12))
        for (sa, ya), (sb, yb) in zip(pts, pts[1:]):
            for f in np.linspace(0, 1, 64):
                x = int(11 + (W - 22) * ((sa + f * (sb - sa)) - x0) / (x1 - x0))
                y = int(H - 12 - (H - 24) * ((ya + f * (yb - ya)) - lo) / (hi - lo))
                img[max(0, y - 1):y + 1, max(0, x - 1):x + 1] = colour
    write_png(png_path, img)
