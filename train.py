"""
Post-train a Cosmos-Predict2/2.5 DiT into a multi-view, action-conditioned robot world model.

    python train.py                                            # tiny model, synthetic world, CPU, a few minutes
    python train.py config/multiview_action.py --batch_size=2  # a preset plus overrides
    torchrun --nproc_per_node=8 train.py config/multiview_action.py

Rectified flow as the released models were trained (shared/spec/dit.md 7): conditioned latent frames are
fed clean, the network predicts the velocity eps - x0 of the rest at a logit-normal t, velocity MSE.
Checkpoints: torch.distributed.checkpoint under out_dir/checkpoints/iter_XXXXXXXXX (atomic, resumable
with any process count); `python convert.py` turns them into the official files.
"""

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from einops import rearrange

import configurator
import model
from model import DiT, DiTConfig

# -----------------------------------------------------------------------------
# default config: a tiny model on the built-in synthetic multi-camera world (CPU, minutes)
# I/O
out_dir = "out/synthetic"
init_from = ""                 # "": from scratch | official .pt / safetensors / nanocosmos checkpoint to start from
init_ema = True                # with init_from: take EMA weights (net_ema.) when the file has both
resume = True                  # resume from out_dir/checkpoints/latest_checkpoint.txt when present
save_interval = 200
keep_last = 2                  # training checkpoints kept (consolidated model/*.pt files are all kept)
save_consolidated = True       # also write checkpoints/model/iter_X.pt ({"net.<key>": fp32 EMA}, official format)
log_interval = 25
eval_interval = 200
eval_batches = 4
sample_interval = 0            # >0: write a rollout mp4 of a val episode every N steps (sample.py)
# data
data_root = "datasets/synthetic"
synth_if_missing = True        # data_root missing: generate the synthetic world there (False: it is an error)
synth_episodes = 48
cameras = (0, 1)
num_frames = 13                # pixel frames per clip: 1 + 4k (13 -> 4 latent frames)
frame_size = (64, 80)          # (H, W) every camera is resized to
frame_stride = 1
start_stride = 1
action_scale = 20.0
gripper_scale = 1.0
fps = 4                        # what the net is told (Cosmos uses 4 for Bridge) and the mp4 rate
num_workers = 2
train_split = "train"
val_split = "val"
# tokenizer
tokenizer = "pixel"            # "pixel" (tiny CPU presets) | "wan2.1"
tokenizer_path = ""            # wan2.1: path to tokenizer.pth (random weights if empty: benchmarks only)
pixel_factor = 8               # pixel tokenizer: spatial downsampling
# model
model_size = "tiny"            # "tiny" | "small" | "2B" | "14B"; the keys below override the preset when nonzero
model_channels = 0
num_blocks = 0
num_heads = 0
action_mode = "per_frame"      # "none" | "global" (Predict2, 12x7 -> 84) | "per_frame" (Predict2.5 robot, 4x7 -> 28)
action_dim = 7
n_views_emb = 7                # 0: no view embedding (single-camera models)
crossattn_proj_in_channels = 0 # 100352 for Predict2.5 checkpoints
timestep_scale = 1.0           # 0.001 for Predict2.5 checkpoints
rope_t_extrapolation_ratio = 1.0
rope_enable_fps_modulation = False
# objective
cond_latents = 1               # conditioned latent frames per view
cond_t = -1.0                  # t of conditioned frames; <0: same t as the rest (Predict2.5 action); Predict2: 9.999e-5
t_shift = 2.0                  # logit-normal shift: Predict2 sqrt(latent frames)=2, Predict2.5 5
# optimizer
max_iters = 1200
batch_size = 8                 # per process, per micro-step
grad_accum = 1
lr = 1e-3
min_lr_ratio = 0.1             # linear/cosine decay to lr * min_lr_ratio at lr_decay_iters
lr_decay_iters = 0             # 0: max_iters
lr_schedule = "cosine"         # "constant" | "linear" (Cosmos LambdaLinear) | "cosine"
warmup_iters = 50
betas = (0.9, 0.99)
weight_decay = 0.01
grad_clip = 1.0
ema = True
ema_sigma_rel = 0.1            # Cosmos power EMA
# system
device = "auto"                # "auto" | "cpu" | "cuda"
dtype = "auto"                 # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bfloat16" | "float32"
parallel = "ddp"               # "ddp" | "fsdp" (FSDP2, one shard per block)
hsdp_replicas = 1              # fsdp: >1 = HSDP mesh (replicas x shards), e.g. nodes x 8
compile = False
activation_checkpointing = False
seed = 0
bench = False                  # time bench_steps steps on random inputs at the configured shapes, then exit
bench_steps = 10
_CONFIG_KEYS = configurator.config_keys(globals())
# -----------------------------------------------------------------------------

MODEL_PRESETS = {
    "tiny": dict(model_channels=128, num_blocks=4, num_heads=4, adaln_lora_dim=32, crossattn_emb_channels=64),
    "small": dict(model_channels=512, num_blocks=8, num_heads=8, adaln_lora_dim=64, crossattn_emb_channels=256),
    "2B": model.PRESETS["2B"],
    "14B": model.PRESETS["14B"],
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "B200": 2250e12, "GH200": 989e12}


def model_config(c, latent_channels):
    arch = dict(MODEL_PRESETS[c["model_size"]])
    for k in ("model_channels", "num_blocks", "num_heads"):
        if c[k]:
            arch[k] = c[k]
    return DiTConfig(**arch, in_channels=latent_channels, out_channels=latent_channels,
                     action_mode=c["action_mode"], action_dim=c["action_dim"], num_actions=c["num_frames"] - 1,
                     n_views_emb=c["n_views_emb"], crossattn_proj_in_channels=c["crossattn_proj_in_channels"],
                     timestep_scale=c["timestep_scale"], rope_t_extrapolation_ratio=c["rope_t_extrapolation_ratio"],
                     rope_enable_fps_modulation=c["rope_enable_fps_modulation"])


# -----------------------------------------------------------------------------
# distributed setup

def setup_distributed(device_opt):
    ddp = int(os.environ.get("RANK", -1)) != -1
    use_cuda = device_opt == "cuda" or (device_opt == "auto" and torch.cuda.is_available())
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    return ddp, rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# data order: a global stream of epoch permutations, so the position is just step * global_batch and a
# resumed run (even with another process count, same global batch) sees exactly the samples it would have

class StepBatchSampler(torch.utils.data.Sampler):
    def __init__(self, n, batch, accum, rank, world, seed, start_step, shuffle=True):
        self.n, self.batch, self.accum, self.rank, self.world = n, batch, accum, rank, world
        self.seed, self.start_step, self.shuffle = seed, start_step, shuffle
        self.global_batch = batch * accum * world

    def _position(self, pos, cache):
        epoch, i = divmod(pos, self.n)
        if epoch not in cache:
            g = torch.Generator().manual_seed(self.seed + epoch)
            cache.clear()
            cache[epoch] = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        return cache[epoch][i]

    def __iter__(self):
        cache, step = {}, self.start_step
        while True:
            for micro in range(self.accum):
                first = step * self.global_batch + (micro * self.world + self.rank) * self.batch
                yield [self._position(first + j, cache) for j in range(self.batch)]
            step += 1

    def __len__(self):
        return 2 ** 62


def single_threaded_worker(_):
    # each loader worker decodes whole clips on its own: torch's intra-op threads would only oversubscribe cores
    torch.set_num_threads(1)


# -----------------------------------------------------------------------------
# objective

def encode_views(tok, video_B_V_3_T_H_W, dtype):
    """uint8 camera videos -> latents [B, C, V*t, h, w] (views concatenated along latent time, as (v t))."""
    B, V = video_B_V_3_T_H_W.shape[:2]
    x = video_B_V_3_T_H_W.to(dtype).div(127.5).sub(1.0)          # normalised on the device, not in the dataset
    lat = tok.encode(rearrange(x, "b v c t h w -> (b v) c t h w"))
    return rearrange(lat, "(b v) c t h w -> b c (v t) h w", b=B, v=V).float()


def diffusion_loss(net, x0, action, num_views, c, generator):
    """Velocity MSE over the non-conditioned latent frames. Returns (loss, per-sample loss [B], t [B])."""
    B, C, T, H, W = x0.shape
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = model.sample_t(B, c["t_shift"], generator=generator, device=x0.device)
    mask = model.condition_mask(B, num_views, T // num_views, H, W, c["cond_latents"], device=x0.device)
    x_t = model.noisy_latents(x0, eps, t.view(B, 1, 1, 1, 1))
    cond_t = None if c["cond_t"] < 0 else c["cond_t"]
    v = model.predict_velocity(net, x_t, t, x0, mask, cond_t, action=action, num_views=num_views,
                               fps=torch.full((B,), float(c["fps"]), device=x0.device))
    keep = 1 - mask
    err = (v.float() - model.velocity_target(x0, eps)).pow(2) * keep
    per_sample = err.sum(dim=(1, 2, 3, 4)) / (keep.sum(dim=(1, 2, 3, 4)) * C)
    return per_sample.mean(), per_sample.detach(), t


def step_generator(device, *keys):
    """A generator seeded from (seed, step, global micro-batch slot): noise and t do not depend on what ran
    before nor on how the global batch is split over processes, so a resumed run draws exactly what the
    uninterrupted run drew."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))
    return g


# -----------------------------------------------------------------------------
# EMA (Cosmos "power" EMA, fp32, shaped and sharded like the parameters)

def power_ema_gamma(sigma_rel):
    s2 = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - s2, 12 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


@torch.no_grad()
def ema_update(ema_params, params, step, gamma):
    beta = 0.0 if step < 1 else (1 - 1 / (step + 1)) ** (gamma + 1)
    torch._foreach_lerp_(ema_params, [p.detach().float() for p in params], 1 - beta)


# -----------------------------------------------------------------------------
# checkpoints

def latest_checkpoint(ckpt_dir):
    f = os.path.join(ckpt_dir, "latest_checkpoint.txt")
    if not os.path.exists(f):
        return None
    name = open(f).read().strip()
    path = os.path.join(ckpt_dir, name)
    if not os.path.isdir(path):
        raise RuntimeError(f"{f} names {name}, which does not exist")
    return path


def train_state(raw, opt, sched, ema_params, step, G):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(raw, opt)
    names = [n for n, _ in raw.named_parameters()]
    return {"model": model_sd, "optim": optim_sd, "ema": dict(zip(names, ema_params)),
            "scheduler": sched.state_dict(), "trainer": {"step": step, "global_batch": G}}


def save_checkpoint(c, run_cfg, raw, opt, sched, ema_params, step, G, rank, world):
    import torch.distributed.checkpoint as dcp
    ckpt_dir = os.path.join(c["out_dir"], "checkpoints")
    name = f"iter_{step:09d}"
    final, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    state = train_state(raw, opt, sched, ema_params, step, G)
    dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng_rank{rank:05d}.pt"))
    cfg_json = {**run_cfg, "step": step, "world_size": world}
    if c["save_consolidated"]:
        full = gather_full(state["ema"], rank)
    barrier()
    if rank == 0:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg_json, f, indent=1)
        if os.path.exists(final):               # re-saving the same step (e.g. a rerun): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)                  # the checkpoint exists only once it is complete
        with open(os.path.join(ckpt_dir, "latest_checkpoint.txt.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(ckpt_dir, "latest_checkpoint.txt.tmp"), os.path.join(ckpt_dir, "latest_checkpoint.txt"))
        if c["save_consolidated"]:
            mdir = os.path.join(ckpt_dir, "model")
            os.makedirs(mdir, exist_ok=True)
            torch.save({"net." + k: v for k, v in full.items()}, os.path.join(mdir, name + ".pt.tmp"))
            os.replace(os.path.join(mdir, name + ".pt.tmp"), os.path.join(mdir, name + ".pt"))
            with open(os.path.join(mdir, name + ".json"), "w") as f:
                json.dump(cfg_json, f, indent=1)
        old = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("iter_") and not d.endswith(".tmp"))
        for d in old[:-c["keep_last"]] if c["keep_last"] > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, d))
    barrier()
    return final


def gather_full(tensors, rank):
    """Full fp32 CPU copies of (possibly FSDP-sharded) tensors, on rank 0."""
    out = {}
    for k, v in tensors.items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        if rank == 0:
            out[k] = v.detach().float().cpu().clone()
    return out


def load_checkpoint(path, raw, opt, sched, ema_params, rank, world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = train_state(raw, opt, sched, ema_params, 0, 0)
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(raw, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(state["scheduler"])
    # state["ema"] holds the very tensors of ema_params: dcp.load filled them in place
    rng = os.path.join(path, f"rng_rank{rank:05d}.pt")
    saved_world = json.load(open(os.path.join(path, "config.json")))["world_size"]
    if os.path.exists(rng) and saved_world == world:
        r = torch.load(rng, weights_only=False)
        torch.set_rng_state(r["torch"])
        np.random.set_state(r["numpy"])
        if r["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(r["cuda"])
    return state["trainer"]["step"], state["trainer"]["global_batch"]


# -----------------------------------------------------------------------------

def lr_factor(step, c):
    if step < c["warmup_iters"]:
        return 1e-6 + (1 - 1e-6) * step / c["warmup_iters"]      # Cosmos warms up from 1e-6
    if c["lr_schedule"] == "constant":
        return 1.0
    end = c.get("lr_decay_iters") or c["max_iters"]
    frac = min(1.0, (step - c["warmup_iters"]) / max(1, end - c["warmup_iters"]))
    lo = c["min_lr_ratio"]
    if c["lr_schedule"] == "linear":
        return 1 - (1 - lo) * frac
    if c["lr_schedule"] == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"lr_schedule must be constant, linear or cosine, got {c['lr_schedule']!r}")


def flops_per_sample(cfg: DiTConfig, tokens):
    """Model FLOPs per training sample (forward + backward = 3x forward; recomputation from activation
    checkpointing not counted, as MFU is usually quoted): per-token matmuls (self-attention q/k/v/out and the
    MLP; cross-attention is skipped with the all-zero text of action models) plus the joint self-attention."""
    D, L = cfg.model_channels, cfg.num_blocks
    per_token = 2 * L * (4 * D * D + 2 * D * D * cfg.mlp_ratio)
    attn = L * 4 * tokens * tokens * D                                          # QK^T and AV over all tokens
    return 3 * (per_token * tokens + attn)


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def build_model(c, cfg, device, init=True, say=print):
    """The DiT on `device`, built on the meta device first (no host-memory spike for big models), initialised
    from scratch or from c["init_from"] (official or nanocosmos weights; new heads grown in as no-ops).
    The text pathway is frozen: action models train with an all-zero text context, which gives those weights
    exactly zero gradient (this keeps the released weights, and DDP/FSDP need no unused-parameter search)."""
    with torch.device("meta"):
        raw = DiT(cfg)
    raw.to_empty(device=device)
    torch.manual_seed(c["seed"])
    raw.init_weights()
    if c["init_from"] and init:
        import convert
        sd, src = convert.load_weights(c["init_from"], ema=c["init_ema"])
        missing, unexpected, regrown = model.load_into(raw, sd, strict=False, grow=True)
        say(f"init_from {c['init_from']}: {len(sd)} tensors")
        # settings no tensor shape reveals: a mismatch silently changes what the released weights compute
        src_model = (src or {}).get("model", {})
        for k in ("rope_h_extrapolation_ratio", "rope_w_extrapolation_ratio", "rope_t_extrapolation_ratio",
                  "rope_enable_fps_modulation", "timestep_scale"):
            if k in src_model and src_model[k] != getattr(cfg, k):
                say(f"  warning: {k} is {getattr(cfg, k)} here but {src_model[k]} in {c['init_from']}'s config")
        new = regrown + [k for k in missing if k.startswith(("action_", "view_"))]
        for label, keys in (("grown (start as no-ops)", new),
                            ("missing (left at init)", [k for k in missing if k not in new]),
                            ("unexpected (ignored)", unexpected)):
            if keys:
                say(f"  {label}: {len(keys)}: {', '.join(sorted(keys)[:8])}{' ...' if len(keys) > 8 else ''}")
    for n, p in raw.named_parameters():
        if n.startswith("crossattn_proj") or ".cross_attn." in n or "adaln_modulation_cross_attn" in n:
            # with crossattn_proj the zero context still reaches v_proj/output_proj/adaLN (a constant), so those train
            if not cfg.crossattn_proj_in_channels or ".cross_attn.q" in n or ".cross_attn.k" in n:
                p.requires_grad_(False)
    return raw


def main(argv):
    c = configurator.configure(globals(), _CONFIG_KEYS, argv)
    ddp, rank, world, device = setup_distributed(c["device"])
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    use_bf16 = c["dtype"] == "bfloat16" or (c["dtype"] == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    torch.manual_seed(c["seed"] + rank)
    np.random.seed(c["seed"] + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    import vae
    from vae import latent_frames
    tok_dtype = torch.bfloat16 if use_bf16 and c["tokenizer"] != "pixel" else torch.float32   # the VAE runs in bf16
    tok = vae.load_tokenizer(c["tokenizer"], c["tokenizer_path"] or None, device=device, dtype=tok_dtype,
                             **({"spatial_factor": c["pixel_factor"]} if c["tokenizer"] == "pixel" else {}))
    V, T = len(c["cameras"]), c["num_frames"]
    t_lat = latent_frames(T, tok.temporal_factor)
    H, W = c["frame_size"]
    if H % (tok.spatial_factor * 2) or W % (tok.spatial_factor * 2):
        raise ValueError(f"frame_size {H}x{W} must be a multiple of {tok.spatial_factor * 2} "
                         f"(tokenizer factor {tok.spatial_factor} x patch 2)")
    h, w = H // tok.spatial_factor, W // tok.spatial_factor
    cfg = model_config(c, tok.latent_channels)
    if V > 1 and not cfg.n_views_emb:
        say(f"warning: {V} cameras but no view embedding (n_views_emb=0): views differ only by their position in time")
    run_cfg = {"model": model.config_dict(cfg), "train": c}

    ckpt_dir = os.path.join(c["out_dir"], "checkpoints")
    if master and os.path.isdir(ckpt_dir):   # a save that crashed leaves an .tmp dir: never a checkpoint
        for d in os.listdir(ckpt_dir):
            if d.endswith(".tmp"):
                shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    barrier()
    resume_path = latest_checkpoint(ckpt_dir) if c["resume"] else None
    raw = build_model(c, cfg, device, init=not resume_path, say=say)
    raw.gradient_checkpointing = c["activation_checkpointing"]
    trainable = [p for p in raw.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in trainable), raw.num_params()

    # parallelism
    net = raw
    if ddp and c["parallel"] == "fsdp":
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        from torch.distributed.device_mesh import init_device_mesh
        r = c["hsdp_replicas"]
        mesh = (init_device_mesh(device.type, (r, world // r), mesh_dim_names=("replicate", "shard")) if r > 1
                else init_device_mesh(device.type, (world,)))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16 else MixedPrecisionPolicy()
        for i, block in enumerate(raw.blocks):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(raw.blocks) - 1)
        fully_shard(raw, mesh=mesh, mp_policy=mp)
    elif ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(net) if c["compile"] else net

    trainable = [p for p in raw.parameters() if p.requires_grad]   # (FSDP replaced them by DTensors)
    opt = torch.optim.AdamW(trainable, lr=c["lr"], betas=tuple(c["betas"]), weight_decay=c["weight_decay"],
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, c))
    ema_params = [p.detach().float().clone() for p in raw.parameters()] if c["ema"] else []
    gamma = power_ema_gamma(c["ema_sigma_rel"])

    G = c["batch_size"] * c["grad_accum"] * world
    step = 0
    if resume_path:
        step, saved_G = load_checkpoint(resume_path, raw, opt, sched, ema_params, rank, world)
        say(f"resumed from {resume_path} at step {step}")
        if sched.base_lrs[0] != c["lr"]:      # the config wins over the saved optimizer's lr
            say(f"lr changed {sched.base_lrs[0]:g} -> {c['lr']:g}")
            sched.base_lrs = [c["lr"]] * len(sched.base_lrs)
            for group in opt.param_groups:
                group["lr"] = c["lr"] * lr_factor(step, c)
        if saved_G != G:
            say(f"warning: global batch changed {saved_G} -> {G}: the data position is kept in samples, not steps")
            step_pos = step * saved_G // G
        else:
            step_pos = step
    else:
        step_pos = 0

    tokens = V * t_lat * (h // 2) * (w // 2)
    fl = flops_per_sample(cfg, tokens)
    say(f"nanocosmos train | world {world} x {device} | parallel {c['parallel'] if ddp else 'none'} | "
        f"dtype {'bf16 autocast, fp32 master' if use_bf16 else 'fp32'}")
    say(f"model {c['model_size']}: {n_all / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable, "
        f"{(n_all - n_train) / 1e6:.2f}M frozen) | action {cfg.action_mode} ({cfg.action_in_features} in) | "
        f"view emb {cfg.n_views_emb} | activation ckpt {c['activation_checkpointing']} | compile {c['compile']}")
    say(f"data: {V} views x {T} frames {H}x{W} -> latent {tok.latent_channels}x{t_lat}x{h}x{w} per view "
        f"({c['tokenizer']} tokenizer) | {tokens} tokens/sample | batch {c['batch_size']} x accum {c['grad_accum']} "
        f"x world {world} = {G} samples, {G * tokens} tokens/step | {fl / 1e9:.2f} GFLOP/sample")
    shards = world if ddp and c["parallel"] == "fsdp" else 1
    state_gb = (n_all * 4 * (2 if c["ema"] else 1) + n_train * 12) / shards / 2 ** 30   # fp32 weights+EMA, grads+AdamW
    say(f"memory: {state_gb:.2f} GB of model state per process (fp32 weights{' + EMA' if c['ema'] else ''}, "
        f"grads and AdamW of trainable weights{f', sharded {shards} ways' if shards > 1 else ''}) + activations"
        + (f" | {torch.cuda.memory_allocated(device) / 2 ** 30:.2f} GB allocated now" if device.type == "cuda" else ""))
    say(f"checkpoints -> {ckpt_dir} every {c['save_interval']} steps (keep {c['keep_last']})")

    if c["bench"]:
        return run_bench(c, fwd, raw, opt, tok, tok_dtype, device, autocast, V, T, H, W, fl, tokens, say, world)

    import data
    import synth
    if not os.path.exists(c["data_root"]):
        if not c["synth_if_missing"]:
            raise FileNotFoundError(f"data_root {c['data_root']} does not exist (synth_if_missing=False)")
        if master:
            say(f"{c['data_root']} not found: generating the synthetic world ({c['synth_episodes']} episodes, "
                f"{max(c['cameras']) + 1} cameras)")
            synth.make_synthetic(c["data_root"], episodes=c["synth_episodes"], cameras=max(c["cameras"]) + 1,
                                size=tuple(c["frame_size"]), seed=c["seed"])
        barrier()
    ds_kw = dict(num_frames=T, cameras=tuple(c["cameras"]), size=tuple(c["frame_size"]), frame_stride=c["frame_stride"],
                 action_scale=c["action_scale"], gripper_scale=c["gripper_scale"])
    train_ds = data.RobotVideoDataset(c["data_root"], c["train_split"], start_stride=c["start_stride"], **ds_kw)
    val_ds = data.RobotVideoDataset(c["data_root"], c["val_split"], start_stride=max(1, T - 1), **ds_kw)
    say(f"dataset {c['data_root']}: {len(train_ds)} train clips, {len(val_ds)} val clips")
    if len(train_ds) == 0:
        raise RuntimeError(f"no training clips of {T} frames in {c['data_root']} ({c['train_split']})")
    sampler = StepBatchSampler(len(train_ds), c["batch_size"], c["grad_accum"], rank, world, c["seed"], step_pos)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=c["num_workers"],
                                         pin_memory=device.type == "cuda", persistent_workers=c["num_workers"] > 0,
                                         worker_init_fn=single_threaded_worker,
                                         prefetch_factor=4 if c["num_workers"] > 0 else None)
    batches = iter(loader)

    log_path = os.path.join(c["out_dir"], "log.jsonl")
    if master:
        os.makedirs(c["out_dir"], exist_ok=True)
    from tqdm import tqdm
    bar = tqdm(total=c["max_iters"], initial=step, disable=not master, dynamic_ncols=True, desc="train")
    peak = peak_flops(device)
    buckets = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0001], device=device)
    stats = torch.zeros(3 + 2 * 4, device=device)        # loss sum, grad-norm sum, non-finite flag, bucket sums/counts
    t0, last_step = time.time(), step
    last_good = resume_path
    # a fixed shuffled order: the same val batches every time, and rolled actions come from unrelated clips
    val_loader_fn = lambda: torch.utils.data.DataLoader(  # noqa: E731
        val_ds, batch_size=c["batch_size"], shuffle=True, num_workers=0,
        generator=torch.Generator().manual_seed(c["seed"]))

    while step < c["max_iters"]:
        raw.train()
        for micro in range(c["grad_accum"]):
            batch = next(batches)
            video = batch["video"].to(device, non_blocking=True)
            action = batch["action"].to(device, non_blocking=True) if cfg.action_mode != "none" else None
            g = step_generator(device, c["seed"], step, micro * world + rank)   # the global slot, as the sampler
            sync = micro == c["grad_accum"] - 1
            ctx = net.no_sync() if (ddp and c["parallel"] == "ddp" and not sync) else nullcontext()
            if ddp and c["parallel"] == "fsdp":
                raw.set_requires_gradient_sync(sync)
            with ctx:
                with torch.no_grad():
                    x0 = encode_views(tok, video, tok_dtype)
                with autocast:
                    loss, per_sample, t = diffusion_loss(fwd, x0, action, V, c, g)
                (loss / c["grad_accum"]).backward()
            with torch.no_grad():
                stats[0] += loss.detach() / c["grad_accum"]
                idx = torch.bucketize(t, buckets, right=True) - 1
                stats[3:7].index_add_(0, idx, per_sample)
                stats[7:11].index_add_(0, idx, torch.ones_like(per_sample))
        gn = torch.nn.utils.clip_grad_norm_(trainable, c["grad_clip"] if c["grad_clip"] > 0 else float("inf"))
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
        stats[1] += gn
        stats[2] += (~torch.isfinite(loss.detach())).float()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema_params:
            ema_update(ema_params, list(raw.parameters()), step, gamma)
        step += 1
        bar.update(1)

        if step % c["log_interval"] == 0 or step == c["max_iters"]:
            s = stats.clone()
            if ddp:
                dist.all_reduce(s)
                s[:3] /= world
            s = s.tolist()
            n = step - last_step
            if s[2] > 0:
                raise FloatingPointError(f"non-finite loss between steps {last_step} and {step}: stopping. "
                                         f"Last good checkpoint: {last_good or 'none'} (left intact).")
            dt = time.time() - t0
            rec = {"step": step, "loss": s[0] / n, "lr": sched.get_last_lr()[0], "grad_norm": s[1] / n,
                   "samples_per_s": n * G / dt, "tokens_per_s": n * G * tokens / dt,
                   "loss_t": {f"{buckets[i]:.2f}-{min(1, buckets[i + 1].item()):.2f}": (s[3 + i] / s[7 + i] if s[7 + i] else None)
                              for i in range(4)}}
            if peak:
                rec["mfu"] = n * G * fl / dt / (world * peak)
            if device.type == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if master:
                bar.write(f"step {step}: loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | "
                          f"{rec['samples_per_s']:.1f} samples/s {rec['tokens_per_s']:.0f} tok/s"
                          + (f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else "")
                          + (f" | mem {rec['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in rec else "")
                          + " | loss by t " + " ".join(f"{v:.3f}" if v is not None else "-" for v in rec["loss_t"].values()))
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            stats.zero_()
            t0, last_step = time.time(), step

        if c["eval_interval"] and (step % c["eval_interval"] == 0 or step == c["max_iters"]) and len(val_ds):
            ev = evaluate(fwd, raw, tok, tok_dtype, val_loader_fn(), c, V, cfg, device, autocast, rank, world)
            if master:
                bar.write(f"step {step}: val loss {ev['val_loss']:.4f} | shuffled actions {ev['val_loss_shuffled']:.4f} | "
                          f"action gain {ev['action_gain']:+.4f}")
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, **ev}) + "\n")
        if step % c["save_interval"] == 0 or step == c["max_iters"]:
            bad = stats[2].clone()
            if ddp:
                dist.all_reduce(bad)
            if bad.item() > 0:
                raise FloatingPointError(f"non-finite loss before step {step}: not saving. "
                                         f"Last good checkpoint: {last_good or 'none'} (left intact).")
            last_good = save_checkpoint(c, run_cfg, raw, opt, sched, ema_params, step, G, rank, world)
            bar.write(f"saved {last_good}") if master else None
        # under FSDP the rollout's forwards are collective, so every rank runs it; rank 0 writes the mp4
        if c["sample_interval"] and step % c["sample_interval"] == 0 and len(val_ds) and (master or c["parallel"] == "fsdp" and ddp):
            write_sample_video(raw, tok, val_ds, c, step, device, write=master)
    bar.close()
    if ddp:
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(fwd, raw, tok, tok_dtype, loader, c, V, cfg, device, autocast, rank, world):
    """Val loss with the true actions and with actions rolled across the batch (fixed noise and t per batch).
    Their difference, the action gain, says whether the model uses the actions."""
    raw.eval()
    tot = torch.zeros(3, device=device)
    fsdp = dist.is_initialized() and c["parallel"] == "fsdp"
    for i, batch in enumerate(loader):
        if i >= c["eval_batches"]:
            break
        if i % world != rank and not fsdp:   # FSDP forwards are collective: there every rank runs every batch
            continue
        x0 = encode_views(tok, batch["video"].to(device), tok_dtype)
        action = batch["action"].to(device)
        for j, a in enumerate([action, action.roll(1, dims=0)]):
            g = step_generator(device, c["seed"], 10 ** 9 + i)
            with autocast:
                loss, _, _ = diffusion_loss(fwd, x0, a if cfg.action_mode != "none" else None, V, c, g)
            tot[j] += loss.float()
        tot[2] += 1
    if dist.is_initialized() and not fsdp:
        dist.all_reduce(tot)
    raw.train()
    n = max(1.0, tot[2].item())
    out = {"val_loss": tot[0].item() / n, "val_loss_shuffled": tot[1].item() / n}
    out["action_gain"] = out["val_loss_shuffled"] - out["val_loss"]
    return out


def write_sample_video(raw, tok, val_ds, c, step, device, write=True):
    import sample
    ep = 0
    frames = val_ds.episode_frames(ep)                                      # [V,3,N+1,H,W]
    actions = torch.as_tensor(val_ds.episodes[ep].actions)
    video = sample.rollout(raw.eval(), tok, frames[:, :, 0][None].to(device), actions[None].to(device),
                           num_frames=c["num_frames"], num_steps=20, seed=0,
                           cond_t=None if c["cond_t"] < 0 else c["cond_t"], fps=c["fps"], progress=False)
    raw.train()
    if not write:
        return
    path = os.path.join(c["out_dir"], "samples", f"iter_{step:09d}.mp4")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sample.save_video(path, video[0].cpu(), gt=frames[:, :, : video.shape[3]], fps=c["fps"])


def run_bench(c, fwd, raw, opt, tok, tok_dtype, device, autocast, V, T, H, W, fl, tokens, say, world):
    """Training steps on random inputs at the configured shapes (tokenizer encode included)."""
    g = torch.Generator(device=device).manual_seed(0)
    B = c["batch_size"]
    video = torch.randint(0, 256, (B, V, 3, T, H, W), generator=g, device=device, dtype=torch.uint8)
    action = torch.randn(B, T - 1, c["action_dim"], generator=g, device=device) if raw.cfg.action_mode != "none" else None
    times = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(c["bench_steps"] + 2):
        sync()
        t0 = time.time()
        with torch.no_grad():
            x0 = encode_views(tok, video, tok_dtype)
        with autocast:
            loss, _, _ = diffusion_loss(fwd, x0, action, V, c, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.time() - t0)
    dt = sum(times[2:]) / len(times[2:])                 # the first two steps warm up (and compile)
    res = {"steps_per_s": 1 / dt, "samples_per_s": B * world / dt, "tokens_per_s": B * world * tokens / dt,
           "step_s": dt}
    peak = peak_flops(device)
    if peak:
        res["mfu"] = B * fl / dt / peak
    if device.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        import resource
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    say("bench: " + " | ".join(f"{k} {v:.4g}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
