"""
The Cosmos-Predict2 / 2.5 video diffusion transformer, with robot-action and camera-view conditioning,
and the rectified-flow maths that training and sampling share.

One `DiT` class covers the official networks (state-dict keys identical to the official ones):
  - base Video2World (`MinimalV1LVGDiT`): input channels [latent, condition mask, padding mask];
  - action conditioning, either one global chunk (Predict2, 12x7 actions flattened -> MLP input 84) or one
    chunk per latent frame (Predict2.5's released robot model, 4x7 -> MLP input 28, zero for latent frame 0
    and for conditioned frames);
  - multi-view (`MultiViewDiT`): views concatenated along latent time as (v t), RoPE restarting per view,
    view-embedding channels after the padding mask, per-view cross-attention over 512-token text blocks;
  - multi-view + action: the per-latent-frame action embedding repeated for every view.
Spec: shared/spec/dit.md. Parity with the official code: tests/test_model.py against tests/fixtures/dit_*.
"""

import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch.utils.checkpoint import checkpoint


@dataclass
class DiTConfig:
    model_channels: int = 2048            # D
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 16                 # latent channels (Wan2.1 VAE: 16)
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    adaln_lora_dim: int = 256
    crossattn_emb_channels: int = 1024    # text width seen by cross-attention
    crossattn_proj_in_channels: int = 0   # >0: Predict2.5's crossattn_proj = GELU(Linear(in -> emb_channels))
    max_img_h: int = 240                  # RoPE table limits, in latent pixels (official)
    max_img_w: int = 240
    max_frames: int = 128
    rope_h_extrapolation_ratio: float = 3.0
    rope_w_extrapolation_ratio: float = 3.0
    rope_t_extrapolation_ratio: float = 1.0
    rope_enable_fps_modulation: bool = False  # t positions * 24/fps (the official multi-view net has it on)
    timestep_scale: float = 1.0           # Predict2.5 feeds 1000*t and scales by 0.001
    action_mode: str = "none"             # "none" | "global" (Predict2) | "per_frame" (Predict2.5 robot model)
    action_dim: int = 7                   # values per action (xyz, rpy, gripper)
    num_actions: int = 12                 # actions per chunk (global mode: MLP input = num_actions * action_dim)
    actions_per_latent: int = 4           # per_frame mode: MLP input = actions_per_latent * action_dim
    action_hidden: int = 0                # 0 -> 4 * D (official)
    n_views_emb: int = 0                  # >0: nn.Embedding(n_views_emb, view_condition_dim) as input channels
    view_condition_dim: int = 7
    text_tokens_per_view: int = 512       # multi-view cross-attention: context block per view

    @property
    def action_in_features(self):
        n = self.num_actions if self.action_mode == "global" else self.actions_per_latent
        return n * self.action_dim


# Official sizes. Predict2.5 2B = "2B" plus crossattn_proj_in_channels=100352 and timestep_scale=0.001.
PRESETS = {
    "2B": dict(model_channels=2048, num_blocks=28, num_heads=16),
    "14B": dict(model_channels=5120, num_blocks=36, num_heads=40,
                rope_h_extrapolation_ratio=2.0, rope_w_extrapolation_ratio=2.0, rope_t_extrapolation_ratio=20 / 24),
}


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    """RMSNorm accumulated in float32 whatever the activation dtype (as TransformerEngine does)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # F.rms_norm: one fused kernel each way on CUDA, accumulating in fp32 for bf16 x (casts around it would be
        # two more kernels each way); the weight in x's dtype, as FSDP2's bf16 compute weights already are
        return F.rms_norm(x, x.shape[-1:], self.weight.to(x.dtype), self.eps)


def layer_norm(x):
    # every LayerNorm in the network is affine-free with eps 1e-6
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def rope_tables(angles_L_D):
    """(cos, signed sin) [1, L, 1, D] of the RoPE angles, once per forward: rotate-half is then
    x * cos + roll(x, D/2) * signed_sin, with signed_sin = [-sin, sin] over the two halves (the same products)."""
    half = angles_L_D.shape[-1] // 2
    sign = torch.cat([-torch.ones(half, device=angles_L_D.device), torch.ones(half, device=angles_L_D.device)])
    return angles_L_D.cos()[None, :, None, :], (angles_L_D.sin() * sign)[None, :, None, :]


def apply_rope(x_B_L_H_D, cos_sin):
    """Rotate-half RoPE (dims i and i+D/2 share an angle) in float32 (x * cos promotes), in 3 kernels."""
    cos, signed_sin = cos_sin
    rotated = x_B_L_H_D.roll(x_B_L_H_D.shape[-1] // 2, dims=-1)
    return torch.addcmul(x_B_L_H_D * cos, rotated, signed_sin).to(x_B_L_H_D.dtype)


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm; RoPE on self-attention only; no masks (as official)."""

    def __init__(self, dim, context_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)

    def forward(self, x_B_L_D, context_B_N_C=None, rope_L_D=None):
        context = x_B_L_D if context_B_N_C is None else context_B_N_C
        h = self.num_heads
        q = self.q_norm(rearrange(self.q_proj(x_B_L_D), "b l (h d) -> b l h d", h=h))
        k = self.k_norm(rearrange(self.k_proj(context), "b l (h d) -> b l h d", h=h))
        v = rearrange(self.v_proj(context), "b l (h d) -> b l h d", h=h)
        if rope_L_D is not None:
            q, k = apply_rope(q, rope_L_D), apply_rope(k, rope_L_D)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.output_proj(rearrange(y, "b h l d -> b l (h d)"))

    def constant_output(self, context_1_1_C):
        """Output for a context whose tokens are all equal: softmax weights are then irrelevant and every
        query gets output_proj(v). Used for the zero-text shortcut with crossattn_proj."""
        return self.output_proj(self.v_proj(context_1_1_C))


class Mlp(nn.Module):
    """Action embedder (timm Mlp: fc1 -> GELU(tanh) -> fc2, with biases)."""

    def __init__(self, in_features, hidden, out_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.layer2(F.gelu(self.layer1(x)))


def adaln_modulation(dim, lora_dim, n_chunks):
    # keys .1 and .2 (index 0 is the SiLU), as official
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, n_chunks * dim, bias=False))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.model_channels
        self.self_attn = Attention(D, D, cfg.num_heads)
        self.cross_attn = Attention(D, cfg.crossattn_emb_channels, cfg.num_heads)
        self.mlp = FeedForward(D, int(D * cfg.mlp_ratio))
        self.adaln_modulation_self_attn = adaln_modulation(D, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = adaln_modulation(D, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = adaln_modulation(D, cfg.adaln_lora_dim, 3)
        self.tokens_per_view = cfg.text_tokens_per_view

    def forward(self, x_B_T_H_W_D, emb_B_T_D, lora_B_T_3D, rope_L_D, context, num_views):
        """context: ("tokens", [B,N,C]) | ("constant", [1,1,C]) | ("none", None): see DiT.forward."""
        B, T, H, W, D = x_B_T_H_W_D.shape

        def modulation(layer):
            m = (layer(emb_B_T_D) + lora_B_T_3D)[:, :, None, None, :]
            return m.chunk(3, dim=-1)  # shift, scale, gate, each [B,T,1,1,D]

        # modulation and gating as one fused multiply-add each: shift + LN(x) * (1 + scale), x + gate * y
        shift, scale, gate = modulation(self.adaln_modulation_self_attn)
        y = torch.addcmul(shift, layer_norm(x_B_T_H_W_D), 1 + scale)
        y = self.self_attn(rearrange(y, "b t h w d -> b (t h w) d"), rope_L_D=rope_L_D)
        x_B_T_H_W_D = torch.addcmul(x_B_T_H_W_D, gate, rearrange(y, "b (t h w) d -> b t h w d", t=T, h=H, w=W))

        kind, ctx = context
        if kind == "tokens":
            shift, scale, gate = modulation(self.adaln_modulation_cross_attn)
            y = torch.addcmul(shift, layer_norm(x_B_T_H_W_D), 1 + scale)
            if num_views > 1:
                # each view attends only to its own block of text tokens
                if ctx.shape[1] != num_views * self.tokens_per_view:
                    raise ValueError(f"multi-view context must have {num_views} x {self.tokens_per_view} tokens, "
                                     f"got {ctx.shape[1]}")
                y = rearrange(y, "b (v t) h w d -> (v b) (t h w) d", v=num_views)
                c = rearrange(ctx.expand(B, -1, -1), "b (v n) c -> (v b) n c", v=num_views)   # [1,N,C] broadcasts
                y = rearrange(self.cross_attn(y, c), "(v b) (t h w) d -> b (v t) h w d", v=num_views, h=H, w=W)
            else:
                y = rearrange(self.cross_attn(rearrange(y, "b t h w d -> b (t h w) d"), ctx),
                              "b (t h w) d -> b t h w d", t=T, h=H, w=W)
            x_B_T_H_W_D = torch.addcmul(x_B_T_H_W_D, gate, y)
        elif kind == "constant":
            _, _, gate = modulation(self.adaln_modulation_cross_attn)
            x_B_T_H_W_D = x_B_T_H_W_D + gate * self.cross_attn.constant_output(ctx).to(gate.dtype)
        # kind == "none": an all-zero context without projection gives k = v = 0, so the sublayer adds exactly 0

        shift, scale, gate = modulation(self.adaln_modulation_mlp)
        y = torch.addcmul(shift, layer_norm(x_B_T_H_W_D), 1 + scale)
        return torch.addcmul(x_B_T_H_W_D, gate, self.mlp(y))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels, dim, p, pt):
        super().__init__()
        # channel-slowest feature order (c r m n), as official
        self.proj = nn.Sequential(
            Rearrange("b c (t r) (h m) (w n) -> b t h w (c r m n)", r=pt, m=p, n=p),
            nn.Linear(in_channels * pt * p * p, dim, bias=False))

    def forward(self, x):
        return self.proj(x)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        # bias-free because adaLN-LoRA is on (as in every released model)
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, sinusoid):
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class Timesteps(nn.Module):
    """[cos | sin] sinusoid of t, frequencies exp(-ln(1e4) k / (D/2)), computed in float32."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t_B_T):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t_B_T.device) / half)
        angles = t_B_T.float()[..., None] * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1).to(t_B_T.dtype)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.model_channels
        self.adaln_modulation = adaln_modulation(D, cfg.adaln_lora_dim, 2)
        out = cfg.patch_spatial ** 2 * cfg.patch_temporal * cfg.out_channels
        self.linear = nn.Linear(D, out, bias=False)

    def forward(self, x_B_T_H_W_D, emb_B_T_D, lora_B_T_3D):
        D = x_B_T_H_W_D.shape[-1]
        m = self.adaln_modulation(emb_B_T_D) + lora_B_T_3D[..., :2 * D]
        shift, scale = m[:, :, None, None, :].chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, layer_norm(x_B_T_H_W_D), 1 + scale))


def rope_angles(cfg: DiTConfig, T, H, W, num_views=1, fps=None, device=None):
    """3D RoPE angles [(v t h w), head_dim] in float32 with the official NTK-scaled bases.
    Head split: t gets head_dim - 2*dim_hw, h and w get dim_hw = (head_dim // 6) * 2 each; layout [t h w t h w]."""
    head_dim = cfg.model_channels // cfg.num_heads
    dim_hw = head_dim // 6 * 2
    dim_t = head_dim - 2 * dim_hw
    if T > cfg.max_frames or H > cfg.max_img_h // cfg.patch_spatial or W > cfg.max_img_w // cfg.patch_spatial:
        raise ValueError(f"latent grid (t={T}, h={H}, w={W} patches) exceeds the RoPE limits of the model")

    def freqs(dim, ratio):
        theta = 10000.0 * ratio ** (dim / (dim - 2))
        return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device)[: dim // 2] / dim)

    t_pos = torch.arange(T, dtype=torch.float32, device=device)
    if cfg.rope_enable_fps_modulation:
        if fps is None:
            raise ValueError("this model modulates temporal RoPE by fps: pass fps")
        fps0 = fps.flatten()[0].float() if torch.is_tensor(fps) else torch.tensor(float(fps))
        t_pos = t_pos / fps0.to(device) * 24.0
    ang_t = torch.outer(t_pos, freqs(dim_t, cfg.rope_t_extrapolation_ratio))
    ang_h = torch.outer(torch.arange(H, dtype=torch.float32, device=device), freqs(dim_hw, cfg.rope_h_extrapolation_ratio))
    ang_w = torch.outer(torch.arange(W, dtype=torch.float32, device=device), freqs(dim_hw, cfg.rope_w_extrapolation_ratio))
    half = torch.cat([
        repeat(ang_t, "t d -> t h w d", h=H, w=W),
        repeat(ang_h, "h d -> t h w d", t=T, w=W),
        repeat(ang_w, "w d -> t h w d", t=T, h=H),
    ], dim=-1)
    angles = torch.cat([half, half], dim=-1)
    # every view restarts at t = 0: the same table for each view, tokens ordered (v t h w)
    return repeat(angles, "t h w d -> (v t h w) d", v=num_views)


# -----------------------------------------------------------------------------
# the network

class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.action_mode not in ("none", "global", "per_frame"):
            raise ValueError(f"action_mode must be 'none', 'global' or 'per_frame', got {cfg.action_mode!r}")
        if cfg.model_channels % cfg.num_heads:
            raise ValueError("model_channels must be divisible by num_heads")
        self.cfg = cfg
        D = cfg.model_channels
        in_ch = cfg.in_channels + 2 + (cfg.view_condition_dim if cfg.n_views_emb else 0)
        self.x_embedder = PatchEmbed(in_ch, D, cfg.patch_spatial, cfg.patch_temporal)
        self.t_embedder = nn.Sequential(Timesteps(D), TimestepEmbedding(D))
        self.t_embedding_norm = RMSNorm(D)
        if cfg.crossattn_proj_in_channels:
            self.crossattn_proj = nn.Sequential(nn.Linear(cfg.crossattn_proj_in_channels, cfg.crossattn_emb_channels),
                                                nn.GELU())
        if cfg.n_views_emb:
            self.view_embeddings = nn.Embedding(cfg.n_views_emb, cfg.view_condition_dim)
        if cfg.action_mode != "none":
            hidden = cfg.action_hidden or 4 * D
            self.action_embedder_B_D = Mlp(cfg.action_in_features, hidden, D)
            self.action_embedder_B_3D = Mlp(cfg.action_in_features, hidden, 3 * D)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_blocks)])
        self.final_layer = FinalLayer(cfg)
        self.gradient_checkpointing = False

    # -- conditioning inputs ------------------------------------------------------------

    def _action_embeddings(self, action, mask_B_T, num_views, T):
        """Returns ([B,T',D], [B,T',3D]) with T' = 1 (global) or T (per latent frame)."""
        cfg = self.cfg
        if action.shape[-1] != cfg.action_dim:
            raise ValueError(f"action must be [B, n, {cfg.action_dim}], got {tuple(action.shape)}")
        if cfg.action_mode == "global":
            if action.shape[1] != cfg.num_actions:
                raise ValueError(f"global action chunk must have {cfg.num_actions} actions, got {action.shape[1]}")
            a = rearrange(action, "b n d -> b 1 (n d)")
            return self.action_embedder_B_D(a), self.action_embedder_B_3D(a)
        # per latent frame: actions_per_latent actions drive each predicted latent frame; frame 0 gets none
        t_view = T // num_views
        if action.shape[1] != (t_view - 1) * cfg.actions_per_latent:
            raise ValueError(f"{t_view} latent frames per view need {(t_view - 1) * cfg.actions_per_latent} actions "
                             f"({cfg.actions_per_latent} per predicted latent frame), got {action.shape[1]}")
        a = rearrange(action, "b (t n) d -> b t (n d)", n=cfg.actions_per_latent)
        e_D, e_3D = self.action_embedder_B_D(a), self.action_embedder_B_3D(a)
        e_D, e_3D = F.pad(e_D, (0, 0, 1, 0)), F.pad(e_3D, (0, 0, 1, 0))          # zero row for latent frame 0
        e_D = repeat(e_D, "b t d -> b (v t) d", v=num_views)
        e_3D = repeat(e_3D, "b t d -> b (v t) d", v=num_views)
        keep = (1 - mask_B_T)[..., None].to(e_D.dtype)                           # nothing on conditioned frames
        return e_D * keep, e_3D * keep

    def _context(self, crossattn_emb):
        """What cross-attention sees. crossattn_emb=None means an all-zero text context (action models):
        without crossattn_proj the sublayer adds exactly zero and is skipped; with it, every token equals
        GELU(bias), so each block's output is one constant vector, computed once per forward."""
        if crossattn_emb is not None:
            if self.cfg.crossattn_proj_in_channels and crossattn_emb.shape[-1] == self.cfg.crossattn_proj_in_channels:
                crossattn_emb = self.crossattn_proj(crossattn_emb)   # else already projected (text_embedding file)
            return ("tokens", crossattn_emb)
        if self.cfg.crossattn_proj_in_channels:
            w = self.crossattn_proj[0].weight
            return ("constant", self.crossattn_proj(torch.zeros(1, 1, w.shape[1], device=w.device, dtype=w.dtype)))
        return ("none", None)

    def forward(self, x_B_C_T_H_W, timesteps_B_T, crossattn_emb=None, condition_video_input_mask_B_C_T_H_W=None,
                fps=None, padding_mask=None, action=None, view_indices_B_T=None, num_views=None):
        """Velocity prediction. x [B,C,T,H,W] latents (T = num_views * frames per view, order (v t));
        timesteps [B], [B,1] or [B,T], t = sigma/(1+sigma) in [0,1] (times 1/timestep_scale for Predict2.5);
        crossattn_emb [B,N,C] or None (= all-zero text); condition mask [B,1,T,H,W] (None = no frame
        conditioned); padding_mask [B,1,h,w] at any resolution (None = zeros); action [B,n,action_dim];
        view_indices_B_T [B,T] (None = view v gets index v); num_views (None: 1, or T // ... must be given
        for multi-view inputs)."""
        cfg = self.cfg
        B, C, T, H, W = x_B_C_T_H_W.shape
        if C != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} latent channels, got {C}")
        p = cfg.patch_spatial
        if H % p or W % p or T % cfg.patch_temporal:
            raise ValueError(f"latent size (T={T}, H={H}, W={W}) must be divisible by the patch size")
        num_views = num_views or 1
        if T % num_views:
            raise ValueError(f"{T} latent frames cannot be split into {num_views} views")
        dtype, device = x_B_C_T_H_W.dtype, x_B_C_T_H_W.device

        mask = condition_video_input_mask_B_C_T_H_W
        if mask is None:
            mask = torch.zeros(B, 1, T, H, W, dtype=dtype, device=device)
        if padding_mask is None:
            pad = torch.zeros(B, 1, T, H, W, dtype=dtype, device=device)
        else:
            pad = F.interpolate(padding_mask.to(dtype), size=(H, W), mode="nearest")[:, :, None].expand(-1, -1, T, -1, -1)
        inputs = [x_B_C_T_H_W, mask.to(dtype), pad]
        if cfg.n_views_emb:
            if view_indices_B_T is None:
                view_ids = torch.arange(num_views, device=device).clamp(max=cfg.n_views_emb - 1)
                view_indices_B_T = repeat(view_ids, "v -> b (v t)", b=B, t=T // num_views)
            emb = self.view_embeddings(view_indices_B_T).to(dtype)                 # [B,T,7]
            inputs.append(repeat(emb, "b t c -> b c t h w", h=H, w=W))
        elif view_indices_B_T is not None:
            raise ValueError("view_indices_B_T given but the model has no view embedding (n_views_emb=0)")
        x = self.x_embedder(torch.cat(inputs, dim=1))                                 # [B,T,H/p,W/p,D]

        # time embedding: the blocks see RMSNorm(sinusoid (+ action)); the t-MLP only gives the adaLN-LoRA term
        t = timesteps_B_T if timesteps_B_T.ndim == 2 else timesteps_B_T[:, None]
        t = t * cfg.timestep_scale if cfg.timestep_scale != 1.0 else t
        sinusoid = self.t_embedder[0](t)
        lora = self.t_embedder[1](sinusoid)
        emb = sinusoid
        if cfg.action_mode != "none":
            if action is None:
                raise ValueError("this model is action-conditioned: pass action")
            e_D, e_3D = self._action_embeddings(action, mask[:, 0, :, 0, 0], num_views, T)
            emb, lora = emb + e_D, lora + e_3D
        elif action is not None:
            raise ValueError("action given but the model has no action embedder (action_mode='none')")
        emb = self.t_embedding_norm(emb)
        if emb.shape[1] == 1 and T > 1:
            emb, lora = emb.expand(-1, T, -1), lora.expand(-1, T, -1)

        Tp, Hp, Wp = x.shape[1:4]
        rope = rope_tables(rope_angles(cfg, Tp // num_views, Hp, Wp, num_views, fps, device))
        context = self._context(crossattn_emb)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, emb, lora, rope, context, num_views, use_reentrant=False)
            else:
                x = block(x, emb, lora, rope, context, num_views)
        x = self.final_layer(x, emb, lora)
        return rearrange(x, "b t h w (p1 p2 r c) -> b c (t r) (h p1) (w p2)",
                         p1=p, p2=p, r=cfg.patch_temporal, c=cfg.out_channels)

    # -- weights -------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self):
        """Official init for training from scratch: truncated normal(1/sqrt(fan_in)) linears, zero adaLN
        output projections (blocks start as identity); new heads start as no-ops: the action MLPs' fc2 and
        the view-embedding input columns are zero, so a grown model initially equals its base model."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                std = 1.0 / math.sqrt(m.in_features)
                nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight)
        for m in list(self.blocks) + [self.final_layer]:
            for mod in m.modules():
                if isinstance(mod, nn.Sequential) and len(mod) == 3 and isinstance(mod[0], nn.SiLU):
                    nn.init.zeros_(mod[2].weight)
        self.zero_new_heads(action=True, views=True)

    @torch.no_grad()
    def zero_new_heads(self, action=False, views=False):
        if action and self.cfg.action_mode != "none":
            for mlp in (self.action_embedder_B_D, self.action_embedder_B_3D):
                nn.init.zeros_(mlp.fc2.weight)
                nn.init.zeros_(mlp.fc2.bias)
        if views and self.cfg.n_views_emb:
            p, pt = self.cfg.patch_spatial, self.cfg.patch_temporal
            base = (self.cfg.in_channels + 2) * pt * p * p
            self.x_embedder.proj[1].weight[:, base:] = 0

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# checkpoints in the official key layout

def clean_state_dict(sd, ema=True):
    """Official checkpoint -> DiT state dict. Strips 'net_ema.' (ema=True, when present) or 'net.', and drops
    what carries no learned information: RoPE tables (pos_embedder*), accum_* counters and TransformerEngine
    '_extra_state' entries. Keys without a prefix are taken as they are."""
    has_ema = any(k.startswith("net_ema.") for k in sd)
    has_net = any(k.startswith("net.") for k in sd)
    prefix = "net_ema." if (ema and has_ema) or not has_net and has_ema else "net." if has_net else ""
    out = {}
    for k, v in sd.items():
        if prefix and not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if k.endswith("_extra_state") or k.startswith(("pos_embedder", "accum_")):
            continue
        out[k] = v
    return out


def infer_config(sd, **overrides):
    """DiTConfig from the tensor shapes of a cleaned state dict. What shapes cannot tell (RoPE ratios, fps
    modulation) comes from the defaults (the released single-view models); timestep_scale is 0.001 when
    crossattn_proj is present (Predict2.5). An action MLP input equal to actions_per_latent * action_dim (28)
    means per_frame mode, anything else a global chunk of in/action_dim actions."""
    D, in_feats = sd["x_embedder.proj.1.weight"].shape
    head_dim = sd["blocks.0.self_attn.q_norm.weight"].shape[0]
    out_feats = sd["final_layer.linear.weight"].shape[0]
    c = dict(model_channels=D, num_heads=D // head_dim,
             num_blocks=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
             mlp_ratio=sd["blocks.0.mlp.layer1.weight"].shape[0] / D,
             adaln_lora_dim=sd["blocks.0.adaln_modulation_self_attn.1.weight"].shape[0],
             crossattn_emb_channels=sd["blocks.0.cross_attn.k_proj.weight"].shape[1])
    p, pt = overrides.get("patch_spatial", 2), overrides.get("patch_temporal", 1)
    c["out_channels"] = out_feats // (p * p * pt)
    view_dim = 0
    if "view_embeddings.weight" in sd:
        c["n_views_emb"], view_dim = sd["view_embeddings.weight"].shape
        c["view_condition_dim"] = view_dim
    c["in_channels"] = in_feats // (p * p * pt) - 2 - view_dim
    if "crossattn_proj.0.weight" in sd:
        c["crossattn_proj_in_channels"] = sd["crossattn_proj.0.weight"].shape[1]
        c["timestep_scale"] = 0.001
    if "action_embedder_B_D.fc1.weight" in sd:
        hidden, a_in = sd["action_embedder_B_D.fc1.weight"].shape
        adim = overrides.get("action_dim", 7)
        per = overrides.get("actions_per_latent", 4)
        if hidden != 4 * D:
            c["action_hidden"] = hidden
        if overrides.get("action_mode", "per_frame" if a_in == adim * per else "global") == "per_frame":
            c.update(action_mode="per_frame", action_dim=a_in // per)
        else:
            c.update(action_mode="global", action_dim=adim, num_actions=a_in // adim)
    c.update(overrides)
    return DiTConfig(**c)


# The heads that are new relative to a released checkpoint, by conditioning signal: grown as no-ops when a base
# checkpoint lacks them (load_into), trained in full under LoRA (lora.py), re-initialised when their input width
# changes. A new conditioning signal adds its head's parameter prefix here.
NEW_HEADS = {"action": ("action_embedder_",), "view": ("view_embeddings.",)}


@torch.no_grad()
def load_into(model: DiT, sd, strict=True, grow=False):
    """Load a cleaned state dict into `model`. grow=True lets a base checkpoint start a model with new heads:
    missing action MLPs keep their no-op init (zero fc2), an action MLP whose input size changed (other
    action_dim) is re-initialised as a no-op, and extra x_embedder input columns (view embedding) are zero.
    The grown model's output then equals the checkpoint's. Returns (missing, unexpected, regrown) key lists;
    strict=True raises on missing/unexpected keys that growing does not explain."""
    own = model.state_dict()
    sd = dict(sd)
    regrown = []
    if grow:
        k = "x_embedder.proj.1.weight"
        if k in sd and sd[k].shape[1] < own[k].shape[1] and sd[k].shape[0] == own[k].shape[0]:
            w = torch.zeros_like(own[k], device="cpu", dtype=sd[k].dtype)
            w[:, : sd[k].shape[1]] = sd[k]
            sd[k] = w
            regrown.append(k)
        for k in list(sd):
            if k.startswith(NEW_HEADS["action"]) and k in own and sd[k].shape != own[k].shape:
                regrown.append(k)
                del sd[k]
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if mismatched:
        raise ValueError("shape mismatch: " + ", ".join(f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                                                         for k in mismatched))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    explained = [k for k in missing if grow and k.startswith(sum(NEW_HEADS.values(), ()))]
    if grow:
        if any(k.startswith("action_embedder_") for k in missing) or any(k.startswith("action_embedder_") for k in regrown):
            model.zero_new_heads(action=True)
    if strict and (set(missing) - set(explained) or unexpected):
        raise ValueError(f"checkpoint does not match the model: missing {sorted(set(missing) - set(explained))}, "
                         f"unexpected {sorted(unexpected)}")
    # load what is there (regrown x_embedder included), keep the no-op init for grown heads
    for k, v in sd.items():
        if k in own:
            own[k].copy_(v.to(own[k].dtype))
    return missing, unexpected, regrown


def config_dict(cfg: DiTConfig):
    return asdict(cfg)


def config_from_dict(d):
    names = {f.name for f in fields(DiTConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown DiT config keys: {sorted(unknown)}")
    return DiTConfig(**d)


# -----------------------------------------------------------------------------
# rectified flow (shared by train.py and sample.py)
#   x_t = (1 - t) x0 + t eps, t = sigma / (1 + sigma); the network predicts the velocity v = eps - x0.

def sigma_to_t(sigma):
    return sigma / (1 + sigma)


def noisy_latents(x0, eps, t):
    return (1 - t) * x0 + t * eps


def velocity_target(x0, eps):
    return eps - x0


def x0_from_velocity(x_t, v, t):
    return x_t - t * v


def sample_t(n, shift, generator=None, device=None):
    """Logit-normal t shifted by `shift`: t = sigmoid(N(0,1) + ln shift), i.e. t' = s u / (1 + (s-1) u) for a
    logit-normal u. Predict2 uses shift sqrt(latent frames) (2 for 13-frame action clips), Predict2.5 uses 5."""
    u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return shift * u / (1 + (shift - 1) * u)


def condition_mask(B, num_views, frames_per_view, H, W, num_cond, device=None, dtype=torch.float32):
    """[B,1,V*T,H,W] mask that is 1 on the first num_cond latent frames of every view."""
    m = torch.zeros(B, 1, num_views, frames_per_view, H, W, device=device, dtype=dtype)
    m[:, :, :, :num_cond] = 1
    return m.flatten(2, 3)


def predict_velocity(net, x_t, t_B, x0_cond, mask, cond_t=None, **kw):
    """The conditioned denoiser: conditioned latent frames are fed clean (x0_cond) with timestep cond_t
    (Predict2: sigma_to_t(1e-4)) or, with cond_t=None, the same t as the rest (Predict2.5 action model).
    Returns the network's velocity [B,C,T,H,W]; entries on conditioned frames are meaningless to callers."""
    x_in = mask * x0_cond + (1 - mask) * x_t
    t_B_T = t_B[:, None].expand(-1, x_t.shape[2])
    if cond_t is not None:
        m = mask[:, 0, :, 0, 0]
        t_B_T = m * cond_t + (1 - m) * t_B_T
    # the network's timestep input is t / timestep_scale (Predict2.5 nets take 1000 t and scale it back)
    scale = unwrap(net).cfg.timestep_scale
    return net(x_in, (t_B_T / scale).to(x_t.dtype), condition_video_input_mask_B_C_T_H_W=mask, **kw)


def unwrap(net):
    """The network inside DDP / torch.compile wrappers (the module that carries `cfg`)."""
    while not hasattr(net, "cfg"):
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(net).__name__} is not a DiT (no .cfg) nor a DDP/compile wrapper of one")
        net = inner
    return net


def predict_x0(net, x_t, t_B, x0_cond, mask, cond_t=None, **kw):
    """x0 estimate with the conditioned frames replaced by their ground truth (what samplers step with)."""
    v = predict_velocity(net, x_t, t_B, x0_cond, mask, cond_t, **kw)
    x0 = x0_from_velocity(x_t, v, t_B.view(-1, 1, 1, 1, 1))
    return mask * x0_cond + (1 - mask) * x0


def diffusion_loss(net, x0, cond, num_views, generator, *, t_shift, cond_latents, cond_t, loss_mean, loss_scale, fps,
                   text_1_N_C=None):
    """The training objective: velocity MSE at a logit-normal t, zero on the conditioned frames, times loss_scale;
    averaged over all latent elements (loss_mean="all", the official normalisation) or over the non-conditioned
    ones ("noisy"). cond: the batch's conditioning dict, passed to the network as is. cond_t None: conditioned
    frames get the same t as the rest. Returns (loss, per-sample loss [B], t [B])."""
    B, C, T, H, W = x0.shape
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = sample_t(B, t_shift, generator=generator, device=x0.device)
    mask = condition_mask(B, num_views, T // num_views, H, W, cond_latents, device=x0.device)
    x_t = noisy_latents(x0, eps, t.view(B, 1, 1, 1, 1))
    text = None if text_1_N_C is None else text_1_N_C.expand(B, -1, -1)
    v = predict_velocity(net, x_t, t, x0, mask, cond_t, **cond, num_views=num_views, crossattn_emb=text,
                         fps=torch.full((B,), float(fps), device=x0.device))
    keep = 1 - mask
    err = (v.float() - velocity_target(x0, eps)).pow(2) * keep
    n = C * T * H * W if loss_mean == "all" else keep.sum(dim=(1, 2, 3, 4)) * C
    per_sample = loss_scale * err.sum(dim=(1, 2, 3, 4)) / n
    return per_sample.mean(), per_sample.detach(), t
