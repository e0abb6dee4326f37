"""
Checkpoint conversion between nanocosmos and the official Cosmos-Predict2 / 2.5 file formats.

    python convert.py [export] CKPT DEST [--safetensors]   training checkpoint -> model.pt, model_ema_{fp32,bf16}.pt
    python convert.py export CKPT DEST --lora-only [--base BASE]   LoRA run -> its adapter alone (.safetensors)
    python convert.py import FILE OUT.pt [--regular] [--allow-missing] [--allow-unexpected] [--action_mode per_frame]
    python convert.py grow BASE OUT.pt --action_mode per_frame [--action_dim 7] [--views 7]
    python convert.py info PATH

Formats: a training checkpoint `<out_dir>/checkpoints/iter_XXXXXXXXX/` is a torch.distributed.checkpoint (DCP)
directory, keys "model.<key>" and "ema.<key>", with config.json, the run config {"model": model.config_dict(cfg)}; an
official / consolidated file a flat {"net.<key>": tensor} .pt or .safetensors, maybe with "net_ema.<key>" (EMA), and
`<file>.json` or `config.json` beside it, else the config is inferred from the shapes; TransformerEngine
"_extra_state", accum_* and RoPE tables (pos_embedder*) are dropped on load. A LoRA run saves only its trainable
tensors (<layer>.lora_A / .lora_B, heads trained in full) and {"lora": {rank, alpha, base, base_fingerprint, ...}} in
config.json; an adapter holds their EMA, the record in its header; either is merged onto its base, checked to be the
very file trained on. <key> is the official module path (model.DiT's names): only prefixes are renamed.
"""

import argparse
import io
import json
import sys
import warnings
import zipfile
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import lora
import model
from configurator import MissingError, UserError, exit_on_known_errors

OFFICIAL_NAMES = ("model", "model_ema_fp32", "model_ema_bf16")   # + .pt or .safetensors
FORMATS = ("a training checkpoint directory (iter_*/ with .metadata, or one holding latest_checkpoint.txt), "
           "or a .pt / .safetensors file of {'net.<key>': tensor}")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROPE_FIELDS = ("rope_h_extrapolation_ratio", "rope_w_extrapolation_ratio", "rope_t_extrapolation_ratio",
               "rope_enable_fps_modulation")                  # no tensor holds them: infer_config assumes them
GROW_FIELDS = ("action_mode", "action_dim", "num_actions", "actions_per_latent", "action_hidden", "n_views_emb",
               "view_condition_dim")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ORDER = {m: i for i, m in enumerate((                        # model.DiT's module order, for info
    "x_embedder", "t_embedder", "t_embedding_norm", "crossattn_proj", "view_embeddings", "action_embedder_B_D",
    "action_embedder_B_3D", "blocks", "final_layer"))}


# -----------------------------------------------------------------------------
# reading checkpoints, building nets

def dcp_problem(path):
    """What is wrong with a DCP checkpoint folder (None: complete), from its .metadata and the shards' sizes alone."""
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 (an unreadable index is a damaged checkpoint, whatever the cause)
        return f".metadata is unreadable ({type(e).__name__})"
    need = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = Path(path) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size < size:
            return f"{name} is truncated ({f.stat().st_size} of {size} bytes)"
    return None


def resolve(path):
    """A path the user gave -> a DCP checkpoint dir or a weights file. Follows latest_checkpoint.txt."""
    p = Path(path)
    if not p.exists():
        raise MissingError(p, "no such file or directory")
    if p.is_file():
        return p
    if p.name.endswith(".tmp"):
        raise UserError(p, "an incomplete checkpoint (saves go to .tmp and are renamed when complete)")
    if (p / ".metadata").is_file():
        if problem := dcp_problem(p):
            raise UserError(p, f"a damaged checkpoint: {problem}")
        return p
    for d in (p, p / "checkpoints"):
        latest = d / "latest_checkpoint.txt"
        if latest.is_file():
            name = latest.read_text().strip()
            if not name:
                raise UserError(latest, "is empty (a save was cut off?): pass a checkpoint folder iter_* instead")
            if not (d / name / ".metadata").is_file():
                raise UserError(latest, f"names {name}, which is not a checkpoint directory")
            return resolve(d / name)
    files = sorted(x.name for x in p.iterdir() if x.suffix in (".pt", ".safetensors"))
    hint = f"; it holds {', '.join(files)}: pass one of those files" if files else ""
    raise UserError(p, f"neither a training checkpoint (no .metadata) nor a directory holding "
                             f"latest_checkpoint.txt or checkpoints/latest_checkpoint.txt{hint}")


def _dcp_metadata(ckpt_dir):
    md = dcp.FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    return {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}


def read_dcp(ckpt_dir, group):
    """{key: tensor} of one top-level entry ("model" or "ema") of a DCP checkpoint, alone, without a process group."""
    md = {k[len(group) + 1:]: v for k, v in _dcp_metadata(ckpt_dir).items() if k.startswith(group + ".")}
    if not md:
        raise KeyError(f"{ckpt_dir} has no '{group}' tensors")
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({group: sd}, checkpoint_id=str(ckpt_dir), no_dist=True)
    return sd


def read_file(path, meta=False):
    """A .pt / .safetensors file -> its flat {name: tensor} dict, memory-mapped where the format allows; meta: a
    .safetensors file's as shape-only meta tensors, from its header alone."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                if meta:
                    return {k: torch.empty(f.get_slice(k).get_shape(), dtype=_ST_DTYPES[f.get_slice(k).get_dtype()],
                                           device="meta") for k in f.keys()}
                return {k: f.get_tensor(k) for k in f.keys()}
        # old TransformerEngine versions pickle _extra_state as io.BytesIO: harmless, so allow it in weights_only
        with torch.serialization.safe_globals([io.BytesIO]), warnings.catch_warnings():
            warnings.simplefilter("ignore")                         # torch's pickle-protocol notes: not for users
            obj = torch.load(path, "cpu", weights_only=True, mmap=zipfile.is_zipfile(path))  # legacy non-zip: no mmap
    except Exception as e:   # torch's messages suggest weights_only=False: never offer an unsafe load
        raise UserError(path, f"not a checkpoint nanocosmos can read ({type(e).__name__}; formats: "
                              f"{FORMATS})") from None
    if not isinstance(obj, dict) or not obj:
        raise UserError(path, f"expected a flat dict of tensors, got {type(obj).__name__} (formats: {FORMATS})")
    bad = {k: type(v).__name__ for k, v in obj.items()
           if not torch.is_tensor(v) and not str(k).endswith("_extra_state")}
    if bad:
        shown = ", ".join(f"{k!r}: {t}" for k, t in list(bad.items())[:5])
        raise UserError(path, f"not a flat dict of tensors ({shown}{', ...' if len(bad) > 5 else ''}); "
                                    "official and nanocosmos weight files are {'net.<key>': tensor}. A training "
                                    "checkpoint is a directory: pass that instead")
    return obj


def _source_prefix(keys, ema):
    """The prefix model.clean_state_dict takes, for messages."""
    has_ema = any(k.startswith("net_ema.") for k in keys)
    has_net = any(k.startswith("net.") for k in keys)
    return "net_ema." if (ema and has_ema) or (has_ema and not has_net) else "net." if has_net else ""


def run_config_for(path):
    """The run config ({"model": ...}) in a folder or beside a file, or None (other JSON is not one)."""
    p = Path(path)
    for f in [p / "config.json"] if p.is_dir() else [p.with_suffix(".json"), p.parent / "config.json"]:
        d = json.loads(f.read_text()) if f.is_file() else None
        if isinstance(d, dict) and isinstance(d.get("model"), dict):
            return d
    return None


def require_dit(p, sd):
    """Raises when the state dict sd of p holds no DiT (a wrong prefix is named)."""
    if "x_embedder.proj.1.weight" not in sd:
        hint = next((k[: -len("x_embedder.proj.1.weight")] for k in sd if k.endswith(".x_embedder.proj.1.weight")), "")
        raise UserError(p, f"no DiT weights found ({len(sd)} tensors, none is x_embedder.proj.1.weight"
                           + (f"): keys start with {hint!r}: strip that prefix" if hint else
                              f"; first keys: {list(sd)[:3]})"))


def adapter_header(p):
    """(LoRA record, run config) from a .safetensors LoRA adapter's header; (None, None) for any other file."""
    header = {}
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
    spec = json.loads(header.get("nanocosmos_lora", "null"))
    return spec, json.loads(header.get("nanocosmos_run", "null")) if spec else None


def load_weights(path, ema=True):
    """(state dict with official keys, minus RoPE tables / accum_* / _extra_state; run config or None) of a path
    resolve takes, a LoRA one merged onto its base. ema: the EMA weights (net_ema.*, DCP "ema") where there are."""
    p = resolve(path)
    if p.is_dir():
        group = "ema" if ema and any(k.startswith("ema.") for k in _dcp_metadata(p)) else "model"
        if ema and group != "ema":
            print(f"convert: {p} has no EMA weights, using the regular ones")
        sd, source = model.clean_state_dict(read_dcp(p, group)), f"{group}.*"
        rc = run_config_for(p)
        spec = (rc or {}).get("lora")                  # a LoRA run's checkpoint: its factors, merged below
    else:
        raw = read_file(p)
        prefix = _source_prefix(raw, ema)
        sd, source = model.clean_state_dict(raw, ema=ema), f"{prefix}*" if prefix else "unprefixed keys"
        spec, rc = adapter_header(p)                                       # a LoRA adapter: merged below
        rc = rc if spec else run_config_for(p)
    if spec is None:
        require_dit(p, sd)
        print(f"convert: loaded {len(sd)} tensors from {p} ({source})")
        return sd, rc
    merged = merge_adapter(load_lora_base(spec, p), sd, spec, rc, p)
    n = sum(k.endswith(".lora_A") for k in sd)
    print(f"convert: merged {p} (LoRA rank {spec['rank']}, alpha {spec['alpha']:g}, {n} layers, "
          f"{len(sd) - 2 * n} heads) onto its base {spec['base']}")
    return merged, rc


def infer_config(sd, **overrides):
    """model.infer_config plus the released models' RoPE settings: a preset's ratios for its size; with views, t ratio
    8/24, fps-modulated except in Predict2.5 (crossattn_proj). Returns (cfg, the RoPE fields not in overrides)."""
    cfg = model.infer_config(sd, **overrides)
    known = {}
    for preset in model.PRESETS.values():
        if all(getattr(cfg, k) == v for k, v in preset.items() if k in ("model_channels", "num_blocks", "num_heads")):
            known.update({k: v for k, v in preset.items() if k in ROPE_FIELDS})
    if cfg.n_views_emb:
        known.update(rope_t_extrapolation_ratio=8 / 24, rope_enable_fps_modulation=not cfg.crossattn_proj_in_channels)
    cfg = replace(cfg, **{k: v for k, v in known.items() if k not in overrides})
    return cfg, [k for k in ROPE_FIELDS if k not in overrides]


def describe(cfg):
    size = next((n for n, p in model.PRESETS.items() if all(getattr(cfg, k) == v for k, v in p.items())), "custom")
    action = {"global": f"action global chunk {cfg.num_actions}x{cfg.action_dim}",
              "per_frame": f"action per latent frame {cfg.actions_per_latent}x{cfg.action_dim}"}
    return ", ".join([
        f"{size} (D={cfg.model_channels}, {cfg.num_blocks} blocks, {cfg.num_heads} heads)",
        f"latent channels {cfg.in_channels}", action.get(cfg.action_mode, "no action"),
        f"{cfg.n_views_emb} view embeddings" if cfg.n_views_emb else "single view",
        f"crossattn_proj {cfg.crossattn_proj_in_channels}->{cfg.crossattn_emb_channels}"
        if cfg.crossattn_proj_in_channels else f"text width {cfg.crossattn_emb_channels}",
        f"timestep_scale {cfg.timestep_scale:g}",
        f"RoPE ratios h/w/t {cfg.rope_h_extrapolation_ratio:g}/{cfg.rope_w_extrapolation_ratio:g}/"
        f"{cfg.rope_t_extrapolation_ratio:.4g}" + (", fps-modulated" if cfg.rope_enable_fps_modulation else "")])


def _assumed(cfg, assumed):
    return ", ".join(f"{k}={getattr(cfg, k):.4g}" if isinstance(getattr(cfg, k), float) else f"{k}={getattr(cfg, k)}"
                     for k in assumed)


def config_for(sd, run_config, **overrides):
    """The DiTConfig for a state dict: the run config's when there is one, else inferred from shapes (printed)."""
    if run_config is not None:
        return model.config_from_dict({**run_config["model"], **overrides})
    cfg, assumed = infer_config(sd, **overrides)
    print(f"convert: config inferred from shapes: {describe(cfg)}")
    print(f"convert: not in the weights, assumed: {_assumed(cfg, assumed)}")
    return cfg


def build(cfg, device="cpu", dtype=torch.float32):
    """An uninitialised DiT, built on meta (no memory written twice): fill it with load_into or init_weights."""
    with torch.device("meta"):
        net = model.DiT(cfg).to(dtype)
    return net.to_empty(device=device)


def load_dit(path, device="cpu", ema=True, dtype=torch.float32, **config_overrides):
    """(DiT in eval mode with the checkpoint's weights, run config or None); model.load_into strict: all must fit."""
    sd, run_config = load_weights(path, ema=ema)
    try:
        net = build(config_for(sd, run_config, **config_overrides), device, dtype)
        model.load_into(net, sd, strict=True)
    except (ValueError, TypeError) as e:
        raise UserError(path, str(e)) from None
    return net.eval(), run_config


def family(cfg):
    """"predict2.5" (1000-scale timesteps, crossattn_proj) or "predict2": sampler, conditioning, guidance formula."""
    return "predict2.5" if cfg.timestep_scale != 1.0 or cfg.crossattn_proj_in_channels else "predict2"


def load_text_embedding(path, cfg, device="cpu"):
    """A precomputed text context for every sample, float32 [1, N, C], from a safetensors file holding one tensor
    [N, C] or [1, N, C] (any name, or one named "text_embedding"). C: the net's crossattn_proj input width
    (Predict2.5: 100352 = 28 Reason1 layers x 3584; Predict2: T5's 1024) or its output width (already projected by
    this very checkpoint). Multi-view nets take 512 tokens per view (N = 512 V). The Predict2.5 robot model was
    trained on the empty caption's Reason1 embedding; with the official code (cosmos-predict2.5, a GPU; the
    negative prompt of inference_params.json gives the negative_text_embedding file the same way):

        from cosmos_predict2._src.predict2.text_encoders.text_encoder import get_reason1_embeddings
        emb = get_reason1_embeddings("")                 # the prompt, or "" as in training: [1, 512, 100352]
        save_file({"text_embedding": emb.float().cpu().contiguous()}, "empty_caption_reason1.safetensors")
    """
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "text embedding not found")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise UserError(path, f"not a safetensors file ({type(e).__name__})") from None
    if len(tensors) != 1 and "text_embedding" not in tensors:
        raise UserError(path, f"expected one tensor or one named 'text_embedding', got {sorted(tensors)}")
    emb = tensors.get("text_embedding", next(iter(tensors.values())))
    emb = emb[None] if emb.ndim == 2 else emb
    widths = {cfg.crossattn_proj_in_channels or cfg.crossattn_emb_channels, cfg.crossattn_emb_channels}
    if emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[-1] not in widths:
        raise UserError(path, f"text embedding of shape {list(emb.shape)}; this net takes [1, N, C] with C in "
                                    f"{sorted(widths)} (crossattn_proj input / projected width)")
    return emb.float().to(device)


# -----------------------------------------------------------------------------
# writing

def save_weights(sd, path, config=None, metadata=None, say=print):
    """Flat dict -> .pt or .safetensors (by the suffix), through a temporary name (never a truncated file). config:
    written to <path>.json; metadata: extra safetensors header strings; say: None writes silently."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt", **(metadata or {})})
    else:
        torch.save(sd, tmp)
    tmp.replace(path)
    if config is not None:
        path.with_suffix(".json").write_text(json.dumps(config, indent=1) + "\n")
    if say:
        n = sum(v.numel() for v in sd.values())
        say(f"convert: wrote {path} ({len(sd)} tensors, {n:,} values, {path.stat().st_size / 2**20:,.1f} MiB)")


def prefixed(sd, prefix="net."):
    return {prefix + k: v for k, v in sd.items()}


def cast(sd, dtype):
    """Floating tensors to dtype; integer tensors stay (None: unchanged)."""
    return sd if dtype is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def export(checkpoint, dest, safetensors=False, lora_only=False, base=None):
    """Training checkpoint -> dest/model.pt (net.* regular + net_ema.* EMA), model_ema_{fp32,bf16}.pt (EMA as net.*),
    config.json. A LoRA run is merged onto its base (base: if it moved) unless lora_only (export_adapter)."""
    src = resolve(checkpoint)
    if not src.is_dir():
        raise UserError(src, "is a file; export takes a training checkpoint directory (iter_* or its run's "
                             "checkpoints/); a weights file is already exported (convert.py info shows it)")
    groups = {k.split(".", 1)[0] for k in _dcp_metadata(src)}
    if not {"model", "ema"} <= groups:
        raise UserError(src, f"must hold 'model' and 'ema' weights (has {sorted(groups)}); the EMA files need "
                             "EMA weights: train with ema=True")
    if lora_only:
        return export_adapter(src, dest)
    rc = run_config_for(src)
    spec = (rc or {}).get("lora")
    dest, ext = Path(dest), ".safetensors" if safetensors else ".pt"
    ema, regular = (model.clean_state_dict(read_dcp(src, group)) for group in ("ema", "model"))
    if spec:
        base_sd = load_lora_base(spec, src, base)
        ema, regular = merge_adapter(base_sd, ema, spec, rc, src), merge_adapter(base_sd, regular, spec, rc, src)
        del base_sd
        rc = {**{k: v for k, v in rc.items() if k != "lora"}, "merged_lora": spec}
    save_weights({**prefixed(regular), **prefixed(ema, "net_ema.")}, dest / ("model" + ext))
    del regular                                        # one model's worth of memory less for the rest
    save_weights(prefixed(cast(ema, torch.float32)), dest / ("model_ema_fp32" + ext))
    save_weights(prefixed(cast(ema, torch.bfloat16)), dest / ("model_ema_bf16" + ext))
    if rc is None:
        cfg, assumed = infer_config(ema)
        print(f"convert: warning: {src} has no config.json: {dest / 'config.json'} gets a config GUESSED from "
              f"shapes: {describe(cfg)}; assumed, not in the weights: {_assumed(cfg, assumed)}. If the run used "
              f"others, copy its config.json (any iter_* folder of the run has it) into {src} and export again")
        rc = {"model": model.config_dict(cfg)}
    (dest / "config.json").write_text(json.dumps(rc, indent=1) + "\n")
    print(f"convert: wrote {dest / 'config.json'}")


def check_keys(sd, cfg):
    """(missing, unexpected) keys of sd for a DiT(cfg); raises on a shape mismatch. Checked on the meta device."""
    with torch.device("meta"):
        ref = model.DiT(cfg).state_dict()
    bad = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in ref.items()
           if k in sd and sd[k].shape != v.shape]
    if bad:
        raise ValueError("shape mismatch: " + ", ".join(bad))
    return [k for k in ref if k not in sd], [k for k in sd if k not in ref]


def import_official(src, out, ema=True, allow_missing=False, allow_unexpected=False, dtype=None, seed=0, **overrides):
    """Any checkpoint load_weights reads -> out ({"net.<key>"}) + <out>.json (its config with `overrides` on top).
    Missing keys (fresh init) and unexpected ones (dropped) are errors unless allowed. Returns the DiTConfig."""
    info(src, ema=ema)
    sd, run_config = load_weights(src, ema=ema)
    cfg = config_for(sd, run_config, **overrides)
    missing, unexpected = check_keys(sd, cfg)
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} weights the model needs are not in {src}: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} (--allow-missing initialises them fresh)")
    if unexpected and not allow_unexpected:
        raise ValueError(f"{len(unexpected)} tensors in {src} have no place in the model {describe(cfg)}: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} (--allow-unexpected drops them)")
    if unexpected:
        print(f"convert: dropped {len(unexpected)} unexpected tensors: {unexpected}")
    sd = {k: v for k, v in sd.items() if k not in unexpected}
    if missing:
        print(f"convert: {len(missing)} missing tensors get a fresh initialisation (seed {seed}): {missing}")
        net = build(cfg)
        torch.manual_seed(seed)
        net.init_weights()
        model.load_into(net, sd, strict=False)
        sd = cast(net.state_dict(), dtype or sd["x_embedder.proj.1.weight"].dtype)
    config = {**(run_config or {}), "model": model.config_dict(cfg),
              "source": {"path": str(src), "weights": "ema" if ema else "regular"}}
    save_weights(prefixed(cast(sd, dtype)), out, config)
    return cfg


def grow(base, out, ema=True, seed=0, dtype=None, **changes):
    """Base checkpoint -> out ({"net.<key>"} + <out>.json) with new action MLPs / view-embedding channels, as no-ops
    (fc2 zero, zero x_embedder columns; RoPE kept): the output equals the base's. Returns the grown DiTConfig."""
    if unknown := set(changes) - set(GROW_FIELDS):
        raise ValueError(f"grow changes only {', '.join(GROW_FIELDS)}; got {sorted(unknown)}")
    sd, run_config = load_weights(base, ema=ema)
    base_cfg = config_for(sd, run_config)
    cfg = replace(base_cfg, **changes)
    if cfg == base_cfg:
        raise ValueError(f"nothing to grow: the base already is {describe(base_cfg)}")
    net = build(cfg)
    torch.manual_seed(seed)
    net.init_weights()                                 # the new heads' init; every base tensor is then loaded over it
    missing, _, regrown = model.load_into(net, sd, strict=True, grow=True)
    print(f"convert: grew {describe(base_cfg)}\n      into {describe(cfg)}\n"
          f"      new: {missing or '-'}; re-shaped: {regrown or '-'}")
    config = {**(run_config or {}), "model": model.config_dict(cfg),
              "grown_from": {"path": str(base), "weights": "ema" if ema else "regular"}}
    save_weights(prefixed(cast(net.state_dict(), dtype or sd["x_embedder.proj.1.weight"].dtype)), out, config)
    return cfg


# -----------------------------------------------------------------------------
# LoRA checkpoints and adapters (the module docstring's "LoRA")

def base_fingerprint(path):
    """lora.fingerprint of a weights file or checkpoint (resolved as every path here)."""
    return lora.fingerprint(resolve(path))


def lora_record(net, base, base_ema=True):
    """What a LoRA checkpoint's config.json holds under "lora" (lora.record of the resolved base)."""
    return lora.record(net, resolve(base), base_ema)


def load_lora_base(spec, where, base=None):
    """The fingerprint-checked base state dict of a LoRA checkpoint or adapter `where` (base: if it moved)."""
    path = Path(base or spec["base"])
    if not path.exists():
        raise MissingError(where, f"its LoRA base {path} does not exist (the adapter holds only the factors; pass "
                                  f"the base file: convert.py export --base PATH)")
    if (found := base_fingerprint(path)) != spec["base_fingerprint"]:
        raise UserError(where, f"its LoRA base {path} is not the file it was trained on (fingerprint {found[:19]} "
                               f"!= {spec['base_fingerprint'][:19]}): LoRA factors only fit their exact base weights")
    return load_weights(path, ema=spec["base_ema"])[0]


def merge_adapter(base_sd, adapter_sd, spec, run_config, where):
    """Base + adapter -> full state dict, without the base tensors the trained model had no place for (as training)."""
    if any(k.endswith(".lora_A") for k in base_sd):
        raise UserError(where, "its LoRA base itself holds LoRA factors; merge it first (convert.py export)")
    if run_config is not None:
        _, unexpected = check_keys({k: v for k, v in base_sd.items() if k not in adapter_sd},
                                   model.config_from_dict(run_config["model"]))
        base_sd = {k: v for k, v in base_sd.items() if k not in unexpected}
    return lora.merge_lora_state_dict(base_sd, adapter_sd, spec["rank"], spec["alpha"])


def export_adapter(checkpoint, dest):
    """LoRA training checkpoint -> .safetensors adapter (EMA factors and heads, the LoRA record and run config in the
    header) at dest, or dest/lora_adapter.safetensors when dest is not a .safetensors path. Returns the path."""
    src = resolve(checkpoint)
    rc = run_config_for(src) if src.is_dir() else None
    if not rc or "lora" not in rc:
        raise UserError(src, "not a LoRA training checkpoint (no 'lora' in its config.json): --lora-only exports "
                             "the adapter of a run with lora_rank > 0")
    dest = Path(dest)
    path = dest if dest.suffix == ".safetensors" else dest / "lora_adapter.safetensors"
    adapter = prefixed(cast(model.clean_state_dict(read_dcp(src, "ema")), torch.float32))
    save_weights(adapter, path, metadata=adapter_metadata(rc))
    return path


def adapter_metadata(run_config):
    """The safetensors header that makes {"net.<key>": trainable tensor} an adapter (train.py's LoRA files too)."""
    return {"nanocosmos_lora": json.dumps(run_config["lora"]), "nanocosmos_run": json.dumps(run_config)}


# -----------------------------------------------------------------------------
# info and the command line

def info(path, ema=True):
    """Print and return what a checkpoint holds: format, prefixes, dropped entries, modules, config; no weights read."""
    p = resolve(path)
    if p.is_dir():
        n = len(list(p.glob("*.distcp")))
        fmt = f"training checkpoint (torch.distributed.checkpoint, {n} shard file{'s' * (n != 1)}) {p}"
        raw = {k: torch.empty(v.size, dtype=v.properties.dtype, device="meta") for k, v in _dcp_metadata(p).items()}
    else:
        fmt, raw = f"{'safetensors' if p.suffix == '.safetensors' else 'flat .pt'} file {p}", read_file(p, meta=True)
    heads = Counter(k.split(".", 1)[0] + "." if p.is_dir() or k.startswith(("net.", "net_ema.", "model.", "ema."))
                    else "(unprefixed)" for k in raw)
    lines = [f"format: {fmt}",
             "entries: " + ", ".join(f"{h}{'*' * (h != '(unprefixed)')} {n}" for h, n in heads.items())]
    group = ("ema." if ema and "ema." in heads else "model.") if p.is_dir() else _source_prefix(raw, ema)
    chosen = {k[len(group):]: v for k, v in raw.items() if k.startswith(group)}
    sd = model.clean_state_dict(chosen)
    dropped = Counter("_extra_state" if k.endswith("_extra_state") else "accum_*" if k.startswith("accum_")
                      else "pos_embedder*" for k in set(chosen) - set(sd))
    lines.append(f"weights shown: {group + '*' if group else 'unprefixed keys'}" +
                 (f"; dropped on load: {', '.join(f'{n} {k}' for k, n in sorted(dropped.items()))}" if dropped else ""))
    modules = sorted(dict.fromkeys(k.split(".", 1)[0] for k in sd), key=lambda m: _ORDER.get(m, len(_ORDER)))
    nblocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for m in modules:
        vs = [v for k, v in sd.items() if k.split(".", 1)[0] == m]
        label = f"blocks.0-{nblocks - 1}" if m == "blocks" else m
        kinds = "/".join(sorted({str(v.dtype).replace("torch.", "") for v in vs}))
        lines.append(f"  {label:<24} {len(vs):>5} tensors {sum(v.numel() for v in vs):>16,} params  {kinds}")
    dtypes = Counter()
    for v in sd.values():
        dtypes[str(v.dtype).replace("torch.", "")] += v.numel()
    lines.append(f"parameters: {sum(dtypes.values()):,} ({', '.join(f'{d} {n:,}' for d, n in dtypes.items())})")
    spec, rc = adapter_header(p) if not p.is_dir() else (None, None)
    if spec:
        lines.append(f"LoRA adapter: rank {spec['rank']}, alpha {spec['alpha']:g}, {len(sd)} tensors (factors and "
                     f"heads) for the base {spec['base']} (loading merges them onto it)")
    if (rc := rc or run_config_for(p)) is not None:
        step = f", step {rc['step']}" if "step" in rc else ""
        lines.append(f"config (run config{step}): {describe(model.config_from_dict(rc['model']))}")
    else:
        require_dit(p, sd)
        cfg, assumed = infer_config(sd)
        lines.append(f"config (inferred from shapes): {describe(cfg)}")
        lines.append(f"  not in the weights, assumed: {_assumed(cfg, assumed)}")
    text = "\n".join(lines)
    print(text)
    return text


def _bool(s):
    if s.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")
    return s.lower() in ("true", "1", "yes")


def _add_config_args(parser, names, default):
    for f in fields(model.DiTConfig):
        if f.name in names:
            typ = _bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
            metavar = f.type if isinstance(f.type, str) else f.type.__name__
            parser.add_argument(f"--{f.name}", type=typ, default=None, metavar=metavar, help=f"(default: {default})")


def _weights_args(parser):
    w = parser.add_mutually_exclusive_group()
    w.add_argument("--ema", dest="ema", action="store_true", default=True, help="EMA weights (net_ema.*) (default)")
    w.add_argument("--regular", dest="ema", action="store_false", help="regular weights (net.*) of a file with both")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"export": export, "import": import_official, "grow": grow, "info": info}
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        argv.insert(0, "export")                       # python convert.py <iter_dir> <dest>
    ap = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0].strip())
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="training checkpoint -> model.pt, model_ema_fp32.pt, model_ema_bf16.pt")
    e.add_argument("checkpoint", help="iter_XXXXXXXXX dir, or a dir holding [checkpoints/]latest_checkpoint.txt")
    e.add_argument("dest", help="output directory")
    e.add_argument("--safetensors", action="store_true", help="write .safetensors instead of .pt")
    e.add_argument("--lora-only", action="store_true", help="LoRA run: write the adapter alone (DEST/lora_adapter"
                   ".safetensors, or DEST if it ends in .safetensors) instead of merging it onto the base")
    e.add_argument("--base", default=None, help="LoRA run: the base weights file, if it moved since training "
                   "(its fingerprint must still match)")
    i = sub.add_parser("import", help="official Cosmos file -> nanocosmos file + config json")
    i.add_argument("src", metavar="file")
    i.add_argument("out", help="output .pt or .safetensors (config goes to <out>.json)")
    _weights_args(i)
    i.add_argument("--allow-missing", action="store_true", help="initialise weights the file lacks")
    i.add_argument("--allow-unexpected", action="store_true", help="drop tensors the model has no place for")
    i.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="(default: as in the file)")
    i.add_argument("--seed", type=int, default=0, help="init seed for --allow-missing")
    _add_config_args(i, {f.name for f in fields(model.DiTConfig)}, "from the file")
    g = sub.add_parser("grow", help="add action MLPs and/or view-embedding channels to a base checkpoint")
    g.add_argument("base")
    g.add_argument("out", help="output .pt or .safetensors (config goes to <out>.json)")
    _weights_args(g)
    g.add_argument("--views", dest="n_views_emb", type=int, default=None, help="view embeddings (= --n_views_emb)")
    g.add_argument("--seed", type=int, default=0, help="init seed of the new heads")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="(default: the base's)")
    _add_config_args(g, set(GROW_FIELDS) - {"n_views_emb"}, "the base")
    n = sub.add_parser("info", help="print what a checkpoint holds")
    n.add_argument("path")
    _weights_args(n)
    args = vars(ap.parse_args(argv))   # every option is named as its function's parameter; None: not given
    run = commands[args.pop("command")]
    if args.get("dtype"):
        args["dtype"] = DTYPES[args["dtype"]]
    run(**{k: v for k, v in args.items() if v is not None})


if __name__ == "__main__":
    exit_on_known_errors(main)
