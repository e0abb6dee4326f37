"""
Roll a trained nanocosmos world model (or a released Cosmos one) out over a whole robot trajectory, write the
video, or evaluate it.

    python sample.py                                   # latest checkpoint of `python train.py`, first val episode
    python sample.py --compare=True --num_steps 20     # ground truth beside the prediction
    python sample.py --eval                            # PSNR / SSIM / latent L2 over the val split, vs standing still
    python sample.py --model_size 2B --dit_path checkpoints/.../model/iter_000001000.pt \\
        --input_path datasets/multiview_action/videos/cam0/example.mp4 \\
        --annotation datasets/multiview_action/annotations/example.json \\
        --num_conditional_frames 1 --save_path output/multiview_action_result.mp4
    python sample.py -i inference_params.json -o OUT --checkpoint-path model_ema_bf16.pt [--experiment NAME]
                                                       # the Cosmos-Predict2.5 action guide's command (official_run)
    python sample.py --bench --model_size 2B           # seconds per 4-view chunk, random weights, no dataset

Given the first frame of every camera and the episode's actions, the model predicts 12 frames at a time
(13-frame models: 1 conditioning frame + 12 new ones); each chunk starts from the last frame it generated.
Samplers: Predict2's second-order AB2 multistep on the Karras sigma grid (and Euler), conditioned frames at
sigma 1e-4 (shared/spec/dit.md 7.1); Predict2.5's flow UniPC with shift 5, conditioned frames at the same t
(fixtures/README.md). The family of the net (convert.family) picks the default; tests/test_sample.py holds the
UniPC loop to the official one (tests/fixtures/sampler_*). The rectified-flow maths live in model.py only.
Precision: on CUDA the DiT runs under bf16 autocast and the tokenizer in bf16, TF32 on (--dtype float32 for full
precision); on CPU float32. Known errors print one line `error: <file>: <problem>` and exit 1.
Options are --key=value or --key value (configurator.py); a bare --eval / --compare / --disable_guardrail /
--overwrite / --compile / --bench means True.
"""

import math
import runpy
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import configurator
import model
from configurator import ConfigError, UserError  # noqa: F401 (ConfigError: callers' except clauses)
from vae import latent_frames

# -----------------------------------------------------------------------------
# default config. Empty / None / 0 = take it from the checkpoint's run config (what train.py was told).
# what to load
dit_path = "out/synthetic/checkpoints"  # training checkpoint dir (latest), iter_* dir, consolidated .pt / .safetensors
model_size = ""                # --bench: a random net of this size; else accepted for the official command line
                               # (the checkpoint decides the size)
ema = True                     # EMA weights when the checkpoint has both
# what to roll out: a dataset episode (default) or files
data_root = ""                 # "" -> run config data_root (train.py's default: datasets/synthetic)
split = ""                     # "" -> run config val_split ("val")
episode = None                 # None -> the first episode of the split; an index or an episode name
input_path = ""                # one camera's video of the episode; the others are the same name in sibling cam<k>/
annotation = ""                # episode JSON (state, continuous_gripper_state[, videos]), a JSON list, or a folder
cameras = None                 # camera ids (cam<k> folders / IRASim videos[k]); None -> run config
num_conditional_frames = 1     # pixel frames; the action models condition on exactly one
max_actions = 0                # 0: the whole trajectory; n: only the first n actions (n+1 frames)
# sampling
num_steps = 35
sampler = ""                   # "" -> the family's: "unipc" (Predict2.5 nets) or "ab2" (Predict2); or "euler"
shift = 5.0                    # unipc: shift of the sigma grid (Predict2.5: 5)
sigma_grid = ""                # unipc grid: "" -> "linear" (shifted; the released robot model's experiment), or
                               # "karras" (use_kerras_sigma_at_inference; -i mode: as the --experiment composes it)
seed = 0                       # chunk starting at time step i uses seed + i (Cosmos: seed = i)
guidance = 0.0                 # CFG scale; changes nothing while both branches see the same text (zeros by default)
cond_t = None                  # t of the conditioning latent; None -> run config / family (<0 = same t as the rest)
text_embedding = ""            # safetensors text context for every sample (convert.load_text_embedding); "" = zeros
negative_text_embedding = ""   # the unconditional branch's text (official: the negative prompt); "" = zeros
dtype = ""                     # "" -> "bfloat16" on CUDA (DiT autocast, tokenizer bf16, TF32), "float32" on CPU
compile = False                # torch.compile the DiT
# data settings (None / 0 -> run config)
num_frames = 0
frame_size = ()                # H, W: 256x320, 256,320 or (256, 320); () -> run config
frame_stride = 0
action_scale = 0.0
gripper_scale = 0.0
fps = 0                        # what the net is told; also the mp4 rate unless save_fps is set
action_key = ""                # LeRobot folders: these four as in train.py ("": the run config's)
action_type = ""
action_norm = ""
state_key = ""
tokenizer = ""
tokenizer_path = ""
pixel_factor = 0
# output
save_path = "output/sample.mp4"
overwrite = False              # replace existing outputs (else a named one is an error, before sampling, and a
                               # taken default name moves to the next free one: output/sample_1.mp4)
strip_path = ""                # PNG frame strip; "" -> save_path with .png
save_fps = 0
compare = False                # ground truth beside the prediction
save_frames = False            # also write the exact uint8 frames beside each mp4 (.safetensors "video" [V,3,T,H,W])
eval = False                   # metrics over the split instead of a video (shadows the builtin, never used here)
eval_episodes = 0              # 0: every episode of the split
eval_json = ""                 # "" -> output/eval.json
disable_guardrail = False      # accepted for the official command line: nanocosmos has no guardrail
device = "auto"                # "auto" | "cpu" | "cuda"
bench = False                  # time two chunks on random frames and actions (no dataset); with --model_size:
                               # a random-weight Predict2.5 multi-view action net of that size, 4 cameras
policy = ""                    # file.py:fn | pkg.mod:fn: closed loop from the first frames (policy.py), actions to
                               # <save_path>.actions.json; replay: --policy policy.py:replay --policy_arg that.json
policy_arg = ""                # with --policy: fn is a factory, fn(policy_arg, settings) returns the policy
policy_eval = False            # reference policies in synth.World and in the model: success rates, agreement
policy_episodes = 16           # --policy_eval: first scenes per policy, episodes from the val split's first on
policy_scores = ""             # --policy_eval: JSON {policy name: real success rate}, compared as well
policy_json = ""               # --policy_eval report; "" -> output/policy_eval.json (chart: .png beside it)
_KEYS = configurator.config_keys(globals())
_DEFAULTS = {k: globals()[k] for k in _KEYS}
_FLAGS = [k for k in _KEYS if isinstance(_DEFAULTS[k], bool)]
# -----------------------------------------------------------------------------

SIGMA_MAX, SIGMA_MIN, RHO = 80.0, 0.002, 7.0   # Predict2 Video2World / action sampler (dit.md 7.1)


# -----------------------------------------------------------------------------
# samplers: both integrate the same probability-flow ODE, starting from x = sigma_max * eps.
# denoise(x_t, t) -> x0 is the conditioned (and guided) model; x_t = (1 - t) x0 + t eps, t = sigma / (1 + sigma).

def karras_sigmas(num_steps, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, rho=RHO):
    """N+1 sigmas from sigma_max down to sigma_min, float64 (as official)."""
    i = torch.arange(num_steps + 1, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / num_steps * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sample_ab2(denoise, eps, num_steps):
    """The official "2ab" RectifiedFlowAB2Scheduler: an exponential integrator in lambda = -ln sigma on the
    sigma-space state x_sigma = x0 + sigma eps. Step 0 is Euler, later steps add the previous x0 (Adams-Bashforth 2).
    N steps, then a last x0 evaluation at sigma_min: N+1 network calls. Coefficients in float64."""
    sigmas = karras_sigmas(num_steps).tolist()
    x = sigmas[0] * eps
    x0_prev = None
    for i in range(num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x / (1 + s), model.sigma_to_t(s))          # the net sees x_t = x_sigma / (1 + sigma)
        if i == 0:
            x = (s_next / s) * x + (1 - s_next / s) * x0
        else:
            h = math.log(s / s_next)
            c2 = math.log(s / sigmas[i - 1]) / h                  # negative: the previous point is behind
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b2 = phi2 / c2
            b1 = phi1 - b2
            x = math.exp(-h) * x + h * (b1 * x0 + b2 * x0_prev)
        x0_prev = x0
    return denoise(x / (1 + sigmas[-1]), model.sigma_to_t(sigmas[-1]))


def sample_euler(denoise, eps, num_steps):
    """Plain velocity Euler in t, on the same Karras grid mapped to t (so it converges to what AB2 does as steps
    grow), then one last step to t = 0. v = (x_t - x0) / t is the net's velocity. N+1 network calls, like AB2."""
    ts = [model.sigma_to_t(s) for s in karras_sigmas(num_steps).tolist()] + [0.0]
    x = ts[0] * eps                                                # = sigma_max eps / (1 + sigma_max), AB2's start
    for t, t_next in zip(ts[:-1], ts[1:]):
        x0 = denoise(x, t)
        x = x + (t_next - t) * (x - x0) / t
    return x


def unipc_schedule(num_steps, shift=5.0, grid="linear"):
    """Predict2.5's grid (fm_solvers_unipc.py:72-122, set_timesteps :150-219). "linear": N sigmas from
    float32(0.999) (not 1) towards 0, shifted s -> shift s / (1 + (shift-1) s). "karras" (the experiment's
    use_kerras_sigma_at_inference, :170-179): EDM's Karras ladder 200 -> 0.01 (rho 7) at N + 1 points, mapped
    s -> s / (1 + s); the shift is unused and the ladder keeps all N + 1 rungs, so N + 1 steps (36 from t 0.995).
    float64 throughout. Returns (int64 [n] = truncated 1000 sigma, what the net sees; float32 [n+1] sigmas with a
    final 0, what the solver uses)."""
    if grid == "karras":
        lo, hi = 0.01 ** (1 / 7), 200.0 ** (1 / 7)
        s = (hi + np.arange(num_steps + 1) / num_steps * (lo - hi)) ** 7
        s = s / (1 + s)
    elif grid == "linear":
        s = np.linspace(float(np.float32(0.999)), 0.0, num_steps + 1)[:-1]
        s = shift * s / (1 + (shift - 1) * s)
    else:
        raise UserError(f"--sigma_grid={grid!r}", "must be 'linear' or 'karras'")
    return torch.from_numpy((s * 1000).astype(np.int64)), torch.from_numpy(np.append(s, 0.0).astype(np.float32))


def sample_unipc(denoise, eps, num_steps, shift=5.0, record=None, grid="linear"):
    """The official flow UniPC (fm_solvers_unipc.py:337-713; bh2, order 2, data prediction, lower order at the
    end): a multistep exponential integrator in lambda = log((1-s)/s) whose predictor (UniP) extrapolates from the
    last two x0 predictions and whose corrector (UniC) re-solves the previous step with the new x0, at no extra
    network call. denoise(x_t, t, t_net) -> x0 with the net fed t_net (the truncated 1000-scale t / 1000).
    record: a dict that receives per step the latents, x0 predictions and corrected samples. grid: unipc_schedule."""
    ts, sig = unipc_schedule(num_steps, shift, grid)
    num_steps = len(ts)   # the Karras ladder has one step more
    sig = sig.tolist()
    lam = [math.log((1 - s) / s) if s > 0 else math.inf for s in sig]
    x, x_prev, x0s, order = eps, None, [], 0
    for i in range(num_steps):
        x0 = denoise(x, sig[i], ts[i].item() / 1000)
        if record is not None:
            record.setdefault("latents", []).append(x)
            record.setdefault("x0_pred", []).append(x0)
        if i > 0:   # UniC: redo step i-1 (from x_prev, of the order it had) with x0 as the extra point
            h = lam[i] - lam[i - 1]
            h_phi_1 = math.expm1(-h)                                         # = B_h (bh2)
            corr = 0.5 * (x0 - x0s[-1])
            if order == 2:
                rk = (lam[i - 2] - lam[i - 1]) / h
                k1 = h_phi_1 / -h - 1
                r0, r1 = np.linalg.solve([[1.0, 1.0], [rk, 1.0]], [k1 / h_phi_1, 2 * (k1 / -h - 0.5) / h_phi_1])
                corr = r0 * (x0s[-2] - x0s[-1]) / rk + r1 * (x0 - x0s[-1])
            x = sig[i] / sig[i - 1] * x_prev - (1 - sig[i]) * h_phi_1 * (x0s[-1] + corr)
        if record is not None:
            record.setdefault("sample_corrected", []).append(x)
        x0s.append(x0)
        order = min(2, num_steps - i, i + 1)
        x_prev = x
        if sig[i + 1] == 0:                                                  # lambda = inf: the step lands on x0
            x = x0
            continue
        h = lam[i + 1] - lam[i]
        h_phi_1 = math.expm1(-h)                                             # UniP: the order-1 step ...
        x = sig[i + 1] / sig[i] * x - (1 - sig[i + 1]) * h_phi_1 * x0
        if order == 2:                                                       # ... plus half the x0 difference
            rk = (lam[i - 1] - lam[i]) / h
            x = x - (1 - sig[i + 1]) * h_phi_1 * 0.5 * (x0s[-2] - x0) / rk
    return x


SAMPLERS = {"ab2": sample_ab2, "euler": sample_euler, "unipc": sample_unipc}


# -----------------------------------------------------------------------------
# chunked autoregressive multi-view rollout

def to_uint8(video, truncate=False):
    """[-1, 1] (the tokenizer's decode is unclamped) -> uint8, rounded (native: the nearest level), or truncated as
    the official command's ((v + 1) / 2 * 255).to(uint8) after the Wan decoder's clamp (action_conditioned.py:349-352)."""
    v = ((video.float() + 1) * 127.5).clamp(0, 255)
    return (v if truncate else v.round()).to(torch.uint8)


def check_rollout(net, tokenizer, first_frames_B_V_3_H_W, A, num_frames, sampler, cond_t):
    """Every input and setting of a rollout, checked before any work (A: the action width, None when a policy
    gives the actions: checked on its first chunk)."""
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler={sampler!r}", f"must be one of {sorted(SAMPLERS)}")
    if sampler == "unipc" and cond_t is not None:
        raise UserError(f"--cond_t={cond_t!r}", "the unipc sampler conditions as Predict2.5 does (clean frames at the same "
                                                  "t): cond_t must be unset or < 0")
    B, V, C3, H, W = first_frames_B_V_3_H_W.shape
    if C3 != 3 or first_frames_B_V_3_H_W.dtype != torch.uint8:
        raise ValueError(f"first frames must be uint8 [B, V, 3, H, W], got {first_frames_B_V_3_H_W.dtype} "
                         f"{list(first_frames_B_V_3_H_W.shape)}")
    s, p = tokenizer.spatial_factor, net.cfg.patch_spatial
    if H % (s * p) or W % (s * p):
        raise UserError(f"--frame_size={(H, W)}", f"must be a multiple of {s * p} (tokenizer {s} x patch {p})")
    cfg, per_chunk = net.cfg, num_frames - 1
    if cfg.action_mode == "global" and cfg.num_actions != per_chunk:
        raise UserError(f"--num_frames={num_frames}", f"needs {per_chunk} actions per chunk, the model takes "
                                                        f"{cfg.num_actions}")
    if cfg.action_mode == "per_frame":
        need = (latent_frames(num_frames, tokenizer.temporal_factor) - 1) * cfg.actions_per_latent
        if need != per_chunk:
            raise UserError(f"--num_frames={num_frames}", f"gives {need} actions per chunk at {cfg.actions_per_latent} "
                                                            f"per latent frame, but a chunk spans {per_chunk} steps")
    if cfg.action_mode != "none" and A is not None and A != cfg.action_dim:
        raise UserError("actions", f"the model takes {cfg.action_dim}-D actions, got {A}-D")


def pad_actions(a_B_n_A, n, hold=True):
    """The last chunk of a trajectory whose length is not a multiple of 12: 'hold still' (zero motion, the gripper
    kept at its last value; the gripper column is an absolute target, not a delta). Cosmos zero-pads, which also
    commands the gripper open (0). Only frames driven by real actions are kept, but in a global-chunk model the
    padding still reaches every frame through the one action embedding, and in any model through attention, so
    the least surprising padding is the robot standing still. hold=False: zeros, as the official command
    (action_conditioned.py:316-322)."""
    B, k, A = a_B_n_A.shape
    pad = a_B_n_A.new_zeros(B, n - k, A)
    if hold:
        pad[..., -1] = a_B_n_A[:, -1:, -1]
    return torch.cat([a_B_n_A, pad], dim=1)


def tokenizer_param(tokenizer):
    """A tensor of the tokenizer: its device and dtype are what encode/decode take."""
    p = next(iter(tokenizer.parameters()), None)
    return p if p is not None else next(iter(tokenizer.buffers()))


def encode(tokenizer, video_N_3_T_H_W):
    """uint8 video -> float32 latents, in the tokenizer's device and dtype."""
    p = tokenizer_param(tokenizer)
    return tokenizer.encode((video_N_3_T_H_W.float() / 127.5 - 1).to(p.device, p.dtype)).float()


def decode(tokenizer, z, truncate=False):
    p = tokenizer_param(tokenizer)
    return to_uint8(tokenizer.decode(z.to(p.device, p.dtype)), truncate).cpu()


def encode_frames(tokenizer, frames_B_V_3_H_W, latent_T):
    """The conditioning latents [B, C, V*latent_T, h, w]: latent 0 of every view from its frame, the rest zeros
    (masked). Encoding the frame alone gives exactly latent 0 of the 13-frame clip Cosmos encodes (frame 0 followed by
    zeros): both tokenizers are causal, latent 0 sees frame 0 only."""
    B, V = frames_B_V_3_H_W.shape[:2]
    z = encode(tokenizer, rearrange(frames_B_V_3_H_W, "b v c h w -> (b v) c 1 h w"))
    z = F.pad(z, (0, 0, 0, 0, 0, latent_T - 1))
    return rearrange(z, "(b v) c t h w -> b c (v t) h w", b=B, v=V)


def chunk_noise(seed, shape):
    """numpy RandomState normal noise, as the official arch_invariant_rand: the same on every device."""
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32))


def guided_velocity(net, x_t, t_B, x0_cond, mask, noise, guidance=0.0, ctx=None, neg_ctx=None,
                    uncond_anchored=False, **kw):
    """Predict2.5's velocity (text2world_model_rectified_flow.py denoise + the action model's velocity_fn :174-294):
    conditioned frames fed clean at the SAME t, their velocity replaced by noise - x0_cond (noise: the chunk's
    initial noise); CFG cond + g (cond - uncond), or uncond + g (cond - uncond) for the multi-view model
    (multiview_vid2vid_model_rectified_flow.py:381). ctx / neg_ctx: prompt / negative-prompt text (None = zeros)."""
    v = model.predict_velocity(net, x_t, t_B, x0_cond, mask, None, crossattn_emb=ctx, **kw).float()
    if ctx is not neg_ctx and (guidance != 0 or uncond_anchored):   # same text: cond = uncond, CFG changes nothing
        v_u = model.predict_velocity(net, x_t, t_B, x0_cond, mask, None, crossattn_emb=neg_ctx, **kw).float()
        v = v_u + guidance * (v - v_u) if uncond_anchored else v + guidance * (v - v_u)
    return mask * (noise - x0_cond) + (1 - mask) * v


def sample_chunk(net, x0_cond, eps, mask, cond, *, V, num_steps, sampler, shift, sigma_grid, cond_t, fps_B, guidance,
                 ctx, neg, uncond_anchored, amp):
    """The latents of one chunk: the sampler (a pure function of denoise) over the conditioned, guided net.
    Returns (latents, net calls)."""
    B, dev = x0_cond.shape[0], x0_cond.device
    two_branches = ctx is not neg and (guidance != 0 or uncond_anchored)
    net_kw = dict(cond, num_views=V, fps=fps_B)
    calls = 0

    def denoise(x_t, t, t_net=None):
        """x0 at solver time t; the net is told t_net (Predict2.5: the truncated 1000-scale t) or t."""
        nonlocal calls
        calls += 1 + two_branches
        t_B = torch.full((B,), t if t_net is None else t_net, device=dev, dtype=x_t.dtype)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            if sampler == "unipc":
                v = guided_velocity(net, x_t, t_B, x0_cond, mask, eps, guidance, ctx, neg, uncond_anchored, **net_kw)
                return x_t - t * v.float()
            x0 = model.predict_x0(net, x_t, t_B, x0_cond, mask, cond_t, crossattn_emb=ctx, **net_kw).float()
            if two_branches:   # Predict2: cond-anchored CFG (dit.md 7.1)
                x0_u = model.predict_x0(net, x_t, t_B, x0_cond, mask, cond_t, crossattn_emb=neg, **net_kw)
                x0 = x0 + guidance * (x0 - x0_u.float())
            return x0

    if sampler == "unipc":
        return sample_unipc(denoise, eps, num_steps, shift, grid=sigma_grid or "linear"), calls
    return SAMPLERS[sampler](denoise, eps, num_steps), calls


def chunk_cond(net, cond, policy, frame, start, per_chunk, N, history, hold):
    """The conditioning of the chunk starting at time step `start`: each signal's [start, start + per_chunk) slice
    (open loop) or the policy's answer given the latest frames (closed loop), padded to a whole chunk (pad_actions).
    Returns (cond of the chunk, its real action count, the chunk's actions as given)."""
    if policy is not None:
        a = policy(frame, start, history)[:, :min(per_chunk, N - start)].float().cpu()
        if a.ndim != 3 or a.shape[1] == 0 or (a.shape[1] < per_chunk and start + a.shape[1] < N):
            raise ValueError(f"policy returned {list(a.shape)} at step {start}: a chunk needs [B, {per_chunk}, A]")
        if net.cfg.action_mode != "none" and a.shape[2] != net.cfg.action_dim:
            raise UserError("policy", f"the model takes {net.cfg.action_dim}-D actions, it gave {a.shape[2]}-D")
        cond = {"action": a}
        start = 0
    chunk = {k: v[:, start:start + per_chunk].float() for k, v in cond.items()}
    n_real = chunk["action"].shape[1] if "action" in chunk else min(per_chunk, N - start)
    given = chunk.get("action")
    chunk = {k: pad_actions(v, per_chunk, hold) if v.shape[1] < per_chunk else v for k, v in chunk.items()}
    if net.cfg.action_mode == "none":
        chunk.pop("action", None)
    return chunk, n_real, given


@torch.no_grad()
def rollout(net, tokenizer, first_frames_B_V_3_H_W, actions_B_N_A=None, *, policy=None, num_actions=None, cond=None,
            num_frames=13, num_steps=35, sampler="ab2", shift=5.0, seed=0, cond_t=None, fps=4, guidance=0.0,
            crossattn_emb=None, neg_crossattn_emb=None, amp=None, progress=True, timings=None, sigma_grid=None,
            return_actions=False, official=False, chunks=None):
    """
    Predict every camera over the whole action sequence. Returns uint8 [B, V, 3, N+1, H, W]: frame k is time step k
    (frame 0 is the given frame; frame k >= 1 follows actions 0..k-1). Chunk c covers time steps 12c..12c+12 (for
    13-frame models): it is conditioned on time step 12c (the given frame for c = 0, else the previous chunk's last
    generated frame, converted to uint8 and re-encoded, as Cosmos does) and its actions are actions[12c:12c+12];
    the last chunk is padded (pad_actions) and only its real frames kept. Chunk c draws its noise with
    seed + 12c. Nothing but the first frames and the actions is read: no ground truth beyond the conditioning frame.
    Conditioning: actions_B_N_A (open loop; shorthand for cond={"action": ...}), cond (every signal [B, N, ...],
    passed per chunk to the net as **cond), or policy(frames_B_V_3_H_W, step, history) -> the next chunk's actions
    [B, n, A] (closed loop over num_actions steps; replaying a fixed sequence equals open loop bit for bit).
    "unipc" (Predict2.5) feeds the conditioned frames clean at the same t and replaces their velocity
    (guided_velocity); "ab2" / "euler" (Predict2) feed them at cond_t (None: the same t) and replace their x0.
    crossattn_emb / neg_crossattn_emb: [1, N, C] text of the conditional / unconditional branch (None = zeros).
    amp: None (float32) or the autocast dtype of the DiT. timings: a list that receives one dict per chunk.
    sigma_grid: unipc's grid ("linear" default, or "karras"). official=True: the official command's conversions
    (truncating uint8, zero padding). chunks: a list that receives each chunk's decoded uint8 [B, V, 3, 13, H, W]
    (frame 0 the reconstruction of its conditioning frame), from which official.py writes the official layout.
    return_actions: also return the actions used [B, N, A].
    """
    if (actions_B_N_A is None) + (cond is None) + (policy is None) != 2:
        raise ValueError("rollout takes exactly one of actions_B_N_A, cond or policy")
    cond = {"action": actions_B_N_A} if actions_B_N_A is not None else cond
    N = num_actions if policy is not None else next(iter(cond.values())).shape[1]
    A = cond["action"].shape[2] if cond is not None and "action" in cond else None
    check_rollout(net, tokenizer, first_frames_B_V_3_H_W, A, num_frames, sampler, cond_t)
    B, V, _, H, W = first_frames_B_V_3_H_W.shape
    per_chunk = num_frames - 1
    T_lat = latent_frames(num_frames, tokenizer.temporal_factor)
    h, w = H // tokenizer.spatial_factor, W // tokenizer.spatial_factor
    dev = next(net.parameters()).device
    mask = model.condition_mask(B, V, T_lat, h, w, 1, device=dev)
    ctx, neg = (None if e is None else e.to(dev) for e in (crossattn_emb, neg_crossattn_emb))
    # the Predict2.5 multi-view (video) model anchors CFG on uncond; action models, Predict2.5 or not, on cond
    uncond_anchored = sampler == "unipc" and net.cfg.n_views_emb > 0 and net.cfg.action_mode == "none"
    if guidance != 0 and ctx is neg and progress:
        print("guidance: no effect (the conditional and unconditional text are the same, so are the predictions)")
    kw = dict(V=V, num_steps=num_steps, sampler=sampler, shift=shift, sigma_grid=sigma_grid, cond_t=cond_t,
              fps_B=torch.full((B,), float(fps), device=dev), guidance=guidance, ctx=ctx, neg=neg,
              uncond_anchored=uncond_anchored, amp=amp)
    out = torch.empty(B, V, 3, N + 1, H, W, dtype=torch.uint8)
    out[:, :, :, 0] = first_frames_B_V_3_H_W.cpu()
    frame, used = first_frames_B_V_3_H_W, []
    # a bar on a terminal only: in a log file the summary line below says the same
    bar = tqdm(range(0, N, per_chunk), desc="chunks", unit="chunk", disable=not (progress and sys.stderr.isatty()),
               leave=False)
    for k, start in enumerate(bar):
        t0 = time.perf_counter()
        c, n_real, given = chunk_cond(net, cond, policy, frame, start, per_chunk, N, out[:, :, :, :start + 1],
                                      not official)
        used.append(given)
        x0_cond = encode_frames(tokenizer, frame, T_lat).to(dev)
        eps = chunk_noise(seed + start, (B, x0_cond.shape[1], V * T_lat, h, w)).to(dev)
        t1 = time.perf_counter()
        latents, calls = sample_chunk(net, x0_cond, eps, mask, {n: v.to(dev) for n, v in c.items()}, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)   # else the timing measures kernel launches, not the work
        t2 = time.perf_counter()
        # decode one chunk at a time (and the tokenizer streams its frames): memory stays one chunk
        video = decode(tokenizer, rearrange(latents, "b c (v t) h w -> (b v) c t h w", v=V), truncate=official)
        video = rearrange(video, "(b v) c t h w -> b v c t h w", b=B, v=V)
        if chunks is not None:
            chunks.append(video)
        out[:, :, :, start + 1:start + 1 + n_real] = video[:, :, :, 1:1 + n_real]
        frame = video[:, :, :, per_chunk]   # the next chunk's conditioning frame (uint8, as Cosmos)
        t3 = time.perf_counter()
        rec = dict(chunk=k, start=start, frames=n_real, seconds=t3 - t0, sample_seconds=t2 - t1,
                   encode_seconds=t1 - t0, decode_seconds=t3 - t2, net_calls=calls)
        if timings is not None:
            timings.append(rec)
        bar.set_postfix_str(f"{rec['seconds']:.2f} s/chunk, {rec['sample_seconds'] / rec['net_calls']:.3f} s/step")
    if return_actions:
        return out, (torch.cat(used, dim=1) if used and used[0] is not None else None)
    return out


# -----------------------------------------------------------------------------
# output: tiled mp4, PNG frame strip

SEPARATOR = 2   # px of white between prediction and ground truth (even: H.264 wants even sizes)


def grid(video_V_3_T_H_W):
    """[T, H', W', 3]: up to 3 views in a row, more in a ceil(sqrt(V))-wide grid (empty cells black)."""
    V, _, T, H, W = video_V_3_T_H_W.shape
    cols = V if V <= 3 else math.ceil(math.sqrt(V))
    rows = math.ceil(V / cols)
    canvas = torch.zeros(rows * cols, T, H, W, 3, dtype=torch.uint8)
    canvas[:V] = video_V_3_T_H_W.permute(0, 2, 3, 4, 1)
    return rearrange(canvas, "(r c) t h w x -> t (r h) (c w) x", r=rows, c=cols)


def tile_views(video_V_3_T_H_W, gt=None):
    """uint8 [T, H', W', 3] of all views; with gt [V,3,T',H,W] the ground truth on the right, after a white
    separator (ground truth frames past T' are black)."""
    tiles = grid(video_V_3_T_H_W.cpu())
    if gt is None:
        return tiles
    T = tiles.shape[0]
    gt = gt.cpu()[:, :, :T]
    if gt.shape[2] < T:
        gt = torch.cat([gt, gt.new_zeros(*gt.shape[:2], T - gt.shape[2], *gt.shape[3:])], dim=2)
    sep = torch.full((T, tiles.shape[1], SEPARATOR, 3), 255, dtype=torch.uint8)
    return torch.cat([tiles, sep, grid(gt)], dim=2)


def save_video(path, video_V_3_T_H_W, gt=None, fps=4):
    import data
    data.write_mp4(path, tile_views(video_V_3_T_H_W, gt), fps=fps)


def write_frames(path, video_V_3_T_H_W):
    """The exact uint8 frames of a written video (mp4 is lossy), as safetensors "video" [V, 3, T, H, W] beside it."""
    from safetensors.torch import save_file
    out = Path(path).with_suffix(".safetensors")
    save_file({"video": video_V_3_T_H_W.contiguous()}, str(out))
    return out


def write_png(path, image_H_W_3):
    """A minimal PNG encoder (8-bit RGB, filter 0, zlib), so that no image library is needed."""
    img = np.ascontiguousarray(np.asarray(image_H_W_3, dtype=np.uint8))
    H, W, _ = img.shape

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(H))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)


def strip_times(T, count=8):
    """Up to `count` time steps spread over the rollout, first and last included."""
    return sorted(set(np.linspace(0, T - 1, min(count, T)).round().astype(int).tolist()))


# a 3x5 pixel font (each glyph: 5 rows of 3 bits), so that labels need no image library
FONT = dict(zip("abcdefghijklmnopqrstuvwxyz0123456789._-: ", (
    "25755 65656 34443 65556 74647 74644 34553 55755 72227 11152 55655 44447 57755 65555 25552 65644 25563 65655 "
    "34216 72222 55557 55552 55775 55255 55222 71247 75557 26227 61247 61216 55711 74616 34652 71222 25252 25316 "
    "00002 00007 00700 02020 00000").split()))


def camera_names(cameras):
    """cam<k> for camera ids, a LeRobot key's last part (observation.images.top -> top) for names."""
    return [f"cam{k}" if isinstance(k, int) else str(k).split(".")[-1] for k in cameras]


def draw_label(img_H_W_3, text, y, x, scale=1):
    """Burn text (white on black, cut to fit the image's width) into img at row y, column x."""
    n = max(0, min(len(text), (img_H_W_3.shape[1] - x - scale) // (4 * scale)))
    if n == 0:
        return
    bits = torch.tensor([[[int(FONT.get(ch, "00000")[r]) >> (2 - b) & 1 if b < 3 else 0 for b in range(4)]
                          for r in range(5)] for ch in text.lower()[:n]], dtype=torch.bool)   # [n, 5, 4]
    mask = bits.permute(1, 0, 2).reshape(5, -1).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    h, w = mask.shape
    img_H_W_3[y:y + h + 2 * scale, x:x + w + scale] = 0
    img_H_W_3[y + scale:y + scale + h, x + scale:x + scale + w][mask] = 255


def save_strip(path, video_V_3_T_H_W, gt=None, count=8, cameras=None):
    """A PNG: time runs left to right (the tiled views at strip_times), the ground truth as a second row. The first
    tile of each row is labelled "prediction" / "ground truth" and each view with its camera's name (cameras)."""
    times = strip_times(video_V_3_T_H_W.shape[2], count)
    rows = [video_V_3_T_H_W] + ([gt] if gt is not None else [])
    V, _, _, H, W = video_V_3_T_H_W.shape
    cols, scale = V if V <= 3 else math.ceil(math.sqrt(V)), max(1, H // 64)
    lines = []
    for v, label in zip(rows, ("prediction", "ground truth")):
        tiles = grid(v.cpu()[:, :, [t for t in times if t < v.shape[2]]])
        for i, name in enumerate(camera_names(cameras) if cameras is not None else []):
            draw_label(tiles[0, i // cols * H:, i % cols * W:i % cols * W + W], name, 0, 0, scale)
        draw_label(tiles[0], label, tiles.shape[1] - 7 * scale, 0, scale)
        sep = torch.full((tiles.shape[1], SEPARATOR, 3), 255, dtype=torch.uint8)
        cells = [x for t in tiles for x in (t, sep)][:-1]
        lines.append(torch.cat(cells, dim=1))
    width = max(x.shape[1] for x in lines)
    lines = [F.pad(x, (0, 0, 0, width - x.shape[1])) for x in lines]
    hsep = torch.full((SEPARATOR, width, 3), 255, dtype=torch.uint8)
    write_png(path, torch.cat([x for line in lines for x in (line, hsep)][:-1], dim=0).numpy())
    return times


# -----------------------------------------------------------------------------
# command line: settings, episodes from a dataset or from files

def parse_args(argv):
    """configurator with bare boolean flags: `--eval` is `--eval=True`."""
    args = []
    for i, a in enumerate(argv):
        args.append(a)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a.startswith("--") and "=" not in a and a[2:] in _FLAGS and (nxt is None or nxt.startswith("--")
                                                                          or nxt.endswith(".py")):
            args.append("True")
    g = dict(_DEFAULTS)
    return configurator.configure(g, _KEYS, args, source=__file__)   # (--help reads this file's config block)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # the command lines live in their own files, which import this one (official.py: -i; evaluate.py: the run's
    # settings, episodes, --eval, --bench); runpy runs them without an import statement here (no import cycle)
    if "-i" in argv or any(a.split("=")[0] == "--input-file" for a in argv):
        return runpy.run_module("official", run_name="official_cli")["main"](argv)
    return runpy.run_module("evaluate", run_name="evaluate_cli")["main"](argv)


def cli(argv=None):
    """main with every known error as one line."""
    return configurator.exit_on_known_errors(main, argv)


if __name__ == "__main__":
    cli()
