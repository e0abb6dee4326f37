"""
Checkpoint conversion between nanocosmos and the official Cosmos-Predict2 / 2.5 file formats.

    python convert.py out/synthetic/checkpoints/iter_000000100 release/     # same as `export`
    python convert.py export CKPT DEST [--safetensors]     training checkpoint -> model.pt, model_ema_{fp32,bf16}.pt
    python convert.py import FILE OUT.pt [--regular] [--allow-missing] [--allow-unexpected] [--action_mode per_frame]
    python convert.py grow BASE OUT.pt --action_mode per_frame [--action_dim 7] [--views 7]
    python convert.py info PATH

The formats:
  - training checkpoint: `<out_dir>/checkpoints/iter_XXXXXXXXX/`, a torch.distributed.checkpoint (DCP) directory
    written by any number of processes, keys "model.<key>" and "ema.<key>", with config.json beside the shards;
  - official / consolidated: a flat {"net.<key>": tensor} dict in .pt (or .safetensors), possibly with
    "net_ema.<key>" (EMA) beside "net.<key>" (regular), TransformerEngine "_extra_state" entries, accum_* counters
    and RoPE tables (pos_embedder*), all three dropped on load;
  - run config: `<file>.json` beside a file or `config.json` in its folder, {"model": model.config_dict(cfg), ...}.
    Without one the configuration is inferred from the tensor shapes and printed.
<key> is always the official module path (model.DiT uses the official names), so no key is ever renamed
beyond the prefix. train.py and sample.py use load_weights() and load_dit().
"""

import argparse
import io
import json
import sys
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import model

OFFICIAL_NAMES = ("model", "model_ema_fp32", "model_ema_bf16")   # + .pt or .safetensors


# -----------------------------------------------------------------------------
# reading

def resolve(path):
    """A path the user gave -> a DCP checkpoint dir or a weights file. Follows latest_checkpoint.txt."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        return p
    if p.name.endswith(".tmp"):
        raise ValueError(f"{p} is an incomplete checkpoint (saves go to .tmp and are renamed when complete)")
    if (p / ".metadata").is_file():
        return p
    for d in (p, p / "checkpoints"):
        latest = d / "latest_checkpoint.txt"
        if latest.is_file():
            target = d / latest.read_text().strip()
            if not (target / ".metadata").is_file():
                raise FileNotFoundError(f"{latest} names {target.name}, which is not a checkpoint directory")
            return target
    files = sorted(x.name for x in p.iterdir() if x.suffix in (".pt", ".safetensors"))
    hint = f"; it holds {', '.join(files)}: pass one of those files" if files else ""
    raise ValueError(f"{p} is neither a training checkpoint (no .metadata) nor a directory holding "
                     f"latest_checkpoint.txt or checkpoints/latest_checkpoint.txt{hint}")


def _dcp_metadata(ckpt_dir):
    md = dcp.FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    return {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}


def read_dcp(ckpt_dir, group):
    """{key: tensor} of one top-level entry ("model" or "ema") of a DCP checkpoint, without a process group.
    Only that entry is read: the optimizer state, twice the model, stays on disk. DCP assembles each tensor
    from however many shards the writing processes left."""
    md = {k[len(group) + 1:]: v for k, v in _dcp_metadata(ckpt_dir).items() if k.startswith(group + ".")}
    if not md:
        raise KeyError(f"{ckpt_dir} has no '{group}' tensors")
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({group: sd}, checkpoint_id=str(ckpt_dir), no_dist=True)
    return sd


def read_file(path):
    """A .pt / .safetensors file -> its flat {name: tensor} dict, memory-mapped where the format allows."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    # old TransformerEngine versions pickle _extra_state as io.BytesIO: harmless, so allow it in weights_only
    with torch.serialization.safe_globals([io.BytesIO]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a flat dict of tensors, got {type(obj).__name__}")
    bad = {k: type(v).__name__ for k, v in obj.items()
           if not torch.is_tensor(v) and not str(k).endswith("_extra_state")}
    if bad:
        shown = ", ".join(f"{k!r}: {t}" for k, t in list(bad.items())[:5])
        raise ValueError(f"{path}: not a flat dict of tensors ({shown}{', ...' if len(bad) > 5 else ''}); "
                         "official and nanocosmos weight files are {'net.<key>': tensor}. A training checkpoint "
                         "is a directory: pass that instead")
    return obj


def _source_prefix(keys, ema):
    """The prefix model.clean_state_dict takes, for messages."""
    has_ema = any(k.startswith("net_ema.") for k in keys)
    has_net = any(k.startswith("net.") for k in keys)
    return "net_ema." if (ema and has_ema) or (has_ema and not has_net) else "net." if has_net else ""


def _read_json(path):
    """A run config ({"model": ...}) or None; other JSON (e.g. a test fixture's sidecar) is not one."""
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return d if isinstance(d, dict) and isinstance(d.get("model"), dict) else None


def run_config_for(path):
    p = Path(path)
    if p.is_dir():
        return _read_json(p / "config.json")
    return _read_json(p.with_suffix(".json")) or _read_json(p.parent / "config.json")


def load_weights(path, ema=True):
    """(state dict with official keys, minus RoPE tables / accum_* / _extra_state; run config dict or None).
    path: a training checkpoint dir (iter_* or a dir holding [checkpoints/]latest_checkpoint.txt) or an
    official / consolidated .pt or .safetensors. ema picks the EMA weights (net_ema.*, DCP "ema") when the
    checkpoint has them; a released file holds only net.*, which already are the EMA weights."""
    p = resolve(path)
    if p.is_dir():
        groups = {k.split(".", 1)[0] for k in _dcp_metadata(p)}
        group = "ema" if ema and "ema" in groups else "model"
        if group != ("ema" if ema else "model"):
            print(f"convert: {p} has no EMA weights, using the regular ones")
        sd = model.clean_state_dict(read_dcp(p, group))
        source = f"{group}.*"
    else:
        raw = read_file(p)
        prefix = _source_prefix(raw, ema)
        sd = model.clean_state_dict(raw, ema=ema)
        source = f"{prefix}*" if prefix else "unprefixed keys"
    if not sd:
        raise ValueError(f"{p}: no DiT weights found")
    print(f"convert: loaded {len(sd)} tensors from {p} ({source})")
    return sd, run_config_for(p)


# -----------------------------------------------------------------------------
# configuration and building

def infer_config(sd, **overrides):
    """model.infer_config plus what the released models tell about what shapes cannot: the 14B RoPE ratios, and
    the multi-view net's RoPE (t ratio 8/24, temporal positions modulated by fps). Returns (cfg, assumed), where
    assumed lists the fields that came from such assumptions rather than from shapes or overrides."""
    cfg = model.infer_config(sd, **overrides)
    assumed = {}
    for preset in model.PRESETS.values():
        if all(getattr(cfg, k) == v for k, v in preset.items() if k in ("model_channels", "num_blocks", "num_heads")):
            assumed.update({k: v for k, v in preset.items() if k.startswith("rope_")})
    if cfg.n_views_emb:
        assumed.update(rope_t_extrapolation_ratio=8 / 24, rope_enable_fps_modulation=True)
    assumed = {k: v for k, v in assumed.items() if k not in overrides}
    rope_defaults = {k: getattr(cfg, k) for k in ("rope_h_extrapolation_ratio", "rope_w_extrapolation_ratio",
                                                  "rope_t_extrapolation_ratio", "rope_enable_fps_modulation")
                     if k not in overrides}
    return replace(cfg, **assumed), sorted({**rope_defaults, **assumed})


def describe(cfg):
    size = next((n for n, p in model.PRESETS.items() if all(getattr(cfg, k) == v for k, v in p.items())), "custom")
    parts = [f"{size} (D={cfg.model_channels}, {cfg.num_blocks} blocks, {cfg.num_heads} heads)",
             f"latent channels {cfg.in_channels}"]
    if cfg.action_mode == "global":
        parts.append(f"action global chunk {cfg.num_actions}x{cfg.action_dim}")
    elif cfg.action_mode == "per_frame":
        parts.append(f"action per latent frame {cfg.actions_per_latent}x{cfg.action_dim}")
    else:
        parts.append("no action")
    parts.append(f"{cfg.n_views_emb} view embeddings" if cfg.n_views_emb else "single view")
    parts.append(f"crossattn_proj {cfg.crossattn_proj_in_channels}->{cfg.crossattn_emb_channels}"
                 if cfg.crossattn_proj_in_channels else f"text width {cfg.crossattn_emb_channels}")
    parts.append(f"timestep_scale {cfg.timestep_scale:g}")
    rope = (f"RoPE ratios h/w/t {cfg.rope_h_extrapolation_ratio:g}/{cfg.rope_w_extrapolation_ratio:g}/"
            f"{cfg.rope_t_extrapolation_ratio:.4g}" + (", fps-modulated" if cfg.rope_enable_fps_modulation else ""))
    return ", ".join(parts + [rope])


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def config_for(sd, run_config, **overrides):
    """The DiTConfig for a state dict: the run config's when there is one, else inferred from shapes (printed)."""
    if run_config is not None:
        return model.config_from_dict({**run_config["model"], **overrides})
    cfg, assumed = infer_config(sd, **overrides)
    print(f"convert: config inferred from shapes: {describe(cfg)}")
    print(f"convert: not in the weights, assumed: {', '.join(f'{k}={_fmt(getattr(cfg, k))}' for k in assumed)}")
    return cfg


def build(cfg, device="cpu", dtype=torch.float32):
    """An uninitialised DiT: built on the meta device so no memory is written twice; fill it with load_into
    (strict) or init_weights."""
    with torch.device("meta"):
        net = model.DiT(cfg).to(dtype)
    return net.to_empty(device=device)


def load_dit(path, device="cpu", ema=True, dtype=torch.float32, **config_overrides):
    """(DiT in eval mode with the checkpoint's weights, run config or None). Every parameter must come from the
    checkpoint and every checkpoint tensor must fit the model (model.load_into strict)."""
    sd, run_config = load_weights(path, ema=ema)
    cfg = config_for(sd, run_config, **config_overrides)
    net = build(cfg, device, dtype)
    model.load_into(net, sd, strict=True)
    return net.eval(), run_config
