"""
Post-train a Cosmos-Predict2/2.5 DiT into a multi-view, action-conditioned robot world model.

    python train.py                                            # tiny model, synthetic world, CPU, a few minutes
    python train.py config/multiview_action.py --batch_size=2  # a preset plus overrides
    python train.py config/multiview_action.py --dry_run=True  # the plan (memory, FLOPs) without data or weights
    torchrun --nproc_per_node=8 train.py config/multiview_action.py

Rectified flow as the released models were trained (shared/spec/dit.md 7): conditioned latent frames are
fed clean, the network predicts the velocity eps - x0 of the rest at a logit-normal t, velocity MSE.
Checkpoints: torch.distributed.checkpoint under out_dir/checkpoints/iter_XXXXXXXXX (atomic, resumable
with any process count); `python convert.py` turns them into the official files.
LoRA (lora_rank > 0, config/multiview_action_lora.py: one GPU): init_from's weights stay frozen (base_dtype
bfloat16 halves them; needs dtype=bfloat16), low-rank factors and the new heads train in fp32, the EMA covers only
those. Checkpoints and the consolidated checkpoints/model/iter_X.safetensors (an adapter) hold only the trainable
tensors plus the base's path and fingerprint: a resume onto another base is an error, and load_weights / sample.py
merge them onto the base. `convert.py export` writes merged official files, `--lora-only` the adapter alone.

Layout: the config keys; setup (processes, tokenizer, model, optimizer, resume); the data; the objective;
the loop (`main`); the periodic work (log, eval, save, sample: class Periodic); the plan (`memory_plan`).
Known errors (configuration, data, checkpoints) end the run with one line `error: <file>: <problem>`.
"""

import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

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
init_strict = True             # with init_from: every weight but the grown heads must load (False: a partial load)
resume = True                  # resume from out_dir/checkpoints/latest_checkpoint.txt when present
save_interval = 200
keep_last = 2                  # training checkpoints kept (consolidated model/*.pt files are all kept)
save_consolidated = True       # also write checkpoints/model/iter_X.pt ({"net.<key>": fp32 EMA}, official format)
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
compile = False
activation_checkpointing = False
seed = 0
bench = False                  # time bench_steps steps on random inputs at the configured shapes, then exit
bench_steps = 5                # timed steps, after 2 warm-up steps
bench_latents = False          # bench: random latents instead of video (no tokenizer encode: a latent-cache step)
dry_run = False                # build on the meta device, print the plan (memory, FLOPs), read nothing, exit
plan_gpus = 8                  # dry run: processes to plan for (torchrun's WORLD_SIZE when launched by it)
# LoRA (model.apply_lora): post-train init_from's weights frozen, low-rank factors + the new heads trained in fp32
lora_rank = 0                  # 0: full fine-tuning | >0: LoRA of this rank (needs init_from: the frozen base)
lora_alpha = 0.0               # factor scale alpha / rank; 0: alpha = rank (scale 1, the official recipe)
lora_targets = ()              # layer-name patterns (model._matches); empty: model.default_lora_targets(text)
base_dtype = "float32"         # LoRA: storage dtype of the frozen base ("bfloat16" halves it; needs dtype bfloat16)
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
GROWN_HEADS = ("action_embedder_", "view_embeddings.")   # may be missing from init_from: they start as no-ops


class RunError(Exception):
    """A problem with a file or folder the run needs. str(e) is '<file>: <problem>'."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")


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
    c = configurator.configure({k: globals()[k] for k in _CONFIG_KEYS}, _CONFIG_KEYS, argv)
    bad = lambda key, problem: configurator.ConfigError(f"--{key}={c[key]!r}: {problem}")  # noqa: E731
    for k in ("batch_size", "grad_accum", "max_iters", "log_interval", "save_interval", "num_frames"):
        if c[k] < 1:
            raise bad(k, "must be positive")
    choices = {"lr_schedule": ("constant", "linear", "cosine", "lambda_linear"), "loss_mean": ("all", "noisy"),
               "parallel": ("ddp", "fsdp"), "model_size": tuple(MODEL_PRESETS), "dtype": ("auto", "bfloat16", "float32")}
    for k, allowed in choices.items():
        if c[k] not in allowed:
            raise bad(k, f"must be one of {', '.join(allowed)}")
    if c["lr_schedule"] == "lambda_linear" and c["lr_cycle_iters"] <= c["warmup_iters"]:
        raise bad("lr_cycle_iters", f"must exceed warmup_iters ({c['warmup_iters']})")
    if c["init_from"] and not c["dry_run"] and not os.path.exists(c["init_from"]):
        raise RunError(c["init_from"], "init_from not found")
    check_lora(c, bad)
    return c


def check_lora(c, bad):
    """LoRA settings that cannot work, as one line before any work."""
    if c["lora_rank"] < 0 or c["lora_alpha"] < 0:
        raise bad("lora_rank" if c["lora_rank"] < 0 else "lora_alpha", "must be >= 0")
    if c["base_dtype"] not in ("float32", "bfloat16"):
        raise bad("base_dtype", "must be one of float32, bfloat16")
    if not c["lora_rank"]:
        return
    if not c["init_from"]:
        raise bad("lora_rank", "LoRA post-trains a model: set init_from to the base weights")
    if c["base_dtype"] == "bfloat16":
        cuda = c["device"] == "cuda" or (c["device"] == "auto" and (torch.cuda.is_available() or c["dry_run"]))
        if c["dtype"] == "float32" or (c["dtype"] == "auto" and not cuda):
            raise bad("base_dtype", "a bfloat16 base needs bf16 autocast: set dtype=bfloat16 (or base_dtype=float32)")
    cross = [t for t in c["lora_targets"] if "cross_attn" in t]
    if cross and not c["text_embedding"]:
        # with an all-zero text the query side never reaches the loss (zero_gradient_params): DDP would stop on
        # parameters without a gradient, and the factors of the rest would only learn a constant
        raise bad("lora_targets", f"{cross[0]}: cross-attention sees an all-zero text here (no text_embedding); "
                                  "drop the cross_attn targets")


# -----------------------------------------------------------------------------
# setup: processes, tokenizer

@dataclass
class Env:
    ddp: bool                  # launched by torchrun (DDP or FSDP)
    rank: int
    world: int
    device: torch.device
    bf16: bool                 # bf16 autocast (and FSDP bf16 compute weights); fp32 master weights either way
    parallel: str              # c["parallel"]

    @property
    def master(self):
        return self.rank == 0

    @property
    def fsdp(self):
        return self.ddp and self.parallel == "fsdp"

    def say(self, *a, **k):
        if self.master:
            print(*a, **k, flush=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()


def setup(c):
    """Processes, device, precision, seeds and CPU threads."""
    ddp = int(os.environ.get("RANK", -1)) != -1 and not c["dry_run"]
    use_cuda = c["device"] == "cuda" or (c["device"] == "auto" and torch.cuda.is_available())
    rank, world, local = 0, 1, 0
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    bf16 = c["dtype"] == "bfloat16" or (c["dtype"] == "auto" and device.type == "cuda")
    torch.manual_seed(c["seed"] + rank)
    np.random.seed(c["seed"] + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    c["num_workers"], threads = cpu_budget(c, device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if device.type == "cpu":
        torch.set_num_threads(threads)
    # single-process checkpoints are intended: torch's "distributed is disabled" notice is noise in the log
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    return Env(ddp, rank, world, device, bf16, c["parallel"])


def cpu_budget(c, device, local_world):
    """(loader workers, intra-op threads) from the cores this process may use (os.sched_getaffinity), so the
    loader and the math never ask for more cores than there are. Tiny CPU models get one thread (their kernels
    are dominated by thread synchronisation) and the other cores decode. Measured, default run, 100 steps, on
    the shared 2-core machine under load ~7: 1 worker + 1 thread 29 s, 0 + 1 42 s, 2 + 2 (the old default) 355 s."""
    cores = max(1, len(os.sched_getaffinity(0)) // local_world)
    workers = c["num_workers"]
    if device.type == "cuda":
        workers = min(8, cores) if workers < 0 else workers
        return workers, c["cpu_threads"] or max(1, cores - workers)
    # tiny models' kernels are dominated by thread synchronisation: one thread is fastest, and never spins
    threads = c["cpu_threads"] or (1 if c["model_size"] == "tiny" else max(1, cores - 1))
    return (max(0, min(4, cores - threads)) if workers < 0 else workers), threads


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


def setup_tokenizer(c, env, meta=False):
    """The frozen tokenizer (meta=True: its shapes only, no weights read) and the clip shapes it gives."""
    import vae
    dtype = torch.bfloat16 if env.bf16 and c["tokenizer"] != "pixel" else torch.float32   # the VAE runs in bf16
    kw = {"spatial_factor": c["pixel_factor"]} if c["tokenizer"] == "pixel" else {}
    if meta:
        with torch.device("meta"):
            tok = vae.PixelTokenizer(**kw) if c["tokenizer"] == "pixel" else vae.WanVAE()
        tok = tok.to(dtype)
    else:
        tok = vae.load_tokenizer(c["tokenizer"], c["tokenizer_path"] or None, device=env.device, dtype=dtype, **kw)
    H, W = c["frame_size"]
    f = tok.spatial_factor
    if H % (f * 2) or W % (f * 2):
        raise configurator.ConfigError(f"--frame_size={H}x{W} must be a multiple of {f * 2} "
                                       f"(tokenizer factor {f} x patch 2)")
    T = c["num_frames"]
    return tok, dtype, Shapes(len(c["cameras"]), T, H, W, vae.latent_frames(T, tok.temporal_factor), H // f, W // f)


# -----------------------------------------------------------------------------
# setup: model, parallelism, optimizer

def build_model(c, cfg, device, init=True, say=print):
    """The DiT, built on the meta device first (no host-memory spike for big models), then (unless device is
    meta) materialised on `device` and initialised from scratch or from c["init_from"]. Parameters that cannot
    learn with the run's text context are frozen (zero_gradient_params)."""
    with torch.device("meta"):
        raw = DiT(cfg)
    if str(device) != "meta":
        raw.to_empty(device=device)
        torch.manual_seed(c["seed"])
        raw.init_weights()
        if c["init_from"] and (init or c["lora_rank"]):      # a LoRA checkpoint does not hold the frozen base
            load_init(raw, c, say)
    raw.gradient_checkpointing = c["activation_checkpointing"]
    for n, p in raw.named_parameters():
        p.requires_grad_(n not in zero_gradient_params(raw, text=bool(c["text_embedding"])))
    if c["lora_rank"]:       # after loading, before DDP / FSDP / compile (they must see the factors)
        import convert
        model.apply_lora(raw, c["lora_rank"], c["lora_alpha"] or None,
                         list(c["lora_targets"]) or model.default_lora_targets(text=bool(c["text_embedding"])),
                         base_dtype=convert.DTYPES[c["base_dtype"]], seed=c["seed"])
        if str(device) != "meta":   # what the checkpoints record: the base's path and fingerprint (resume checks it)
            raw.lora_base = convert.lora_record(raw, c["init_from"], c["init_ema"])
    return raw


def ema_tracked(raw):
    """(names, parameters) the EMA covers: all of them, or under LoRA the trainable ones (the frozen base is its
    own EMA, and an fp32 copy of it would cost 4 bytes a parameter)."""
    lora = bool(getattr(raw, "lora", None))
    named = [(n, p) for n, p in raw.named_parameters() if p.requires_grad or not lora]
    return [n for n, _ in named], [p for _, p in named]


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


def load_init(raw, c, say):
    """Load c["init_from"] into raw: only the grown heads (action MLPs, view-embedding columns) may be missing;
    anything else is an error naming the keys and the likely fix, unless init_strict=False."""
    import convert
    path = c["init_from"]
    sd, src = convert.load_weights(path, ema=c["init_ema"])
    try:
        missing, unexpected, regrown = model.load_into(raw, sd, strict=False, grow=True)
    except ValueError as e:      # a shape mismatch: another model size or text width
        raise RunError(path, f"{e} (check model_size and crossattn_proj_in_channels)") from None
    grown = regrown + [k for k in missing if k.startswith(GROWN_HEADS)]
    missing = [k for k in missing if not k.startswith(GROWN_HEADS)]
    if missing or unexpected:
        msg = (f"{len(missing)} model weights missing from the file ({', '.join(sorted(missing)[:4])}"
               f"{' ...' if len(missing) > 4 else ''}), {len(unexpected)} unexpected "
               f"({', '.join(sorted(unexpected)[:4])}{' ...' if len(unexpected) > 4 else ''})"
               + init_hint(raw.state_dict().keys(), sd, missing, unexpected))
        if c["init_strict"]:
            raise RunError(path, msg + "; init_strict=False loads what matches")
        say(f"warning: init_from {path}: partial load: {msg}")
    say(f"init_from {path}: {len(sd) - len(unexpected)} tensors loaded"
        + (f", grown as no-ops: {', '.join(sorted(grown))}" if grown else ""))
    # settings no tensor shape reveals: a mismatch silently changes what the released weights compute
    for k, v in ((src or {}).get("model") or {}).items():
        if k.startswith("rope_") or k == "timestep_scale":
            if v != getattr(raw.cfg, k):
                say(f"  warning: {k} is {getattr(raw.cfg, k)} here but {v} in {path}'s config")


def init_hint(model_keys, sd, missing, unexpected):
    """The likeliest fix for a state dict that does not match the model."""
    heads = {k.split(".", 1)[0] for k in unexpected if "." in k}
    if len(heads) == 1 and unexpected:
        prefix = heads.pop() + "."
        if all(k.startswith(prefix) for k in sd) and any(k[len(prefix):] in model_keys for k in sd):
            return f": keys start with {prefix!r}: strip that prefix"
    if "crossattn_proj.0.weight" in unexpected:
        return (f": the file has Predict2.5's text projection: set "
                f"crossattn_proj_in_channels={sd['crossattn_proj.0.weight'].shape[1]}")
    if any(k.startswith("crossattn_proj.") for k in missing):
        return ": the file has no text projection (Predict2): set crossattn_proj_in_channels=0"
    return ""


def wrap_model(raw, c, env):
    """DDP or FSDP2 (one shard group per block) around raw; raw itself outside torchrun."""
    net = raw
    if env.fsdp:
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        from torch.distributed.device_mesh import init_device_mesh
        r, world = c["hsdp_replicas"], env.world
        mesh = (init_device_mesh(env.device.type, (r, world // r), mesh_dim_names=("replicate", "shard")) if r > 1
                else init_device_mesh(env.device.type, (world,)))
        # cast_forward_inputs=False: FSDP would round every float input of a block to bf16: the RoPE angles, the
        # time embedding, the adaLN-LoRA term (and at the root the timesteps and actions), which the official code,
        # DDP and sample.py keep in fp32. bf16 compute comes from autocast, as without FSDP.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if env.bf16 else None, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
        for i, block in enumerate(raw.blocks):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(raw.blocks) - 1)
        fully_shard(raw, mesh=mesh, mp_policy=mp)
    elif env.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(raw, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return torch.compile(net) if c["compile"] else net


def make_optimizer(raw, c, device):
    """AdamW over the parameters that train (frozen ones get no state and no weight decay), its schedule, and
    the fp32 EMA of every parameter (shaped and sharded like them)."""
    trainable = [p for p in raw.parameters() if p.requires_grad]   # after FSDP: the DTensors
    opt = torch.optim.AdamW(trainable, lr=c["lr"], betas=tuple(c["betas"]), weight_decay=c["weight_decay"],
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, c))
    ema_params = [p.detach().float().clone() for p in ema_tracked(raw)[1]] if c["ema"] else []
    return trainable, opt, sched, ema_params


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


def resume_state(path, raw, opt, sched, ema_params, c, env, G):
    """(step, data position in steps of the current global batch G) from the checkpoint at path (or 0, 0)."""
    if not path:
        return 0, 0
    check_lora_resume(path, raw)
    step, saved_G = load_checkpoint(path, raw, opt, sched, ema_params, env.rank, env.world)
    env.say(f"resumed from {path} at step {step}")
    if sched.base_lrs[0] != c["lr"]:      # the config wins over the saved optimizer's lr
        env.say(f"lr changed {sched.base_lrs[0]:g} -> {c['lr']:g}")
        sched.base_lrs = [c["lr"]] * len(sched.base_lrs)
        for group in opt.param_groups:
            group["lr"] = c["lr"] * lr_factor(step, c)
    if saved_G != G:
        env.say(f"warning: global batch changed {saved_G} -> {G}: the data position is kept in samples, not steps")
        return step, step * saved_G // G
    return step, step


def check_lora_resume(path, raw):
    """A LoRA checkpoint resumes only onto the very base and LoRA layout it was trained with (its factors are
    fitted to those weights); a full checkpoint only without LoRA, and the other way round."""
    saved = json.load(open(os.path.join(path, "config.json"))).get("lora")
    now = getattr(raw, "lora_base", None)
    if (saved is None) != (now is None):
        raise RunError(path, f"{'a LoRA' if saved else 'a full fine-tuning'} checkpoint, but lora_rank="
                             f"{now['rank'] if now else 0} now: resume with the run's settings or use another out_dir")
    if saved is None:
        return
    if saved["base_fingerprint"] != now["base_fingerprint"]:
        raise RunError(path, f"its LoRA base {saved['base']} is not the file init_from={now['base']} names now "
                             f"(fingerprint {now['base_fingerprint'][:19]} != {saved['base_fingerprint'][:19]}): "
                             "LoRA factors only fit their exact base weights")
    for k in ("rank", "alpha", "targets", "train_full", "base_ema"):
        if saved[k] != now[k]:
            raise RunError(path, f"trained with LoRA {k} {saved[k]!r}, configured {now[k]!r} now")


def load_text(c, cfg, env):
    """The run's text context [1,N,C] (None: all-zero text, the action models' case)."""
    if not c["text_embedding"]:
        return None
    import convert
    return convert.load_text_embedding(c["text_embedding"], cfg, env.device)


# -----------------------------------------------------------------------------
# data. Every dataset is made by make_datasets (readers and latent caches plug in there). The order is a global
# stream of epoch permutations, so the position is just step * global_batch and a resumed run (even with
# another process count, same global batch) sees exactly the samples it would have.

def make_datasets(c, env, tok=None):
    """(train, val) datasets of c["data_root"]: a Bridge/IRASim-layout folder (data.RobotVideoDataset) or a LeRobot
    folder (one with meta/info.json: lerobot.LeRobotDataset); the default synthetic root is generated when missing.
    With latent_cache the training set is the cache (built here when missing, tok: the run's tokenizer);
    validation reads video either way (a few batches per evaluation)."""
    import data
    root = c["data_root"]
    if not os.path.exists(root):
        if not c["synth_if_missing"] or os.path.normpath(root) != os.path.normpath(c["synth_data_root"]):
            near = nearest_folder(root)
            raise RunError(root, "data_root not found" + (f" (did you mean {near}?)" if near else ""))
        if env.master:
            import synth
            env.say(f"{root} not found: generating the synthetic world ({c['synth_episodes']} episodes, "
                    f"{max(c['cameras']) + 1} cameras)")
            synth.make_synthetic(root, episodes=c["synth_episodes"], cameras=max(c["cameras"]) + 1,
                                 size=tuple(c["frame_size"]), seed=c["seed"])
        barrier()
    T = c["num_frames"]
    if os.path.isfile(os.path.join(root, "meta", "info.json")):   # a LeRobot folder
        import lerobot
        if c["latent_cache"]:
            raise configurator.ConfigError(f"--latent_cache={c['latent_cache']!r}: latent caches are built from "
                                           f"Bridge/IRASim-layout folders; {root} is a LeRobot folder")
        make, kw = lerobot.LeRobotDataset, lerobot.config_kwargs(c)
    else:
        make = data.RobotVideoDataset
        kw = dict(num_frames=T, cameras=tuple(c["cameras"]), size=tuple(c["frame_size"]),
                  frame_stride=c["frame_stride"], action_scale=c["action_scale"], gripper_scale=c["gripper_scale"],
                  skip_bad=c["skip_bad"])
    train_ds = make(root, c["train_split"], start_stride=c["start_stride"], **kw)
    val_ds = make(root, c["val_split"], start_stride=max(1, T - 1), **kw)
    skipped = (sum(len(data.list_annotations(root, s)) - len(d.episodes)
                   for s, d in ((c["train_split"], train_ds), (c["val_split"], val_ds))) if c["skip_bad"] else 0)
    env.say(f"dataset {root}: {len(train_ds)} train clips, {len(val_ds)} val clips"
            + (f" | skip_bad: {skipped} bad episodes skipped" if c["skip_bad"] else ""))
    if len(train_ds) == 0:
        raise data.DataError(root, f"no training clips of {T} frames ({c['train_split']})")
    if c["latent_cache"]:
        train_ds = cached_training_set(train_ds, tok, c, env)
    return train_ds, val_ds


def cached_training_set(train_ds, tok, c, env):
    """The training windows as cached latents: every rank encodes its share of a missing cache (data.encode_dataset
    resumes an interrupted one), then all read it. A cache of other settings is a DataError naming the field."""
    import data
    settings = data.cache_settings(train_ds, tok, c["tokenizer"])
    data.encode_dataset(train_ds, tok, c["latent_cache"], settings, env.rank, env.world,
                        workers=max(0, c["num_workers"]), log=env.say)
    barrier()
    cache = data.LatentCacheDataset(c["latent_cache"], expect=settings)
    env.say(f"training on {cache!r}")
    return cache


def nearest_folder(path):
    import difflib
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    names = [d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))] if parent else []
    close = difflib.get_close_matches(os.path.basename(os.path.normpath(path)), names, n=1, cutoff=0.6)
    return os.path.join(parent, close[0]) if close else None


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


def make_loader(train_ds, c, env, step_pos):
    import data
    sampler = StepBatchSampler(len(train_ds), c["batch_size"], c["grad_accum"], env.rank, env.world, c["seed"], step_pos)
    workers = c["num_workers"]
    return torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=env.device.type == "cuda", persistent_workers=workers > 0,
                                       worker_init_fn=data.single_threaded_worker, prefetch_factor=4 if workers else None)


def val_batches(val_ds, c, rank, world):
    """This process's share of the fixed validation batches, as (global batch index, weight, batch). Batch i
    goes to process i % world; every process gets the same number, so FSDP's collective forwards line up (a
    process without a batch of its own repeats one with weight 0). Each clip comes with the actions of the clip
    half the shuffled set away ("other_action"): the action gain compares them, whatever the batch size."""
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
            item["other_action"] = val_ds.episode_actions(e, s, val_ds.num_frames)
            items.append(item)
        yield i, float(i < nb), torch.utils.data.default_collate(items)


# -----------------------------------------------------------------------------
# objective

def encode_views(tok, video_B_V_3_T_H_W, dtype):
    """uint8 camera videos -> latents [B, C, V*t, h, w] (views concatenated along latent time, as (v t)). All B*V
    clips go through the tokenizer in as few calls as memory allows (vae.encode_batched)."""
    import vae
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


def diffusion_loss(net, x0, action, num_views, c, generator, text_1_N_C=None):
    """Velocity MSE, zero on the conditioned frames, times loss_scale; averaged over all latent elements
    (loss_mean="all", the official normalisation) or over the non-conditioned ones ("noisy").
    Returns (loss, per-sample loss [B], t [B])."""
    B, C, T, H, W = x0.shape
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = model.sample_t(B, c["t_shift"], generator=generator, device=x0.device)
    mask = model.condition_mask(B, num_views, T // num_views, H, W, c["cond_latents"], device=x0.device)
    x_t = model.noisy_latents(x0, eps, t.view(B, 1, 1, 1, 1))
    cond_t = None if c["cond_t"] < 0 else c["cond_t"]
    text = None if text_1_N_C is None else text_1_N_C.expand(B, -1, -1)
    v = model.predict_velocity(net, x_t, t, x0, mask, cond_t, action=action, num_views=num_views, crossattn_emb=text,
                               fps=torch.full((B,), float(c["fps"]), device=x0.device))
    keep = 1 - mask
    err = (v.float() - model.velocity_target(x0, eps)).pow(2) * keep
    n = C * T * H * W if c["loss_mean"] == "all" else keep.sum(dim=(1, 2, 3, 4)) * C
    per_sample = c["loss_scale"] * err.sum(dim=(1, 2, 3, 4)) / n
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
# the loop

def main(argv):
    c = configure(argv)
    env = setup(c)
    if c["dry_run"]:
        return plan_run(c, env)
    tok, tok_dtype, shapes = setup_tokenizer(c, env)
    cfg = model_config(c, tok.latent_channels)
    ckpt_dir = prepare_out_dir(c, env)
    resume_path = latest_checkpoint(ckpt_dir) if c["resume"] else None
    raw = build_model(c, cfg, env.device, init=not resume_path, say=env.say)
    net = wrap_model(raw, c, env)
    trainable, opt, sched, ema_params = make_optimizer(raw, c, env.device)
    G = c["batch_size"] * c["grad_accum"] * env.world
    step, step_pos = resume_state(resume_path, raw, opt, sched, ema_params, c, env, G)
    print_plan(c, raw, shapes, tok, env, env.world)
    if c["bench"]:
        return run_bench(c, net, raw, opt, tok, tok_dtype, shapes, env)
    train_ds, val_ds = make_datasets(c, env, tok)
    batches = iter(make_loader(train_ds, c, env, step_pos))
    text = load_text(c, cfg, env)
    periodic = Periodic(c, env, raw, net, opt, sched, ema_params, tok, tok_dtype, shapes, val_ds, text, G, step,
                        resume_path)
    gamma = power_ema_gamma(c["ema_sigma_rel"])

    while step < c["max_iters"]:
        raw.train()
        for micro in range(c["grad_accum"]):
            batch = next(batches)
            action = batch["action"].to(env.device, non_blocking=True) if cfg.action_mode != "none" else None
            g = step_generator(env.device, c["seed"], step, micro * env.world + env.rank)  # the global slot
            with gradient_sync(net, raw, env, micro == c["grad_accum"] - 1):
                x0 = batch_latents(batch, tok, tok_dtype, env.device)
                with env.autocast():
                    loss, per_sample, t = diffusion_loss(net, x0, action, shapes.V, c, g, text)
                (loss / c["grad_accum"]).backward()
            periodic.meter.add_micro(loss, per_sample, t, c["grad_accum"])
        gn = torch.nn.utils.clip_grad_norm_(trainable, c["grad_clip"] if c["grad_clip"] > 0 else float("inf"))
        periodic.meter.add_step(gn, loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema_params:
            ema_update(ema_params, ema_tracked(raw)[1], step, gamma)
        step += 1
        periodic(step)
    periodic.finish()
    if env.ddp:
        del net, periodic     # DDP's reducer holds the process group: drop it while the group is alive
        shutdown()


def shutdown():
    """End the process group with every rank present: when one rank had already left, gloo's destructor (run by
    DDP's reducer after the group ended) waited forever for it (seen on a 2-core CPU)."""
    import gc
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def gradient_sync(net, raw, env, sync):
    """Gradient all-reduce only on the last micro-step of an accumulation."""
    if env.fsdp:
        raw.set_requires_gradient_sync(sync)
    elif env.ddp and not sync:
        return getattr(net, "_orig_mod", net).no_sync()    # (through torch.compile's wrapper)
    return nullcontext()


def prepare_out_dir(c, env):
    """Check out_dir is writable before any work, and remove what a crashed save left (.tmp files and dirs)."""
    ckpt_dir = os.path.join(c["out_dir"], "checkpoints")
    if env.master:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            probe = os.path.join(ckpt_dir, ".write_test")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise RunError(c["out_dir"], f"out_dir is not writable ({e.strerror})") from None
        for d in (ckpt_dir, os.path.join(ckpt_dir, "model")):
            for name in os.listdir(d) if os.path.isdir(d) else []:
                if name.endswith(".tmp"):
                    p = os.path.join(d, name)
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
    barrier()
    return ckpt_dir


# -----------------------------------------------------------------------------
# periodic work: log, eval, save, sample

class Meter:
    """Training statistics summed on the device between log lines (no host sync per step): loss, grad norm,
    a non-finite flag, and the loss by t bucket."""
    BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0001)

    def __init__(self, device):
        self.buckets = torch.tensor(self.BUCKETS, device=device)
        self.stats = torch.zeros(3 + 2 * 4, device=device)

    @torch.no_grad()
    def add_micro(self, loss, per_sample, t, accum):
        self.stats[0] += loss.detach() / accum
        idx = torch.bucketize(t, self.buckets, right=True) - 1
        self.stats[3:7].index_add_(0, idx, per_sample)
        self.stats[7:11].index_add_(0, idx, torch.ones_like(per_sample))

    @torch.no_grad()
    def add_step(self, grad_norm, loss):
        self.stats[1] += grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.stats[2] += (~torch.isfinite(loss.detach())).float()

    def non_finite(self, env):
        bad = self.stats[2].clone()
        if env.ddp:
            dist.all_reduce(bad)
        return bad.item() > 0

    def read(self, env):
        """The summed statistics over all processes (a host sync), then reset."""
        s = self.stats.clone()
        if env.ddp:
            dist.all_reduce(s)
            s[:3] /= env.world
        self.stats.zero_()
        return s.tolist()


class Periodic:
    """Everything the loop does every N steps: log lines (log.jsonl), validation, checkpoints, sample videos,
    and the closing summary."""

    def __init__(self, c, env, raw, net, opt, sched, ema_params, tok, tok_dtype, shapes, val_ds, text, G, step,
                 last_good):
        self.c, self.env, self.raw, self.net, self.opt, self.sched, self.ema_params = c, env, raw, net, opt, sched, ema_params
        self.tok, self.tok_dtype, self.shapes, self.val_ds, self.text, self.G = tok, tok_dtype, shapes, val_ds, text, G
        self.meter = Meter(env.device)
        self.log_path = os.path.join(c["out_dir"], "log.jsonl")
        self.run_cfg = {"model": model.config_dict(raw.cfg), "train": c}
        if getattr(raw, "lora_base", None):
            self.run_cfg["lora"] = raw.lora_base
        self.fl = flops_per_sample(raw.cfg, shapes.tokens)
        self.peak = peak_flops(env.device)
        self.t0, self.last_step, self.last_good = time.time(), step, last_good
        from tqdm import tqdm
        # a progress bar only on a terminal: in a log file one line per log interval is the progress
        self.bar = tqdm(total=c["max_iters"], initial=step, dynamic_ncols=True, desc="train",
                        disable=not (env.master and sys.stdout.isatty()))

    def __call__(self, step):
        c, env = self.c, self.env
        self.bar.update(1)
        last = step == c["max_iters"]
        if step % c["log_interval"] == 0 or last:
            self.log(step)
        if c["eval_interval"] and (step % c["eval_interval"] == 0 or last) and len(self.val_ds):
            ev = evaluate(self.net, self.raw, self.tok, self.tok_dtype, self.val_ds, c, self.shapes, env, self.text)
            self.write(step, f"val loss {ev['val_loss']:.4f} | shuffled actions {ev['val_loss_shuffled']:.4f} | "
                             f"action gain {ev['action_gain']:+.4f}", ev)
        if step % c["save_interval"] == 0 or last:
            if self.meter.non_finite(env):
                raise FloatingPointError(f"non-finite loss before step {step}: not saving. "
                                         f"Last good checkpoint: {self.last_good or 'none'} (left intact).")
            self.last_good = save_checkpoint(c, self.run_cfg, self.raw, self.opt, self.sched, self.ema_params, step,
                                             self.G, env.rank, env.world)
            self.write(step, f"saved {self.last_good}")
        # under FSDP the rollout's forwards are collective, so every rank runs it; rank 0 writes the mp4
        if c["sample_interval"] and step % c["sample_interval"] == 0 and len(self.val_ds) and (env.master or env.fsdp):
            write_sample_video(self.raw, self.tok, self.val_ds, c, step, env, self.text)

    def write(self, step, text, record=None):
        if self.env.master:
            (print if self.bar.disable else self.bar.write)(f"step {step}: {text}")
            sys.stdout.flush()
            if record is not None:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps({"step": step, **record}) + "\n")

    def log(self, step):
        s, n, G = self.meter.read(self.env), step - self.last_step, self.G
        if s[2] > 0:
            raise FloatingPointError(f"non-finite loss between steps {self.last_step} and {step}: stopping. "
                                     f"Last good checkpoint: {self.last_good or 'none'} (left intact).")
        dt = time.time() - self.t0
        b = Meter.BUCKETS
        rec = {"loss": s[0] / n, "lr": self.sched.get_last_lr()[0], "grad_norm": s[1] / n,
               "samples_per_s": n * G / dt, "tokens_per_s": n * G * self.shapes.tokens / dt,
               "loss_t": {f"{b[i]:.2f}-{min(1, b[i + 1]):.2f}": (s[3 + i] / s[7 + i] if s[7 + i] else None)
                          for i in range(4)}}
        if self.peak:
            rec["mfu"] = n * G * self.fl / dt / (self.env.world * self.peak)
        if self.env.device.type == "cuda":
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2 ** 30
        self.write(step, f"loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | "
                         f"{rec['samples_per_s']:.1f} samples/s {rec['tokens_per_s']:.0f} tok/s"
                         + (f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else "")
                         + (f" | mem {rec['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in rec else "")
                         + " | loss by t " + " ".join(f"{v:.3f}" if v is not None else "-" for v in rec["loss_t"].values()),
                   rec)
        self.t0, self.last_step = time.time(), step

    def finish(self):
        self.bar.close()
        if not self.env.master:
            return
        ckpt_dir = os.path.join(self.c["out_dir"], "checkpoints")
        model_dir = os.path.join(ckpt_dir, "model")
        print(f"done. log: {self.log_path} | checkpoints: {ckpt_dir} (latest: {self.last_good})"
              + (f" | consolidated EMA weights: {model_dir}" if self.c["save_consolidated"] else ""))
        weights = os.path.join(model_dir, os.path.basename(self.last_good) + consolidated_suffix(self.raw))
        print(f"next: python sample.py --dit_path {weights if os.path.exists(weights) else self.last_good}"
              + (f" | merged official files: python convert.py export {self.last_good} DEST"
                 if getattr(self.raw, "lora", None) else ""))


@torch.no_grad()
def evaluate(net, raw, tok, tok_dtype, val_ds, c, shapes, env, text=None):
    """Val loss with the true actions and with another val clip's actions (fixed noise and t per batch).
    Their difference, the action gain, says whether the model uses the actions. The batches are shared out
    over the processes (val_batches)."""
    raw.eval()
    tot = torch.zeros(3, device=env.device)
    for i, weight, batch in val_batches(val_ds, c, env.rank, env.world):
        x0 = encode_views(tok, batch["video"].to(env.device), tok_dtype)
        for j, key in enumerate(("action", "other_action")):
            a = batch[key].to(env.device) if raw.cfg.action_mode != "none" else None
            g = step_generator(env.device, c["seed"], 10 ** 9 + i)
            with env.autocast():
                loss, _, _ = diffusion_loss(net, x0, a, shapes.V, c, g, text)
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
    import sample
    frames = val_ds.episode_frames(0)                                      # [V,3,N+1,H,W]
    actions = torch.as_tensor(val_ds.episodes[0].actions)
    with env.autocast():
        video = sample.rollout(raw.eval(), tok, frames[:, :, 0][None].to(env.device), actions[None].to(env.device),
                               num_frames=c["num_frames"], num_steps=20, seed=0,
                               cond_t=None if c["cond_t"] < 0 else c["cond_t"], fps=c["fps"], crossattn_emb=text,
                               amp=torch.bfloat16 if env.bf16 else None, progress=False)   # rollout sets its own
    raw.train()
    if env.master:
        path = os.path.join(c["out_dir"], "samples", f"iter_{step:09d}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sample.save_video(path, video[0].cpu(), gt=frames[:, :, : video.shape[3]], fps=c["fps"])


# -----------------------------------------------------------------------------
# checkpoints

def latest_checkpoint(ckpt_dir):
    f = os.path.join(ckpt_dir, "latest_checkpoint.txt")
    if not os.path.exists(f):
        return None
    name = open(f).read().strip()
    path = os.path.join(ckpt_dir, name)
    if not os.path.isdir(path):
        raise RunError(f, f"names {name}, which does not exist")
    return path


def state_options(raw, load=False):
    """LoRA: the checkpoints hold the trainable tensors only (the frozen base is init_from, fingerprinted)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    lora = bool(getattr(raw, "lora", None))
    return StateDictOptions(ignore_frozen_params=lora, strict=not (lora and load))


def consolidated_suffix(raw):
    """The consolidated file of a step: the full EMA weights (.pt), or under LoRA the EMA adapter (.safetensors
    with its LoRA record, which load_weights merges onto the base)."""
    return ".safetensors" if getattr(raw, "lora", None) else ".pt"


def train_state(raw, opt, sched, ema_params, step, G):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(raw, opt, options=state_options(raw))
    names = ema_tracked(raw)[0]
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
            if getattr(raw, "lora", None):
                import convert
                convert.save_weights(convert.prefixed(full), os.path.join(mdir, name + ".safetensors"),
                                     metadata=convert.adapter_metadata(cfg_json))
            else:
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
    set_state_dict(raw, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=state_options(raw, load=True))
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
# the plan: FLOPs and memory, printed at start-up and by --dry_run=True

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


def memory_plan(cfg, n_params, n_trainable, tokens, batch_size, shards=1, ema_params=None, frozen_bytes=4,
                act_bytes=2, fsdp=False):
    """Bytes per GPU of the model state and an activation estimate. Trainable weights are fp32 masters with an
    fp32 gradient and two fp32 AdamW moments; frozen weights take frozen_bytes each (4 here; 2 for a bf16
    frozen base under LoRA) and nothing else; the EMA is fp32 (ema_params: how many it covers, default all).
    FSDP shards all of it `shards` ways and adds the bf16 copies of the two blocks gathered at a time.
    Activations: about 34 * D bytes per token per block in bf16 (Korthikanti et al. 2022, sbh*34 with an
    attention kernel that stores no score matrix), scaled by act_bytes / 2; with per-block checkpointing only
    each block's input (act_bytes * D per token) is kept, plus one block's worth during its recomputation."""
    frozen = n_params - n_trainable
    ema_n = n_params if ema_params is None else ema_params
    plan = {"weights": (4 * n_trainable + frozen_bytes * frozen) / shards,
            "grads": 4 * n_trainable / shards,
            "optimizer": 8 * n_trainable / shards,
            "ema": 4 * ema_n / shards,
            "gathered": 2 * 2 * n_params / cfg.num_blocks if fsdp else 0}
    plan["model_state"] = sum(plan.values())
    block = 17 * act_bytes * cfg.model_channels * tokens * batch_size
    plan["activations"] = cfg.num_blocks * block
    plan["activations_checkpointed"] = cfg.num_blocks * act_bytes * cfg.model_channels * tokens * batch_size + block
    return plan


def print_plan(c, raw, shapes, tok, env, world):
    """The start-up summary: parallelism, parameters trainable/frozen, tokens, FLOPs, memory per GPU."""
    cfg, say, G = raw.cfg, env.say, c["batch_size"] * c["grad_accum"] * world
    frozen = [n for n, p in raw.named_parameters() if not p.requires_grad]
    n_all = sum(p.numel() for p in raw.parameters())
    n_train = n_all - sum(p.numel() for p in raw.parameters() if not p.requires_grad)
    fsdp = c["parallel"] == "fsdp" and world > 1
    bf16 = env.bf16 or (c["dry_run"] and c["dtype"] != "float32")
    say(f"nanocosmos train | world {world} x {env.device.type} | parallel {c['parallel'] if world > 1 else 'none'} | "
        f"dtype {'bf16 autocast, fp32 master' if bf16 else 'fp32'}")
    say(f"model {c['model_size']}: {n_all / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable, "
        f"{(n_all - n_train) / 1e6:.2f}M frozen) | action {cfg.action_mode} ({cfg.action_in_features} in) | "
        f"view emb {cfg.n_views_emb} | activation ckpt {c['activation_checkpointing']} | compile {c['compile']}")
    lora = getattr(raw, "lora", None)
    if lora:
        n_fac = sum(p.numel() for n, p in raw.named_parameters() if n.endswith((".lora_A", ".lora_B")))
        say(f"LoRA rank {lora['rank']} alpha {lora['alpha']:g} on {', '.join(lora['targets'])}: {n_fac / 1e6:.2f}M "
            f"factors + {(n_train - n_fac) / 1e6:.2f}M in full ({', '.join(lora['train_full'])}) | frozen base "
            f"{lora['base_dtype']} ({len(frozen)} tensors) from {c['init_from']}")
    elif frozen:   # the same names in every block are listed once as blocks.*.
        names = sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", n) for n in frozen})
        say(f"frozen (zero gradient with the all-zero text): {len(frozen)} tensors: {', '.join(names)}")
    fl = flops_per_sample(cfg, shapes.tokens)
    say(f"data: {shapes.V} views x {shapes.T} frames {shapes.H}x{shapes.W} -> latent {tok.latent_channels}x{shapes.t}"
        f"x{shapes.h}x{shapes.w} per view ({c['tokenizer']} tokenizer) | {shapes.tokens} tokens/sample | batch "
        f"{c['batch_size']} x accum {c['grad_accum']} x world {world} = {G} samples, {G * shapes.tokens} tokens/step")
    say(f"compute: {fl / 1e9:.4g} GFLOP/sample, {fl * G / 1e12:.4g} TFLOP/step (fwd + bwd, no recomputation)")
    n_ema = sum(p.numel() for p in ema_tracked(raw)[1]) if c["ema"] else 0
    m = memory_plan(cfg, n_all, n_train, shapes.tokens, c["batch_size"], shards=world if fsdp else 1,
                    ema_params=n_ema, frozen_bytes=2 if lora and lora["base_dtype"] == "bfloat16" else 4,
                    act_bytes=2 if bf16 else 4, fsdp=fsdp)
    gb = lambda b: f"{b / 2 ** 30:.2f}"  # noqa: E731
    say(f"memory per GPU: model state {gb(m['model_state'])} GB = weights {gb(m['weights'])} + grads {gb(m['grads'])}"
        f" + AdamW {gb(m['optimizer'])} + EMA {gb(m['ema'])}"
        + (f" + gathered bf16 blocks {gb(m['gathered'])}" if fsdp else "")
        + (f" (sharded {world} ways)" if fsdp else " (replicated)")
        + f" | activations ~{gb(m['activations'])} GB, ~{gb(m['activations_checkpointed'])} GB with checkpointing"
        + (" (on)" if c["activation_checkpointing"] else " (off)"))
    n_tok = sum(p.numel() for p in tok.parameters())
    tok_bytes = n_tok * (2 if bf16 and n_tok else 4)
    say(f"tokenizer {c['tokenizer']}: {n_tok / 1e6:.1f}M params, {gb(tok_bytes)} GB, frozen"
        + (f" | {torch.cuda.memory_allocated(env.device) / 2 ** 30:.2f} GB allocated now"
           if env.device.type == "cuda" and not c["dry_run"] else ""))
    act = m["activations_checkpointed" if c["activation_checkpointing"] else "activations"]
    est = m["model_state"] + act + tok_bytes
    say(f"plan: ~{gb(est)} GB per GPU (model state + activations + tokenizer; plus the CUDA context and the "
        f"tokenizer's encode, ~1-3 GB) | " + fits_verdict(est))


def fits_verdict(est_bytes, cards=(24, 48, 80), reserve_gb=3.0):
    """Which card sizes the estimate fits, keeping reserve_gb for the CUDA context (~0.5-1 GB), the tokenizer's
    encode buffers and allocator fragmentation: the activation term is an estimate, and a plan that needs the
    last gigabyte of a card will not run."""
    return ", ".join(f"{gb} GB: {'fits' if est_bytes / 2 ** 30 + reserve_gb <= gb else 'does not fit'}"
                     for gb in cards)


def plan_run(c, env):
    """The plan of the configured run, built on the meta device: no data, no weights, no GPU."""
    tok, _, shapes = setup_tokenizer(c, env, meta=True)
    raw = build_model(c, model_config(c, tok.latent_channels), "meta")
    world = int(os.environ.get("WORLD_SIZE", 0)) or c["plan_gpus"]
    print_plan(c, raw, shapes, tok, Env(False, 0, world, torch.device("cuda"), env.bf16, c["parallel"]), world)
    env.say(f"dry run: planned for {world} GPU(s) (plan_gpus); nothing was read or trained")
    return raw


# -----------------------------------------------------------------------------
# bench

def run_bench(c, net, raw, opt, tok, tok_dtype, shapes, env):
    """Training steps on random inputs at the configured shapes: uint8 video through the tokenizer (the online
    path), or with bench_latents random latents straight into the loss (what a latent-cache run does per step;
    reading the cache is the loader's work, not timed here). The data loader is not timed in either mode. Steps
    0-1 warm up (kernel selection, compile); the next bench_steps are timed. Under torchrun every rank runs and
    rank 0 prints; steps/s is per step of the whole job, tokens/s and samples/s are summed over ranks, MFU is per
    GPU (bf16 dense peak of the GPU, PEAK_BF16_FLOPS) with the FLOPs of flops_per_sample (no recomputation)."""
    g = torch.Generator(device=env.device).manual_seed(c["seed"] + env.rank)
    B, dev = c["batch_size"], env.device
    lat_shape = (B, tok.latent_channels, shapes.V * shapes.t, shapes.h, shapes.w)
    video = (None if c["bench_latents"] else
             torch.randint(0, 256, (B, shapes.V, 3, shapes.T, shapes.H, shapes.W), generator=g, device=dev,
                           dtype=torch.uint8))
    action = (torch.randn(B, shapes.T - 1, c["action_dim"], generator=g, device=dev)
              if raw.cfg.action_mode != "none" else None)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(c["bench_steps"] + 2):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            x0 = (torch.randn(lat_shape, generator=g, device=dev) if c["bench_latents"]
                  else encode_views(tok, video, tok_dtype))
        with env.autocast():
            loss, _, _ = diffusion_loss(net, x0, action, shapes.V, c, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    dt = sum(times[2:]) / len(times[2:])
    res = {"steps_per_s": 1 / dt, "samples_per_s": B * env.world / dt,
           "tokens_per_s": B * env.world * shapes.tokens / dt, "step_s": dt}
    peak = peak_flops(dev)
    if peak:
        res["mfu"] = B * flops_per_sample(raw.cfg, shapes.tokens) / dt / peak
    if dev.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    else:
        import resource
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    mode = "latents (encode skipped)" if c["bench_latents"] else f"video ({c['tokenizer']} encode included)"
    env.say(f"bench {c['model_size']}, {mode}, activation ckpt {c['activation_checkpointing']}, "
            f"{c['bench_steps']} steps x {B * env.world} samples: "
            + " | ".join(f"{k} {v:.4g}" for k, v in res.items()))
    if env.ddp:
        del net
        shutdown()
    return res


# -----------------------------------------------------------------------------

def known_error(e):
    """The one-line message of an error the user can fix, or None (configurator.known_error with train's errors)."""
    return configurator.known_error(e, known_errors())


def known_errors():
    import convert
    import data
    return data.DataError, convert.CheckpointError, RunError, FloatingPointError


if __name__ == "__main__":
    configurator.exit_on_known_errors(main, sys.argv[1:], known_errors())
