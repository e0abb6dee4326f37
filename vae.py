"""
Owns the video tokenizer of Cosmos-Predict2 / 2.5: the Wan2.1 causal 3D VAE (16 latent channels, 8x spatial and 4x
causal temporal compression: T = 1+4k frames -> 1+k latents, latent j depends on frames <= 4j), and a weightless
`pixel` stand-in. encode() returns the encoder mean normalised as Cosmos does, (mu - mean) * (1/std), no sampling;
decode() inverts it and returns video in nominal [-1, 1], NOT clamped. Streamed in time like the official code
(frame 0 alone, then chunks of `temporal_window` frames; decode one latent frame at a time; each temporal conv
caches its last input frames in a per-call dict) and over the batch `micro_batch` samples at a time, so the peak
is one chunk of one sample. Must not: import a script. Usage:
    tok = load_tokenizer("wan2.1", "checkpoints/tokenizer.pth", device="cuda", dtype=torch.bfloat16)
    z_N_16_t_h_w = encode_batched(tok, video_N_3_T_H_W_uint8)   # uint8 -> [-1, 1] as training does, batched
    python vae.py bench --size 256x320 --frames 13 --dtype both     # seconds and peak memory, random weights
"""
import argparse
import ctypes
import os
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

from configurator import UserError

# Per-channel statistics of Wan2.1 latents (Cosmos VAE.__init__; identical in Predict2.5 and diffusers).
LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def latent_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """Latent frames for a causal clip of num_frames = 1 + k*temporal_factor pixel frames (frame 0 has its own)."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(f"num_frames must be 1 + {temporal_factor}*k (1, {1 + temporal_factor}, "
                         f"{1 + 2 * temporal_factor}, ...), got {num_frames}")
    return 1 + (num_frames - 1) // temporal_factor


def check_video(video, spatial_factor, temporal_factor):
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W) RGB, got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"video must be float in [-1, 1] (uint8 -> x/127.5 - 1), got {video.dtype}")
    latent_frames(video.shape[2], temporal_factor)
    H, W = video.shape[-2:]
    if H % spatial_factor or W % spatial_factor or H == 0 or W == 0:
        raise ValueError(f"video height and width must be positive multiples of {spatial_factor}, got {H}x{W}")


def check_latent(latent, channels):
    if latent.ndim != 5 or latent.shape[1] != channels:
        raise ValueError(f"latent must be (B, {channels}, t, h, w), got shape {tuple(latent.shape)}")
    if not latent.is_floating_point():
        raise ValueError(f"latent must be a float tensor, got {latent.dtype}")
    if latent.shape[2] < 1:
        raise ValueError("latent must have at least one frame")


# -----------------------------------------------------------------------------
# Wan2.1 building blocks. Attribute names and nn.Sequential slot numbers are the official state-dict key names.
# Every block's forward takes (x_B_C_T_H_W, cache); only the temporal convolutions read or write the cache.
class CPUBf16Conv:
    """On CPU a bf16 conv runs in fp32 and rounds its output to bf16 (as cuDNN's fp32 accumulation does): oneDNN's
    bf16 convolutions are far slower than fp32 on CPUs without bf16 dot-product instructions."""

    def _conv_forward(self, x, weight, bias):
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            bias = None if bias is None else bias.float()
            return super()._conv_forward(x.float(), weight.float(), bias).to(x.dtype)
        return super()._conv_forward(x, weight, bias)


Conv2d = type("Conv2d", (CPUBf16Conv, nn.Conv2d), {})
Conv3d = type("Conv3d", (CPUBf16Conv, nn.Conv3d), {})


class CausalConv3d(Conv3d):
    """Conv3d that only looks back in time: 2*p_t frames of history on the left, symmetric zero padding in space.
    The history is zeros at the start of a clip and the previous chunk's last input frames afterwards, which makes
    streamed chunks identical to one pass over the whole clip."""

    def __init__(self, in_ch, out_ch, kernel_size, padding=0):
        p_t, p_h, p_w = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_ch, out_ch, kernel_size, padding=(0, p_h, p_w))
        self.history = 2 * p_t

    def forward(self, x, cache):
        if self.history:
            past = cache.get(self)
            if past is None:
                past = x.new_zeros(*x.shape[:2], self.history, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
            cache[self] = x[:, :, -self.history:].clone()  # clone: a view would keep the whole chunk alive
        return super().forward(x)


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(C) * gamma over channels only, at each position (so it is oblivious to chunking)."""

    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim, out_dim, dropout=0.0):
        super().__init__()
        # slots 1, 4, 5 (SiLU, SiLU, Dropout) hold no weights but fix the key numbers residual.{0,2,3,6}
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(inplace=True), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x, cache):
        r = self.residual
        h = x if self.shortcut is None else self.shortcut(x, cache)
        x = r[2](r[1](r[0](x)), cache)
        x = r[6](r[5](r[4](r[3](x))), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (nothing temporal, so no cache), at the latent resolution."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = Conv2d(dim, dim * 3, 1)
        self.proj = Conv2d(dim, dim, 1)

    def forward(self, x, cache=None):
        B, C, T, H, W = x.shape
        h = rearrange(x, "b c t h w -> (b t) c h w")
        qkv = self.to_qkv(self.norm(h))
        q, k, v = rearrange(qkv, "n c h w -> n 1 (h w) c").contiguous().chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)  # head_dim = C, scale 1/sqrt(C)
        h = self.proj(rearrange(h, "n 1 (h w) c -> n c h w", h=H))
        return x + rearrange(h, "(b t) c h w -> b c t h w", t=T)


class Resample(nn.Module):
    """2x spatial down/up-sampling per frame, plus (for the *3d modes) 2x causal temporal resampling in which frame 0
    is special: it is neither merged nor doubled, and is never history for the frames after it."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):  # official nearest-exact 2x (a 2x2 repeat: exact in any dtype); conv halves C
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          Conv2d(dim, dim // 2, 3, padding=1))
        else:  # asymmetric pad (right/bottom only) then a stride-2 conv: not the same as padding=1
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":  # each input frame becomes 2 output frames: channels [0:C] then [C:2C]
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":  # frames (2j-2, 2j-1, 2j) -> output frame j, for j >= 1
            self.time_conv = Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            assert mode in ("upsample2d", "downsample2d"), mode

    def forward(self, x, cache):
        if self.mode == "upsample3d":
            x = self.upsample_time(x, cache)
        T = x.shape[2]
        x = rearrange(self.resample(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w", t=T)
        if self.mode == "downsample3d":
            x = self.downsample_time(x, cache)
        return x

    def upsample_time(self, x, cache):
        if self not in cache:  # first call: frame 0 passes through once; time_conv's history starts (zeros) after it
            cache[self] = True
            first, x = x[:, :, :1], x[:, :, 1:]
            return first if x.shape[2] == 0 else torch.cat([first, self.upsample_time(x, cache)], dim=2)
        y = self.time_conv(x, cache)
        return rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2)

    def downsample_time(self, x, cache):
        past = cache.get(self)  # the previous chunk's last frame
        cache[self] = x[:, :, -1:].clone()
        if past is None:  # first call: frame 0 passes through, and is history for frames 1-2
            first = x[:, :, :1]
            return first if x.shape[2] == 1 else torch.cat([first, self.time_conv(x)], dim=2)
        return self.time_conv(torch.cat([past, x], dim=2))


class Encoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample, dropout):
        super().__init__()
        dims = [dim * u for u in [1] + dim_mult]  # 96, 96, 192, 384, 384
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        self.downsamples = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                self.downsamples.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    self.downsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                self.downsamples.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.middle = nn.ModuleList([ResidualBlock(dims[-1], dims[-1], dropout), AttentionBlock(dims[-1]),
                                     ResidualBlock(dims[-1], dims[-1], dropout)])
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(inplace=True),
                                  CausalConv3d(dims[-1], z_dim * 2, 3, padding=1))  # mu | logvar

    def forward(self, x, cache):
        x = self.conv1(x, cache)
        for layer in [*self.downsamples, *self.middle]:
            x = layer(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class Decoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_upsample, dropout):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]  # 384, 384, 384, 192, 96
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0], dropout)])
        self.upsamples = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous stage's upsample conv halved the channels
                in_dim = in_dim // 2
            for _ in range(num_res_blocks + 1):
                self.upsamples.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    self.upsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                self.upsamples.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(inplace=True), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x, cache):
        x = self.conv1(x, cache)
        for layer in [*self.middle, *self.upsamples]:
            x = layer(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class WanVAE(nn.Module):
    """The Wan2.1 VAE (Cosmos `VAE_` + the latent normalisation of `VAE`). Defaults are the released configuration
    (126,892,531 parameters); only `temporal_window` and `micro_batch` are about scheduling, never results."""
    latent_channels = 16
    spatial_factor = 8
    temporal_factor = 4

    def __init__(self, dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(False, True, True), dropout=0.0, temporal_window=4, micro_batch=1):
        super().__init__()
        dim_mult, temperal_downsample = list(dim_mult), list(temperal_downsample)  # "temperal" is the official name
        if z_dim != len(LATENT_MEAN):
            raise ValueError(f"the Wan2.1 latent statistics are for z_dim={len(LATENT_MEAN)}, got {z_dim}")
        self.spatial_factor, self.temporal_factor = 2 ** (len(dim_mult) - 1), 2 ** sum(temperal_downsample)
        if temporal_window < 1 or temporal_window % self.temporal_factor:
            raise ValueError(f"temporal_window must be a multiple of {self.temporal_factor}, got {temporal_window}")
        self.temporal_window, self.micro_batch = temporal_window, micro_batch
        self.encoder = Encoder3d(dim, z_dim, dim_mult, num_res_blocks, list(attn_scales), temperal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)  # "quant conv", applied to mu | logvar
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)  # "post-quant conv", applied before the decoder
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, list(attn_scales), temperal_downsample[::-1],
                                 dropout)
        self.reset_latent_stats()

    def reset_latent_stats(self):
        """The latent mean / std as buffers (they follow .to()): no host sync per call. Re-made after a meta load."""
        dev = None if self.conv1.weight.is_meta else self.conv1.weight.device
        for name, values in (("latent_mean", LATENT_MEAN), ("latent_std", LATENT_STD)):
            self.register_buffer(name, torch.tensor(values, device=dev).view(1, -1, 1, 1, 1), persistent=False)

    def latent_stats(self, dtype, device):
        # Cosmos holds mean and std in the model dtype and multiplies by 1/std computed in that dtype; doing the same
        # reproduces its bf16-rounded constants exactly. Shapes (1, 16, 1, 1, 1). Device ops only (no sync).
        return self.latent_mean.to(device, dtype), 1.0 / self.latent_std.to(device, dtype)

    @torch.no_grad()
    def encode(self, video_B_3_T_H_W, micro_batch=None):
        mu_B_16_t_h_w = self.encode_mu(video_B_3_T_H_W, micro_batch)
        mean, inv_std = self.latent_stats(mu_B_16_t_h_w.dtype, mu_B_16_t_h_w.device)
        return (mu_B_16_t_h_w - mean) * inv_std

    @torch.no_grad()
    def encode_mu(self, video_B_3_T_H_W, micro_batch=None):
        """The encoder mean before normalisation (the logvar half is dropped, as Cosmos does). micro_batch: samples
        streamed together (default self.micro_batch)."""
        check_video(video_B_3_T_H_W, self.spatial_factor, self.temporal_factor)
        w = next(self.parameters())
        T = video_B_3_T_H_W.shape[2]
        starts = [0] + list(range(1, T, self.temporal_window))  # frame 0 alone, then chunks
        mu = []
        for x in video_B_3_T_H_W.split(micro_batch or self.micro_batch):
            x, cache = x.to(w), {}
            mu.append(torch.cat([self.conv1(self.encoder(x[:, :, a:b], cache), cache)[:, :self.latent_channels]
                                 for a, b in zip(starts, starts[1:] + [T])], dim=2))
        return torch.cat(mu)

    @torch.no_grad()
    def decode(self, latent_B_16_t_h_w):
        check_latent(latent_B_16_t_h_w, self.latent_channels)
        w = next(self.parameters())
        mean, inv_std = self.latent_stats(w.dtype, w.device)
        videos = []
        for z in latent_B_16_t_h_w.split(self.micro_batch):
            cache = {}
            z = self.conv2(z.to(w) / inv_std + mean, cache)
            # latent 0 decodes to 1 frame, every later one to 4
            videos.append(torch.cat([self.decoder(z[:, :, i:i + 1], cache) for i in range(z.shape[2])], dim=2))
        return torch.cat(videos)


# -----------------------------------------------------------------------------
# The pixel tokenizer: no weights, same interface, for tiny CPU presets.
class PixelTokenizer(nn.Module):
    """Latent = the frames average-pooled by `spatial_factor`, times `scale`, stacked in time groups: frame 0 alone
    (replicated 4 times), then 4 frames each (T = 1+4k -> t = 1+k, as the VAE); channel 3*f + c is colour c of
    frame f of the group (12 channels). Only detail within each block is lost: encode(decode(z)) == z for every
    encoded z; decode averages latent 0's copies (an arbitrary z gets latent 0 projected onto equal copies)."""
    temporal_factor = 4

    def __init__(self, spatial_factor=8, scale=2.0):
        super().__init__()
        self.spatial_factor = spatial_factor
        self.latent_channels = 3 * self.temporal_factor
        self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)  # also carries dtype/device

    @torch.no_grad()
    def encode(self, video_B_3_T_H_W, micro_batch=None):  # micro_batch: accepted for the common interface, unused
        check_video(video_B_3_T_H_W, self.spatial_factor, self.temporal_factor)
        x = video_B_3_T_H_W.to(self.scale)
        s, f = self.spatial_factor, self.temporal_factor
        x = reduce(x, "b c t (h s1) (w s2) -> b c t h w", "mean", s1=s, s2=s)
        x = torch.cat([x[:, :, :1].expand(-1, -1, f, -1, -1), x[:, :, 1:]], dim=2)  # frame 0 -> a group of its own
        return rearrange(x, "b c (t f) h w -> b (f c) t h w", f=f) * self.scale

    @torch.no_grad()
    def decode(self, latent_B_C_t_h_w):
        check_latent(latent_B_C_t_h_w, self.latent_channels)
        z = latent_B_C_t_h_w.to(self.scale) / self.scale
        x = rearrange(z, "b (f c) t h w -> b c t f h w", f=self.temporal_factor)
        x = torch.cat([x[:, :, :1].mean(dim=3), x[:, :, 1:].flatten(2, 3)], dim=2)  # average latent 0's copies
        s = self.spatial_factor
        return repeat(x, "b c t h w -> b c t (h s1) (w s2)", s1=s, s2=s)


# -----------------------------------------------------------------------------
def wan_state_dict(path):
    """The flat state dict of an official tokenizer.pth; one-line UserError for a file that is not one."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise UserError(path, f"not a Wan2.1 VAE state dict ({type(e).__name__})") from None
    need = ("encoder.conv1.weight", "conv2.weight")
    if not isinstance(sd, dict) or any(k not in sd or getattr(sd[k], "ndim", 0) != 5 for k in need):
        raise UserError(path, "not a Wan2.1 VAE state dict (no encoder.conv1 / conv2 5-D weights)")
    return sd


def load_tokenizer(name: str, path: str | None = None, device="cpu", dtype=torch.float32, **kw) -> nn.Module:
    """'wan2.1': the official tokenizer.pth (a flat state dict, no prefix), loaded strictly; path None = random
    weights (for benchmarks and shape tests only). 'pixel': PixelTokenizer(**kw). Returns an eval, frozen module."""
    if name == "pixel":
        if path is not None:
            raise ValueError("the pixel tokenizer has no weights; path must be None")
        tok = PixelTokenizer(**kw)
    elif name == "wan2.1":
        if path is None:
            print("WARNING: Wan2.1 VAE with RANDOM weights (no tokenizer.pth given): latents and videos are "
                  "meaningless")
            tok = WanVAE(**kw)
        else:
            sd = wan_state_dict(path)
            # the width and latent size come from the file (a VAE of any Wan2.1 width: the e2e fixture's is dim 4)
            kw = {"dim": sd["encoder.conv1.weight"].shape[0], "z_dim": sd["conv2.weight"].shape[0], **kw}
            with torch.device("meta"):
                tok = WanVAE(**kw)
            expected = tok.state_dict().keys()
            missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
            if missing or unexpected:
                raise UserError(path, f"not a Wan2.1 VAE of the released layout ({len(missing)} keys missing, e.g. "
                                      f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
            try:
                tok.load_state_dict(sd, strict=True, assign=True)
            except RuntimeError as e:
                raise UserError(path, f"not a Wan2.1 VAE: {str(e).splitlines()[-1].strip()}") from None
            tok.reset_latent_stats()
    else:
        raise ValueError(f"unknown tokenizer {name!r}: expected 'wan2.1' or 'pixel'")
    return tok.to(device=device, dtype=dtype).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Batched encoding: all B x V clips of a training step (or of a cache shard) in as few calls as memory allows.
# Peak encoder activations of one sample per frame pixel and dtype byte at temporal_window 4 (measured with
# `python vae.py bench --micro_batch 1` vs `4`, rounded up for allocator slack)
ENCODE_BYTES_PER_PIXEL = 4000


def tokenizer_dtype(tok):
    return next(iter([*tok.parameters(), *tok.buffers()])).dtype


def encode_micro_batch(tok, H, W, memory_budget=None):
    """How many clips one encode call may hold: the pixel tokenizer any number; the Wan VAE as many as fit in
    `memory_budget` bytes (default: half the free CUDA memory, or 4 GiB on the CPU)."""
    if not isinstance(tok, WanVAE):
        return 1 << 30
    if memory_budget is None:   # chosen once per tokenizer: cudaMemGetInfo is a host sync (issue 20)
        w = next(tok.parameters())
        if getattr(tok, "memory_budget", None) is None:
            tok.memory_budget = torch.cuda.mem_get_info(w.device)[0] // 2 if w.device.type == "cuda" else 4 << 30
        memory_budget = tok.memory_budget
    per_sample = ENCODE_BYTES_PER_PIXEL * H * W * tokenizer_dtype(tok).itemsize
    return max(1, int(memory_budget // per_sample))


@torch.no_grad()
def encode_batched(tok, video_N_3_T_H_W, max_batch=None, dtype=None):
    """Latents [N, C, t, h, w] of N clips in ceil(N / max_batch) calls (None: encode_micro_batch); uint8 video becomes
    x / 127.5 - 1 in `dtype` (default the tokenizer's) as training does, float video is taken as in [-1, 1]."""
    x = video_N_3_T_H_W
    if x.dtype == torch.uint8:
        x = x.to(dtype or tokenizer_dtype(tok)).div(127.5).sub(1.0)
    N, H, W = x.shape[0], x.shape[-2], x.shape[-1]
    max_batch = max_batch or encode_micro_batch(tok, H, W)
    return torch.cat([tok.encode(chunk, micro_batch=len(chunk)) for chunk in x.split(max_batch)])


# -----------------------------------------------------------------------------
# Benchmark: python vae.py bench [--size 256x320[,480x640]] [--frames 13] [--views 4] [--dtype bf16] [--device cpu]
class PeakRSS:
    """Peak growth of resident memory while the block runs, sampled every ms from /proc/self/statm (after handing
    glibc's freed memory back to the OS, which would otherwise be reused unseen)."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the figure can only come out low
            pass
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def poll(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())
        self.growth = self.peak - self.base


def measure(fn, device):
    """(fn(), wall seconds, process CPU seconds, peak bytes: CUDA allocated beyond what was live, or RSS growth)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else mem.growth
    return out, seconds, cpu_seconds, peak


def bench(args):
    """Encode and decode of random video at each --size (comma-separated HxW), every --dtype, random weights."""
    device = torch.device(args.device)
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16]}[args.dtype]
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.size.split(",")]
    what = "peak CUDA alloc" if device.type == "cuda" else "peak RSS growth"
    for dtype in dtypes:
        vae = load_tokenizer("wan2.1", None, device=device, dtype=dtype, micro_batch=args.micro_batch)
        n = sum(p.numel() for p in vae.parameters())
        print(f"Wan2.1 VAE {str(dtype)}, random weights, params {n:,} ({n * dtype.itemsize / 2**20:.0f} MiB) on "
              f"{device} ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}), micro_batch "
              f"{args.micro_batch}")
        for H, W in sizes:
            torch.manual_seed(0)
            x = (torch.rand(args.views, 3, args.frames, H, W, device=device) * 2 - 1).to(dtype)
            if args.warmup:
                vae.decode(vae.encode(x[:, :, :1]))
            z, *enc = measure(lambda: vae.encode(x), device)
            _, *dec = measure(lambda: vae.decode(z), device)
            for name, (seconds, cpu_seconds, peak) in [("encode", enc), ("decode", dec)]:
                print(f"{str(dtype):15s} {args.views} view(s) x {args.frames} x {H}x{W} {name} {seconds:8.2f} s "
                      f"(process CPU {cpu_seconds:8.1f} s)  {what} {peak / 2**20:6.0f} MiB")
            del x, z
        del vae


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Wan2.1 VAE utilities")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time and peak memory of encode/decode, real configuration, random weights")
    b.add_argument("--size", default="256x320", help="HxW, or several: 256x320,480x640")
    b.add_argument("--frames", type=int, default=13)
    b.add_argument("--views", type=int, default=1, help="views folded into the batch")
    b.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"])
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--micro_batch", type=int, default=1, help="samples streamed together")
    b.add_argument("--warmup", type=int, default=1, help="1: run a 1-frame encode/decode first (kernel selection)")
    bench(parser.parse_args())
