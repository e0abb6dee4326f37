"""
Post-train a Cosmos-Predict2/2.5 DiT into a multi-view, action-conditioned robot world model.

    python train.py                                            # tiny model, synthetic world, CPU, a few minutes
    python train.py config/multiview_action.py --batch_size=2  # a preset plus overrides (--help lists the keys)
    python train.py config/multiview_action.py --dry_run=True  # the op-level plan (bench.py), no data or weights
    torchrun --nproc_per_node=8 train.py config/multiview_action.py

Rectified flow as the released models were trained (model.diffusion_loss): conditioned latent frames are fed
clean, the network predicts the velocity eps - x0 of the rest at a logit-normal t, velocity MSE. The file reads
top to bottom: config; setup; tokenizer; model (init_from, LoRA, parallelism); optimizer and EMA; resume; data;
the loop, with each periodic task (log, eval, save, sample) an inline block. Checkpoint formats live in
checkpoint.py, LoRA in lora.py, the datasets in data.py, the plan and benchmarks in bench.py. Known errors end
the run with one line `error: <path>: <problem>`; SIGTERM / SIGINT save a checkpoint and exit non-zero.
"""

import functools
import gc
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from einops import rearrange

import bench as perf  # bench.py, the plan and the benchmarks (`bench` is a config key)
import checkpoint
import configurator
import convert
import data
import lora
import model
import opcount
import sample
import synth
import vae
from model import DiT, DiTConfig

# -----------------------------------------------------------------------------
# default config: a tiny model on the built-in synthetic multi-camera world (CPU, minutes)
# I/O
out_dir = "out/synthetic"
init_from = ""                 # "": from scratch | official .pt / safetensors / nanocosmos checkpoint to start from
init_ema = True                # with init_from: take EMA weights (net_ema.) when the file has both
init_strict = True             # with init_from: every weight but the grown heads must load (False: a partial load)
resume = True                  # resume from out_dir/checkpoints/latest_checkpoint.txt when present
resume_from = ""               # "": the latest checkpoint | "previous": the newest intact one | a checkpoint folder
save_interval = 200            # also saved at max_iters and on SIGTERM / SIGINT
keep_last = 2                  # training checkpoints kept
save_consolidated = True       # also write checkpoints/model/iter_X.pt ({"net.<key>": fp32 EMA}, official format)
keep_consolidated = 2          # consolidated files kept: the last N (0: all) ...
keep_consolidated_every = 1000 # ... plus those of every step that is a multiple of this (0: none)
log_interval = 25
eval_interval = 200
eval_batches = 4               # validation batches per evaluation, shared out over the processes
sample_interval = 0            # >0: write a rollout mp4 of a val episode every N steps (sample.py)
# data
data_root = "datasets/synthetic"
synth_data_root = "datasets/synthetic"  # generated as the synthetic world when missing; any other missing root is an error
synth_if_missing = True        # False: never generate (real-data presets say so); a missing data_root is an error
synth_episodes = 48
skip_bad = False               # skip (and count) unreadable episodes instead of stopping
cameras = (0, 1)
num_frames = 13                # pixel frames per clip: 1 + 4k (13 -> 4 latent frames)
frame_size = (64, 80)          # (H, W) every camera is resized to
frame_stride = 1
start_stride = 1
action_scale = 20.0
gripper_scale = 1.0
action_key = "action"          # LeRobot folders (data_root with meta/info.json): the action column
action_type = "absolute"       # LeRobot: "absolute" | "delta" | "delta_state" (lerobot.py docstring)
action_norm = "mean_std"       # LeRobot: "mean_std" | "min_max" | "none", with the dataset's meta/stats.json
state_key = "observation.state"  # LeRobot: the state column for action_type="delta_state"
fps = 4                        # what the net is told (Cosmos uses 4 for Bridge) and the mp4 rate
num_workers = -1               # DataLoader workers; -1: from the cores this process may use (none for tiny CPU runs)
train_split = "train"
val_split = "val"
latent_cache = ""              # a folder: train on tokenizer latents encoded once, built here when missing (every
                               # rank its share) or by `data.py encode` (--dtype bf16 to match a CUDA run's VAE)
text_embedding = ""            # "": all-zero text (action models) | a file convert.load_text_embedding reads
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
rope_h_extrapolation_ratio = 0.0   # 0: the preset's (Predict2 14B 2/2/0.833; Predict2.5 and 2B 3/3/1)
rope_w_extrapolation_ratio = 0.0
rope_t_extrapolation_ratio = 0.0
rope_enable_fps_modulation = False
# objective
cond_latents = 1               # conditioned latent frames per view
cond_t = -1.0                  # t of conditioned frames; <0: same t as the rest (Predict2.5 action); Predict2: 9.999e-5
t_shift = 2.0                  # logit-normal shift: Predict2 sqrt(latent frames)=2, Predict2.5 5
loss_mean = "noisy"            # "all": mean over all latent elements, zero error on conditioned frames (official)
                               # | "noisy": mean over the non-conditioned elements only
loss_scale = 1.0               # Predict2 10, Predict2.5 1 (the gradient clip acts on the scaled loss)
# optimizer
max_iters = 1200
batch_size = 8                 # per process, per micro-step
grad_accum = 1
lr = 1e-3
lr_schedule = "cosine"         # "constant" | "linear" | "cosine" (to lr * min_lr_ratio at lr_decay_iters)
                               # | "lambda_linear" (Cosmos LambdaLinear: the lr_f_* and lr_cycle_iters keys)
min_lr_ratio = 0.1
lr_decay_iters = 0             # 0: max_iters
warmup_iters = 50
lr_cycle_iters = 400000        # lambda_linear: warm-up f_start -> f_max, then linear to f_min at lr_cycle_iters
lr_f_start = 1e-6
lr_f_max = 0.99
lr_f_min = 0.4
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
cpu_threads = 0                # CPU intra-op threads; 0: the cores this process may use, less the loader workers
dist_timeout_s = 1800          # collective timeout (NCCL's default 600 s is short for a 2B consolidated save)
compile = ""                   # "": eager | "blocks": torch.compile each transformer block (regional) | "model"
activation_checkpointing = False
seed = 0
bench = False                  # time bench_steps steps on random inputs at the configured shapes, then exit
bench_steps = 5                # timed steps, after 2 warm-up steps
bench_latents = False          # bench: random latents instead of video (no tokenizer encode: a latent-cache step)
dry_run = False                # count one step's ops on the meta device, print the plan (bench.py), read nothing
plan_gpu = "H100 SXM"          # dry run: the GPU the op count prices the step on (opcount.GPUS)
plan_gpus = 8                  # dry run: processes to plan for (torchrun's WORLD_SIZE when launched by it)
# LoRA (lora.py): post-train init_from's weights frozen, low-rank factors + the new heads trained in fp32
lora_rank = 0                  # 0: full fine-tuning | >0: LoRA of this rank (needs init_from: the frozen base)
lora_alpha = 0.0               # factor scale alpha / rank; 0: alpha = rank (scale 1, the official recipe)
lora_targets = ()              # layer-name patterns (lora.py); empty: the official targets
base_dtype = "float32"         # LoRA: storage dtype of the frozen base ("bfloat16" halves it; needs dtype bfloat16)
_CONFIG_KEYS = configurator.config_keys(globals())
# -----------------------------------------------------------------------------

MODEL_PRESETS = {
    "tiny": dict(model_channels=128, num_blocks=4, num_heads=4, adaln_lora_dim=32, crossattn_emb_channels=64),
    "small": dict(model_channels=512, num_blocks=8, num_heads=8, adaln_lora_dim=64, crossattn_emb_channels=256),
    **model.PRESETS}
CHOICES = {"lr_schedule": ("constant", "linear", "cosine", "lambda_linear"), "loss_mean": ("all", "noisy"),
           "parallel": ("ddp", "fsdp"), "model_size": tuple(MODEL_PRESETS), "compile": ("", "blocks", "model"),
           "action_mode": ("none", "global", "per_frame"), "action_type": ("absolute", "delta", "delta_state"),
           "action_norm": ("mean_std", "min_max", "none"), "tokenizer": ("pixel", "wan2.1"),
           "plan_gpu": tuple(opcount.GPUS)}


def model_config(c, latent_channels):
    arch = dict(MODEL_PRESETS[c["model_size"]])
    for k in ("model_channels", "num_blocks", "num_heads", "rope_h_extrapolation_ratio",
              "rope_w_extrapolation_ratio", "rope_t_extrapolation_ratio"):
        if c[k]:
            arch[k] = c[k]
    return DiTConfig(**arch, in_channels=latent_channels, out_channels=latent_channels,
                     action_mode=c["action_mode"], action_dim=c["action_dim"], num_actions=c["num_frames"] - 1,
                     n_views_emb=c["n_views_emb"], crossattn_proj_in_channels=c["crossattn_proj_in_channels"],
                     timestep_scale=c["timestep_scale"], rope_enable_fps_modulation=c["rope_enable_fps_modulation"])


def configure(argv):
    """The config after files and overrides, checked before any work starts."""
    # on a copy: the module's defaults stay the defaults when main runs twice in one process (tests, notebooks)
    c = configurator.configure({k: globals()[k] for k in _CONFIG_KEYS}, _CONFIG_KEYS, argv, source=__file__)
    bad = lambda key, problem: configurator.UserError(f"--{key}={c[key]!r}", problem)  # noqa: E731
    for k in ("batch_size", "grad_accum", "max_iters", "log_interval", "save_interval", "num_frames"):
        if c[k] < 1:
            raise bad(k, "must be positive")
    if (c["num_frames"] - 1) % 4:
        raise bad("num_frames", "must be 1 + 4k (the tokenizer packs 4 frames per latent frame after the first)")
    for k, allowed in CHOICES.items():
        if c[k] not in allowed:
            raise bad(k, f"must be one of {', '.join(map(repr, allowed))}")
    if len(c["frame_size"]) != 2 or not c["cameras"]:
        raise bad("frame_size" if len(c["frame_size"]) != 2 else "cameras", "expected (H, W) and one camera or more")
    if c["lr_schedule"] == "lambda_linear" and c["lr_cycle_iters"] <= c["warmup_iters"]:
        raise bad("lr_cycle_iters", f"must exceed warmup_iters ({c['warmup_iters']})")
    if c["init_from"] and not c["dry_run"] and not os.path.exists(c["init_from"]):
        raise configurator.UserError(c["init_from"], "init_from not found")
    lora.check_config(c)
    return c


# -----------------------------------------------------------------------------
# setup: processes, device, precision, threads; the tokenizer and the clip shapes

@dataclass
class Env:
    ddp: bool                  # launched by torchrun (DDP or FSDP)
    rank: int
    world: int
    device: torch.device
    bf16: bool                 # bf16 autocast (and FSDP bf16 compute weights); fp32 master weights either way
    fsdp: bool

    @property
    def master(self):
        return self.rank == 0

    def say(self, *a, **k):
        if self.master:
            print(*a, **k, flush=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()


def setup(c):
    """Processes, device, precision, seeds, CPU threads and loader workers: everything the run is placed on."""
    ddp = int(os.environ.get("RANK", -1)) != -1 and not c["dry_run"]
    rank, world, local = ((int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
                          if ddp else (0, 1, 0))
    device, bf16 = configurator.resolve_device(c["device"], c["dtype"], local)
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # device_id binds the group to this GPU up front (no "guessing the device" warning at the first barrier)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=c["dist_timeout_s"]),
                                device_id=device if device.type == "cuda" else None)
    torch.manual_seed(c["seed"] + rank)
    # single-process checkpoints are intended: torch's "distributed is disabled" notice is noise in the log
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    np.random.seed(c["seed"] + rank)
    c["num_workers"], _ = configurator.cpu_budget(device.type, c["num_workers"], c["cpu_threads"],
                                                  c["model_size"] == "tiny", int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return Env(ddp, rank, world, device, bf16, ddp and c["parallel"] == "fsdp")


def barrier():
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Shapes:
    V: int        # cameras (views)
    T: int        # pixel frames per clip
    H: int
    W: int
    t: int        # latent frames per view
    h: int
    w: int

    @property
    def tokens(self):   # DiT tokens per sample: patch 2x2, temporal patch 1
        return self.V * self.t * (self.h // 2) * (self.w // 2)


def load_tokenizer(c, env, meta=False):
    """The frozen tokenizer (meta=True: its shapes only, no weights read), its dtype and the clip shapes."""
    dtype = torch.bfloat16 if env.bf16 and c["tokenizer"] != "pixel" else torch.float32   # the VAE runs in bf16
    kw = {"spatial_factor": c["pixel_factor"]} if c["tokenizer"] == "pixel" else {}
    if meta:
        with torch.device("meta"):
            tok = (vae.PixelTokenizer(**kw) if c["tokenizer"] == "pixel" else vae.WanVAE()).to(dtype)
    else:
        tok = vae.load_tokenizer(c["tokenizer"], c["tokenizer_path"] or None, device=env.device, dtype=dtype, **kw)
    (H, W), f, T = c["frame_size"], tok.spatial_factor, c["num_frames"]
    if H % (f * 2) or W % (f * 2):
        raise configurator.UserError(f"--frame_size={H}x{W}", f"must be a multiple of {f * 2} "
                                                              f"(tokenizer factor {f} x patch 2)")
    return tok, dtype, Shapes(len(c["cameras"]), T, H, W, vae.latent_frames(T, tok.temporal_factor), H // f, W // f)


# -----------------------------------------------------------------------------
# the model: built on meta, initialised or loaded, LoRA applied, then parallelised

def build_model(c, cfg, device, init=True, say=print):
    """The DiT, built on the meta device first (no host-memory spike for big models), then (unless device is
    meta) materialised on `device` and initialised from scratch or from c["init_from"]. Parameters that cannot
    learn with the run's text context are frozen (zero_gradient_params); LoRA is applied last."""
    with torch.device("meta"):
        raw = DiT(cfg)
    if str(device) != "meta":
        raw.to_empty(device=device)
        torch.manual_seed(c["seed"])
        raw.init_weights()
        if c["init_from"] and (init or c["lora_rank"]):      # a LoRA checkpoint does not hold the frozen base
            checkpoint.load_init(raw, c, say)
    raw.gradient_checkpointing = c["activation_checkpointing"]
    for n, p in raw.named_parameters():
        p.requires_grad_(n not in zero_gradient_params(raw, text=bool(c["text_embedding"])))
    if c["lora_rank"]:       # after loading, before DDP / FSDP / compile (they must see the factors)
        lora.apply(raw, c, None if str(device) == "meta" else convert.resolve(c["init_from"]))
    return raw


def zero_gradient_params(raw, text):
    """Names of the parameters whose gradient is exactly zero when the text context is all zeros (action
    models; text=False). They stay out of the optimizer, so weight decay cannot erode a text path the model is
    exported with. Without crossattn_proj the cross-attention sublayer adds exactly 0 and is skipped; with it
    every context token equals GELU(bias), so the sublayer outputs output_proj(v_proj(GELU(bias))): the query
    side (q/k and their norms) never reaches the loss and the projection weight multiplies zeros."""
    if text:
        return set()
    names = set()
    for n, _ in raw.named_parameters():
        if raw.cfg.crossattn_proj_in_channels:
            hit = n == "crossattn_proj.0.weight" or re.search(r"\.cross_attn\.(q_proj|k_proj|q_norm|k_norm)\.", n)
        else:
            hit = ".cross_attn." in n or ".adaln_modulation_cross_attn." in n
        if hit:
            names.add(n)
    return names


def parallelize(raw, c, env):
    """Regional compile, then DDP or FSDP2 (one shard group per block), as torchtitan orders them: compile after
    activation checkpointing (set on the blocks in build_model), before fully_shard. raw outside torchrun."""
    if c["compile"] == "blocks":      # each block compiled alone: one graph reused by every block, fast to build
        for block in raw.blocks:
            block.compile()
    net = raw
    if env.fsdp:
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        from torch.distributed.device_mesh import init_device_mesh
        r, world = c["hsdp_replicas"], env.world
        mesh = (init_device_mesh(env.device.type, (r, world // r), mesh_dim_names=("replicate", "shard")) if r > 1
                else init_device_mesh(env.device.type, (world,)))
        # cast_forward_inputs=False: FSDP would round every float input of a block to bf16: the RoPE angles, the
        # time embedding (and at the root the timesteps and actions), which the official code, DDP and sample.py
        # keep in fp32. The adaLN-LoRA term is computed under autocast, so it is bf16 here as under DDP.
        # bf16 compute comes from autocast, as without FSDP; gradients are reduced in fp32.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if env.bf16 else None, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
        for i, block in enumerate(raw.blocks):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(raw.blocks) - 1)
        fully_shard(raw, mesh=mesh, mp_policy=mp)
    elif env.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(raw, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return torch.compile(net) if c["compile"] == "model" else net


def gradient_sync(net, raw, env, sync):
    """Gradient all-reduce only on the last micro-step of an accumulation."""
    if env.fsdp:
        raw.set_requires_gradient_sync(sync)
    elif env.ddp and not sync:
        return getattr(net, "_orig_mod", net).no_sync()    # (through torch.compile's wrapper)
    return nullcontext()


def load_text(c, cfg, env):
    """The run's text context [1,N,C] (None: all-zero text, the action models' case)."""
    if not c["text_embedding"]:
        return None
    return convert.load_text_embedding(c["text_embedding"], cfg, env.device)


# -----------------------------------------------------------------------------
# optimizer, schedule, EMA (Cosmos "power" EMA, fp32, shaped and sharded like the parameters)

def make_optimizer(raw, c):
    """AdamW over the parameters that train (frozen ones get no state and no weight decay) and its schedule."""
    trainable = [p for p in raw.parameters() if p.requires_grad]   # after FSDP: the DTensors
    # fused on every device: one kernel per step, and the step counters stay tensors (the per-tensor AdamW reads
    # each one with .item(), a host sync per parameter on a GPU); the CPU runs the path the GPU does
    opt = torch.optim.AdamW(trainable, lr=c["lr"], betas=tuple(c["betas"]), weight_decay=c["weight_decay"], fused=True)
    return trainable, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, c))


def lr_factor(step, c):
    if c["lr_schedule"] == "lambda_linear":
        # Cosmos LambdaLinearScheduler, one cycle (cosmos-predict2.5 cosmos_predict2/_src/common/functional/
        # lr_scheduler.py:157-178 at 50369b8): warm-up f_start -> f_max, then linear from f_max at warmup_iters
        # to f_min at the cycle's end (held there after it)
        warm, cycle, f0, f1, f2 = (c[k] for k in ("warmup_iters", "lr_cycle_iters", "lr_f_start", "lr_f_max", "lr_f_min"))
        if step < warm:
            return f0 + (f1 - f0) * step / warm
        return f2 + (f1 - f2) * max(0, cycle - step) / (cycle - warm)
    if step < c["warmup_iters"]:
        return 1e-6 + (1 - 1e-6) * step / c["warmup_iters"]      # Cosmos warms up from 1e-6
    if c["lr_schedule"] == "constant":
        return 1.0
    end = c.get("lr_decay_iters") or c["max_iters"]
    frac = min(1.0, (step - c["warmup_iters"]) / max(1, end - c["warmup_iters"]))
    lo = c["min_lr_ratio"]
    if c["lr_schedule"] == "linear":
        return 1 - (1 - lo) * frac
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))


def ema_tracked(raw, ema=True):
    """(names, parameters, their fp32 EMA copies: [] without ema) the EMA covers: all parameters, or under LoRA the
    trainable ones (the frozen base is its own EMA, and an fp32 copy of it would cost 4 bytes a parameter)."""
    named = [(n, p) for n, p in raw.named_parameters() if p.requires_grad or not lora.enabled(raw)]
    params = [p for _, p in named]
    return [n for n, _ in named], params, [p.detach().float().clone() for p in params] if ema else []


@functools.lru_cache   # once per run, not every step
def power_ema_gamma(sigma_rel):
    s2 = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - s2, 12 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


@torch.no_grad()
def ema_update(ema_params, params, step, gamma):
    if not ema_params:
        return
    beta = 0.0 if step < 1 else (1 - 1 / (step + 1)) ** (gamma + 1)
    torch._foreach_lerp_(ema_params, [p.detach().float() for p in params], 1 - beta)


# -----------------------------------------------------------------------------
# data (data.make_dataset owns the formats). The order is a global stream of epoch permutations, so the position
# is just step * global_batch and a resumed run (even with another process count, same global batch) sees exactly
# the samples it would have.

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


def make_data(c, tok, env, data_step):
    """(the training batches from data position data_step on, the validation dataset)."""
    synth.ensure(c, env.rank, env.say, barrier)     # the default synthetic world, generated when missing
    train_ds = data.make_dataset(c, c["train_split"], tok, env.rank, env.world, env.say, barrier)
    val_ds = data.make_dataset(c, c["val_split"], say=env.say)
    return iter(make_loader(train_ds, c, env, data_step)), val_ds


def make_loader(train_ds, c, env, step_pos):
    sampler = StepBatchSampler(len(train_ds), c["batch_size"], c["grad_accum"], env.rank, env.world, c["seed"], step_pos)
    workers = c["num_workers"]
    return torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=env.device.type == "cuda", persistent_workers=workers > 0,
                                       worker_init_fn=lambda _: torch.set_num_threads(1),
                                       prefetch_factor=4 if workers else None)


def val_batches(val_ds, c, rank, world):
    """This process's share of the fixed validation batches, as (global batch index, weight, batch). Batch i
    goes to process i % world; every process gets the same number, so FSDP's collective forwards line up (a
    process without a batch of its own repeats one with weight 0). Each clip comes with the conditioning of the
    clip half the shuffled set away ("other_cond"): the action gain compares them, whatever the batch size."""
    B, n = c["batch_size"], len(val_ds)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(c["seed"])).tolist()
    nb = min(c["eval_batches"], math.ceil(n / B))
    for r in range(math.ceil(nb / world)):
        i = r * world + rank
        j = i if i < nb else 0
        items = []
        for pos in range(j * B, min(n, (j + 1) * B)):
            item = val_ds[order[pos]]
            e, s = (int(a[order[(pos + n // 2) % n]]) for a in (val_ds.window_episode, val_ds.window_start))
            item["other_cond"] = val_ds.episode_cond(e, s, val_ds.num_frames)
            items.append(item)
        yield i, float(i < nb), torch.utils.data.default_collate(items)


def encode_views(tok, video_B_V_3_T_H_W, dtype):
    """uint8 camera videos -> latents [B, C, V*t, h, w] (views concatenated along latent time, as (v t)). All B*V
    clips go through the tokenizer in as few calls as memory allows (vae.encode_batched)."""
    B, V = video_B_V_3_T_H_W.shape[:2]
    lat = vae.encode_batched(tok, video_B_V_3_T_H_W.flatten(0, 1), dtype=dtype)   # [-1, 1] on the device
    return rearrange(lat, "(b v) c t h w -> b c (v t) h w", b=B, v=V).float()


def batch_latents(batch, tok, dtype, device):
    """x0 [B, C, V*t, h, w] of a training batch: read from a latent cache ("latent" [B,V,C,t,h,w]) or encoded now."""
    if "latent" in batch:
        lat = batch["latent"].to(device, non_blocking=True)
        return rearrange(lat, "b v c t h w -> b c (v t) h w").float()
    with torch.no_grad():
        return encode_views(tok, batch["video"].to(device, non_blocking=True), dtype)


def to_device(cond, device, cfg):
    """The conditioning dict on the device; signals the model was built without (action_mode none) dropped."""
    return {k: v.to(device, non_blocking=True) for k, v in cond.items()
            if not (k == "action" and cfg.action_mode == "none")}


def loss_settings(c):
    """The keyword settings of model.diffusion_loss, from the config."""
    return dict(t_shift=c["t_shift"], cond_latents=c["cond_latents"], cond_t=None if c["cond_t"] < 0 else c["cond_t"],
                loss_mean=c["loss_mean"], loss_scale=c["loss_scale"], fps=c["fps"])


def step_generator(device, *keys):
    """A generator seeded from (seed, step, global micro-batch slot): noise and t do not depend on what ran
    before nor on how the global batch is split over processes, so a resumed run draws exactly what the
    uninterrupted run drew."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))
    return g


# -----------------------------------------------------------------------------
# what the loop measures: statistics summed on the device between log lines (no host sync per step)

class Meter:
    """Loss, grad norm, a non-finite flag, a stop-requested flag, and the loss by t bucket, summed on the device
    and read (one all-reduce, one host sync) at log steps only."""
    BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0001)

    def __init__(self, device):
        self.buckets = torch.tensor(self.BUCKETS, device=device)
        self.stats = torch.zeros(4 + 2 * 4, device=device)

    @torch.no_grad()
    def add_micro(self, loss, per_sample, t, accum):
        self.stats[0] += loss.detach() / accum
        idx = torch.bucketize(t, self.buckets, right=True) - 1
        self.stats[4:8].index_add_(0, idx, per_sample)
        self.stats[8:12].index_add_(0, idx, torch.ones_like(per_sample))

    @torch.no_grad()
    def add_step(self, grad_norm, loss, stop_requested):
        self.stats[1] += grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.stats[2] += (~torch.isfinite(loss.detach())).float()
        self.stats[3] += float(stop_requested)      # a Python scalar: no host sync

    def read(self, env, reset=True):
        """The summed statistics over all processes (a host sync): [loss, gnorm, non-finite, stop, buckets...]."""
        s = self.stats.clone()
        if env.ddp:
            dist.all_reduce(s)
            s[:2] /= env.world
        if reset:
            self.stats.zero_()
        return s.tolist()


def log_record(s, n, G, tokens, dt, lr, flops, peak, env):
    b = Meter.BUCKETS
    rec = {"loss": s[0] / n, "lr": lr, "grad_norm": s[1] / n, "samples_per_s": n * G / dt,
           "tokens_per_s": n * G * tokens / dt,
           "loss_t": {f"{b[i]:.2f}-{min(1, b[i + 1]):.2f}": (s[4 + i] / s[8 + i] if s[8 + i] else None) for i in range(4)}}
    if peak:
        rec["mfu"] = n * G * flops / dt / (env.world * peak)
    if env.device.type == "cuda":
        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 2 ** 30
    return rec


def report(env, log_path, step, text, record=None):
    """A log line on rank 0's terminal and, with a record, a line of log_path (JSON)."""
    env.say(f"step {step}: {text}")
    if record is not None and env.master:
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")


def log_text(rec, eta_s):
    return (f"loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | "
            f"{rec['samples_per_s']:.1f} samples/s {rec['tokens_per_s']:.0f} tok/s"
            + (f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else "")
            + (f" | mem {rec['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in rec else "")
            + " | loss by t " + " ".join(f"{v:.3f}" if v is not None else "-" for v in rec["loss_t"].values())
            + f" | eta {timedelta(seconds=round(eta_s))}")


class StopSignal:
    """SIGTERM (a preempted job) and SIGINT (Ctrl-C) set a flag: the loop finishes its step, saves and exits non-zero;
    a second SIGINT interrupts at once. end_message puts the caller's handlers back (forked workers inherit them)."""

    def __init__(self):
        self.signum, self.previous = 0, {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)


@torch.no_grad()
def evaluate(net, raw, tok, tok_dtype, val_ds, c, shapes, env, text=None):
    """Val loss with the true conditioning and with another val clip's (fixed noise and t per batch). Their
    difference, the action gain, says whether the model uses the actions. The batches are shared out over the
    processes (val_batches)."""
    raw.eval()
    tot = torch.zeros(3, device=env.device)
    for i, weight, batch in val_batches(val_ds, c, env.rank, env.world):
        x0 = encode_views(tok, batch["video"].to(env.device), tok_dtype)
        for j, key in enumerate(("cond", "other_cond")):
            g = step_generator(env.device, c["seed"], 10 ** 9 + i)
            with env.autocast():
                loss, _, _ = model.diffusion_loss(net, x0, to_device(batch[key], env.device, raw.cfg), shapes.V, g,
                                                  **loss_settings(c), text_1_N_C=text)
            tot[j] += weight * loss.float()
        tot[2] += weight
    if dist.is_initialized():
        dist.all_reduce(tot)
    raw.train()
    n = max(1.0, tot[2].item())
    out = {"val_loss": tot[0].item() / n, "val_loss_shuffled": tot[1].item() / n}
    out["action_gain"] = out["val_loss_shuffled"] - out["val_loss"]
    return out


def write_sample_video(raw, tok, val_ds, c, step, env, text=None):
    """A rollout of the first val episode as an mp4 beside the ground truth (under FSDP every rank runs the
    collective forwards; rank 0 writes)."""
    frames = val_ds.episode_frames(0)                                      # [V,3,N+1,H,W]
    cond = {k: v[None].to(env.device) for k, v in val_ds.episode_cond(0).items()}
    with env.autocast():
        video = sample.rollout(raw.eval(), tok, frames[:, :, 0][None].to(env.device), cond=cond,
                               num_frames=c["num_frames"], num_steps=20, seed=0,
                               cond_t=None if c["cond_t"] < 0 else c["cond_t"], fps=c["fps"], crossattn_emb=text,
                               amp=torch.bfloat16 if env.bf16 else None, progress=False)
    raw.train()
    if env.master:
        path = os.path.join(c["out_dir"], "samples", f"iter_{step:09d}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sample.save_video(path, video[0].cpu(), gt=frames[:, :, : video.shape[3]], fps=c["fps"])


def run_bench(c, net, raw, opt, tok, tok_dtype, shapes, env):
    return perf.time_steps(random_step(c, net, raw, opt, tok, tok_dtype, shapes, env), c["bench_steps"], 2,
                           c["batch_size"] * perf.flops_per_sample(raw.cfg, shapes.tokens), env.device, say=env.say,
                           world=env.world, samples=c["batch_size"], tokens_per_sample=shapes.tokens)


def random_step(c, net, raw, opt, tok, tok_dtype, shapes, env):
    """One training step on random inputs at the configured shapes (the --bench step): uint8 video through the
    tokenizer (the online path), or with bench_latents random latents straight into the loss (a latent-cache
    step; reading the cache is the loader's work, not timed)."""
    g = torch.Generator(device=env.device).manual_seed(c["seed"] + env.rank)
    B, dev = c["batch_size"], env.device
    video = torch.randint(0, 256, (B, shapes.V, 3, shapes.T, shapes.H, shapes.W), generator=g, device=dev,
                          dtype=torch.uint8)
    cond = to_device({"action": torch.randn(B, shapes.T - 1, c["action_dim"], generator=g, device=dev)}, dev, raw.cfg)
    lat_shape = (B, tok.latent_channels, shapes.V * shapes.t, shapes.h, shapes.w)

    def step():
        with torch.no_grad():
            x0 = (torch.randn(lat_shape, generator=g, device=dev) if c["bench_latents"]
                  else encode_views(tok, video, tok_dtype))
        with env.autocast():
            loss, _, _ = model.diffusion_loss(net, x0, cond, shapes.V, g, **loss_settings(c))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    c = configure(sys.argv[1:] if argv is None else argv)
    env = setup(c)
    tok, tok_dtype, shapes = load_tokenizer(c, env, meta=c["dry_run"])
    cfg = model_config(c, tok.latent_channels)
    if c["dry_run"]:       # the plan of the configured run, counted on the meta device: no data, no weights, no GPU
        return perf.dry_run(c, build_model(c, cfg, "meta"), tok, shapes, say=env.say)
    ckpt_dir = checkpoint.prepare_out_dir(c["out_dir"], env.rank, barrier)
    resume_path = checkpoint.latest(ckpt_dir, c["resume_from"]) if c["resume"] else None
    raw = build_model(c, cfg, env.device, init=not resume_path, say=env.say)
    perf.summary(c, raw, tok, shapes, env.world, env.device, say=env.say, bf16=env.bf16)   # (counts a meta copy)
    net = parallelize(raw, c, env)
    trainable, opt, sched = make_optimizer(raw, c)
    ema_names, params, ema_params = ema_tracked(raw, c["ema"])
    G = c["batch_size"] * c["grad_accum"] * env.world
    saver = checkpoint.Saver(c, {"model": model.config_dict(raw.cfg), "train": c, "lora": lora.run_config(raw)},
                             raw, opt, sched, ema_names, ema_params, G, env.rank, env.world, barrier)
    step, data_step = saver.resume(resume_path, c["lr"], lambda s: lr_factor(s, c), env.say) if resume_path else (0, 0)
    if c["bench"]:          # time the step on random inputs at the configured shapes (bench.py), then exit
        res = run_bench(c, net, raw, opt, tok, tok_dtype, shapes, env)
        del net            # DDP's reducer holds the process group: drop it while the group is alive
        shutdown()
        return res
    batches, val_ds = make_data(c, tok, env, data_step)
    text, meter, stop = load_text(c, cfg, env), Meter(env.device), StopSignal()
    flops, peak = perf.flops_per_sample(cfg, shapes.tokens), perf.peak_flops(env.device)
    log_path, t0, t_start, last_log, start_step = os.path.join(c["out_dir"], "log.jsonl"), *[time.time()] * 2, step, step

    while step < c["max_iters"]:
        raw.train()
        for micro in range(c["grad_accum"]):
            batch = next(batches)
            g = step_generator(env.device, c["seed"], step, micro * env.world + env.rank)   # the global slot
            # the gradient all-reduce only on the last micro-step of the accumulation
            with gradient_sync(net, raw, env, micro == c["grad_accum"] - 1):
                x0 = batch_latents(batch, tok, tok_dtype, env.device)
                with env.autocast():
                    loss, per_sample, t = model.diffusion_loss(net, x0, to_device(batch["cond"], env.device, cfg),
                                                               shapes.V, g, **loss_settings(c), text_1_N_C=text)
                (loss / c["grad_accum"]).backward()
            meter.add_micro(loss, per_sample, t, c["grad_accum"])
        gn = torch.nn.utils.clip_grad_norm_(trainable, c["grad_clip"] if c["grad_clip"] > 0 else float("inf"))
        meter.add_step(gn, loss, stop.signum)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema_params, params, step, power_ema_gamma(c["ema_sigma_rel"]))   # (no-op without ema)
        step += 1
        last = step == c["max_iters"]

        # a signal acts at once in one process; with several at the next log step (all ranks must save together)
        stopping = bool(stop.signum) and env.world == 1
        if step % c["log_interval"] == 0 or last or stopping:
            s, n = meter.read(env), step - last_log
            check_finite(s, c, last_log, step, saver.last_good)
            stopping = stopping or s[3] > 0
            rec = log_record(s, n, G, shapes.tokens, time.time() - t0, sched.get_last_lr()[0], flops, peak, env)
            eta = (time.time() - t_start) / (step - start_step) * (c["max_iters"] - step)
            report(env, log_path, step, log_text(rec, eta), rec)
            t0, last_log = time.time(), step
        if c["eval_interval"] and (step % c["eval_interval"] == 0 or last) and len(val_ds):
            ev = evaluate(net, raw, tok, tok_dtype, val_ds, c, shapes, env, text)
            report(env, log_path, step, f"val loss {ev['val_loss']:.4f} | shuffled actions "
                   f"{ev['val_loss_shuffled']:.4f} | action gain {ev['action_gain']:+.4f}", ev)
            if env.master:
                perf.loss_curves(log_path, os.path.join(c["out_dir"], "loss.png"))
        if step % c["save_interval"] == 0 or last or stopping:
            check_finite(meter.read(env, reset=False), c, last_log, step, saver.last_good)   # never save a NaN
            report(env, log_path, step, f"saved {saver.save(step)}")
        if c["sample_interval"] and step % c["sample_interval"] == 0 and len(val_ds) and (env.master or env.fsdp):
            write_sample_video(raw, tok, val_ds, c, step, env, text)
        if stopping:
            break

    saver.finish()
    env.say(end_message(stop, step, saver, log_path, ckpt_dir, lora.enabled(raw)))
    del net, saver         # (as for the bench)
    shutdown()
    if stop.signum:
        sys.exit(128 + stop.signum)


def end_message(stop, step, saver, log_path, ckpt_dir, is_lora):
    for s, handler in stop.previous.items():     # the run is over: the caller's handlers back
        signal.signal(s, handler)
    if stop.signum:
        name = signal.Signals(stop.signum).name
        return f"stopped by {name} at step {step}: saved {saver.last_good}; the same command resumes it"
    return (f"done. log: {log_path} | checkpoints: {ckpt_dir} (latest: {saver.last_good})\n"
            f"next: python sample.py --dit_path {saver.consolidated_path(step) or saver.last_good}"
            + (f" | merged official files: python convert.py export {saver.last_good} DEST" if is_lora else ""))


def check_finite(stats, c, since, step, last_good):
    """Raise when a step since the last log had a non-finite loss (the Meter's flag, stats[2])."""
    if stats[2] > 0:
        raise configurator.UserError(os.path.join(c["out_dir"], "log.jsonl"), f"non-finite loss between steps "
                                     f"{since} and {step}: stopping, not saving. Last good checkpoint: "
                                     f"{last_good or 'none'} (left intact); lower lr or set grad_clip")


def shutdown():
    """End the process group with every rank present: when one rank had already left, gloo's destructor (run by
    DDP's reducer after the group ended) waited forever for it (seen on a 2-core CPU). Nothing in one process."""
    if not dist.is_initialized():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    configurator.exit_on_known_errors(main, sys.argv[1:])
