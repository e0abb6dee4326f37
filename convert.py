"""
Checkpoint conversion between nanocosmos and the official Cosmos-Predict2 / 2.5 file formats.

    python convert.py out/synthetic/checkpoints/iter_000000100 release/     # same as `export`
    python convert.py export CKPT DEST [--safetensors]     training checkpoint -> model.pt, model_ema_{fp32,bf16}.pt
    python convert.py export CKPT DEST --lora-only [--base BASE]   LoRA run -> its adapter alone (.safetensors)
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
  - LoRA: a training checkpoint of a LoRA run holds only the trainable tensors (<layer>.lora_A / .lora_B and the
    heads trained in full) and {"lora": {rank, alpha, targets, base, base_ema, base_fingerprint, ...}} in its
    config.json; an adapter is those EMA tensors in one .safetensors with the record in its header. export merges
    either onto its base; load_weights / load_dit merge on load, so both are accepted wherever weights are.
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

import lora
import model
from configurator import MissingError, UserError, exit_on_known_errors

OFFICIAL_NAMES = ("model", "model_ema_fp32", "model_ema_bf16")   # + .pt or .safetensors
FORMATS = ("a training checkpoint directory (iter_*/ with .metadata, or one holding latest_checkpoint.txt), "
           "or a .pt / .safetensors file of {'net.<key>': tensor}")




# -----------------------------------------------------------------------------
# reading

def dcp_problem(path):
    """What is wrong with a DCP checkpoint folder (None: complete). Its .metadata lists the byte range of every
    tensor in the .distcp files, so a missing or truncated shard is found from file sizes alone."""
    from torch.distributed.checkpoint import FileSystemReader
    try:
        meta = FileSystemReader(str(path)).read_metadata()
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
        problem = dcp_problem(p)
        if problem:
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
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        # old TransformerEngine versions pickle _extra_state as io.BytesIO: harmless, so allow it in weights_only
        with torch.serialization.safe_globals([io.BytesIO]), warnings.catch_warnings():
            warnings.simplefilter("ignore")                         # torch's pickle-protocol notes: not for users
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
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
    if lora_spec(p) is not None:                       # LoRA factors: merged onto their base here
        return load_lora(p, ema=ema)
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
    if not sd or "x_embedder.proj.1.weight" not in sd:
        hint = next((k[: -len("x_embedder.proj.1.weight")] for k in sd if k.endswith(".x_embedder.proj.1.weight")), "")
        raise UserError(p, f"no DiT weights found ({len(sd)} tensors, none is x_embedder.proj.1.weight"
                                 + (f"): keys start with {hint!r}: strip that prefix" if hint else
                                    f"; first keys: {list(sd)[:3]})"))
    print(f"convert: loaded {len(sd)} tensors from {p} ({source})")
    return sd, run_config_for(p)


# -----------------------------------------------------------------------------
# configuration and building

ROPE_FIELDS = ("rope_h_extrapolation_ratio", "rope_w_extrapolation_ratio", "rope_t_extrapolation_ratio",
               "rope_enable_fps_modulation")


def infer_config(sd, **overrides):
    """model.infer_config, plus the RoPE settings that no tensor holds, taken from the released models: the 14B
    ratios for a 14B-sized net, and the official multi-view nets' t ratio 8/24 when there is a view embedding; the
    single-view defaults otherwise. Temporal positions modulated by fps: Predict2's multi-view net always does,
    Predict2.5's (crossattn_proj present) honours its flag, which the release sets off (buttercup2p5_rectified_flow.py
    :121-138). Returns (cfg, the RoPE fields that were assumed rather than given in overrides)."""
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
    try:
        cfg = config_for(sd, run_config, **config_overrides)
        net = build(cfg, device, dtype)
        model.load_into(net, sd, strict=True)
    except (ValueError, TypeError) as e:
        raise UserError(path, str(e)) from None
    return net.eval(), run_config


def family(cfg):
    """"predict2.5" for a Predict2.5-style net (1000-scale timesteps, crossattn_proj), else "predict2". It decides
    the sampler, the conditioning and the guidance formula (fixtures/README.md, "Predict2.5: what differs")."""
    return "predict2.5" if cfg.timestep_scale != 1.0 or cfg.crossattn_proj_in_channels else "predict2"


def load_text_embedding(path, cfg, device="cpu"):
    """
    A precomputed text context for every sample, float32 [1, N, C], from a safetensors file holding one tensor
    [N, C] or [1, N, C] (any name; or several, one of them named "text_embedding"). C is either the net's
    crossattn_proj input width (Predict2.5: 100352 = 28 Reason1 layers x 3584; Predict2: the T5 width 1024) or,
    for a net with crossattn_proj, its output width (already projected: only valid with the checkpoint whose
    crossattn_proj made it). Multi-view nets take 512 tokens per view (N = 512 V).

    What the release saw: the Predict2.5 robot model was trained on Reason1 embeddings of the empty caption (zeros
    only under its 20% text dropout), and official inference embeds `prompt or ""` for the conditional branch and
    the negative prompt for the unconditional one. Recipe with the official code (nvidia-cosmos/cosmos-predict2.5
    installed, a GPU; text_encoder.py get_reason1_embeddings uses the full_concat strategy of the release):

        from safetensors.torch import save_file
        from cosmos_predict2._src.predict2.text_encoders.text_encoder import get_reason1_embeddings
        emb = get_reason1_embeddings("")                 # the prompt, or "" as in training: [1, 512, 100352]
        save_file({"text_embedding": emb.float().cpu().contiguous()}, "empty_caption_reason1.safetensors")

    (the same with the negative prompt of inference_params.json gives the negative_text_embedding file; official
    inference casts both to bf16 before the net.) Errors name the file: one line, before any sampling.
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
    """Flat dict -> .pt or .safetensors (chosen by the suffix), written to a temporary name and renamed so that
    an interrupted conversion never leaves a truncated file under the real name. config: written as
    <path>.json beside it (what load_weights reads back). metadata: extra safetensors header strings. say: None
    writes silently (training's background writes)."""
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
    n = sum(v.numel() for v in sd.values())
    if say:
        say(f"convert: wrote {path} ({len(sd)} tensors, {n:,} values, {path.stat().st_size / 2**20:,.1f} MiB)")


def prefixed(sd, prefix="net."):
    return {prefix + k: v for k, v in sd.items()}


def cast(sd, dtype):
    """Floating tensors to dtype; integer tensors stay (None: unchanged)."""
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(checkpoint, dest, safetensors=False, lora_only=False, base=None):
    """Training checkpoint -> the three official files in dest (the layout of Cosmos' convert_distcp_to_pt.py):
    model.pt: net.* regular + net_ema.* EMA (fp32, as trained); model_ema_fp32.pt: EMA renamed to net.*;
    model_ema_bf16.pt: the same in bf16 (what inference and the releases use). Plus dest/config.json, the run
    config, which load_weights finds for all three files. A LoRA checkpoint is merged onto its base first (base:
    another path to the same base file, when it moved), so the files load anywhere; lora_only=True writes the
    adapter alone instead (export_adapter)."""
    src = resolve(checkpoint)
    if not src.is_dir():
        raise ValueError(f"{src} is a file; export takes a training checkpoint directory (for files: import)")
    groups = {k.split(".", 1)[0] for k in _dcp_metadata(src)}
    if not {"model", "ema"} <= groups:
        raise ValueError(f"{src} must hold 'model' and 'ema' weights (has {sorted(groups)}); the EMA files need "
                         "EMA weights: train with ema=True")
    rc = run_config_for(src)
    spec = (rc or {}).get("lora")
    if lora_only:
        return export_adapter(src, dest)
    dest, ext = Path(dest), ".safetensors" if safetensors else ".pt"
    ema = model.clean_state_dict(read_dcp(src, "ema"))
    regular = model.clean_state_dict(read_dcp(src, "model"))
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
        cfg, _ = infer_config(ema)
        print(f"convert: {src} has no config.json; config.json gets the one inferred from shapes: {describe(cfg)}")
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


def import_official(src, out, ema=True, allow_missing=False, allow_unexpected=False, dtype=None, seed=0,
                    **overrides):
    """Official Cosmos file (or any checkpoint load_weights reads) -> nanocosmos consolidated file out
    ({"net.<key>"}, .pt or .safetensors) + <out>.json with the configuration: the source's run config when it
    has one, else inferred from the shapes, with `overrides` on top. Missing keys (kept at a fresh init) and
    unexpected ones (dropped) are errors unless allowed. Returns the DiTConfig."""
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


GROW_FIELDS = ("action_mode", "action_dim", "num_actions", "actions_per_latent", "action_hidden", "n_views_emb",
               "view_condition_dim")


def grow(base, out, ema=True, seed=0, dtype=None, **changes):
    """Base checkpoint -> a model with new heads (action MLPs, view-embedding channels, or an action MLP for
    another action_dim / chunk), written to out ({"net.<key>"} + <out>.json) for train.py's init_from. New
    heads start as no-ops (fc2 zero, zero x_embedder columns), so the grown model's output equals the base's;
    the RoPE settings stay the base's for the same reason. Everything is written in the base's dtype unless
    dtype is given. Returns the grown DiTConfig."""
    unknown = set(changes) - set(GROW_FIELDS)
    if unknown:
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
    # the base's other run settings (cameras, tokenizer, ...) still hold: the grown model behaves as the base
    config = {**(run_config or {}), "model": model.config_dict(cfg),
              "grown_from": {"path": str(base), "weights": "ema" if ema else "regular"}}
    save_weights(prefixed(cast(net.state_dict(), dtype or sd["x_embedder.proj.1.weight"].dtype)), out, config)
    return cfg


# -----------------------------------------------------------------------------
# LoRA checkpoints and adapters
#   A LoRA run (train.py lora_rank > 0) saves only its trainable tensors (factors <layer>.lora_A / .lora_B, and the
#   heads trained in full), with {"lora": lora_record(...)} in its config.json: rank, alpha, targets, and the
#   base weights' path and fingerprint. `export --lora-only` writes the same tensors (EMA) as one .safetensors
#   adapter, the record and the run config in its header. load_weights merges either onto the base, after
#   checking the base is the very file trained on: factors fitted to other weights silently produce garbage.

def base_fingerprint(path):
    """lora.fingerprint of a weights file or checkpoint (resolved as every path here)."""
    return lora.fingerprint(resolve(path))


def lora_record(net, base, base_ema=True):
    """What a LoRA checkpoint's config.json holds under "lora" (lora.record of the resolved base)."""
    return lora.record(net, resolve(base), base_ema)


def lora_spec(p):
    """The LoRA record of a resolved checkpoint path, or None when it holds full weights."""
    if p.is_dir():
        return (run_config_for(p) or {}).get("lora")
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise UserError(p, f"not a checkpoint nanocosmos can read ({type(e).__name__}; formats: "
                                     f"{FORMATS})") from None
        return json.loads(meta["nanocosmos_lora"]) if "nanocosmos_lora" in meta else None
    return None


def load_lora_base(spec, where, base=None):
    """The base state dict of a LoRA checkpoint or adapter `where`, after checking its fingerprint. base: the same
    file at another path (it moved)."""
    path = Path(base or spec["base"])
    if not path.exists():
        raise MissingError(where, f"its LoRA base {path} does not exist (the adapter holds only the "
                                            f"factors; pass the base file: convert.py export --base PATH)")
    found = base_fingerprint(path)
    if found != spec["base_fingerprint"]:
        raise UserError(where, f"its LoRA base {path} is not the file it was trained on (fingerprint "
                                     f"{found[:19]} != {spec['base_fingerprint'][:19]}): LoRA factors only fit their "
                                     f"exact base weights")
    sd, _ = load_weights(path, ema=spec["base_ema"])
    return sd


def merge_adapter(base_sd, adapter_sd, spec, run_config, where):
    """Base + adapter -> full state dict (lora.merge_lora_state_dict). Base tensors the trained model had no place
    for (train.py's init_from ignores them) are dropped, as training did."""
    if any(k.endswith(".lora_A") for k in base_sd):
        raise UserError(where, "its LoRA base itself holds LoRA factors; merge it first (convert.py export)")
    if run_config is not None:
        _, unexpected = check_keys({k: v for k, v in base_sd.items() if k not in adapter_sd},
                                   model.config_from_dict(run_config["model"]))
        base_sd = {k: v for k, v in base_sd.items() if k not in unexpected}
    return lora.merge_lora_state_dict(base_sd, adapter_sd, spec["rank"], spec["alpha"])


def load_lora(path, ema=True, base=None):
    """(merged state dict, run config) of a LoRA training checkpoint or adapter file; what load_weights returns for
    them, so train.py's init_from and sample.py take either unchanged."""
    p = resolve(path)
    spec = lora_spec(p)
    if p.is_dir():
        groups = {k.split(".", 1)[0] for k in _dcp_metadata(p)}
        group = "ema" if ema and "ema" in groups else "model"
        adapter, run_config = model.clean_state_dict(read_dcp(p, group)), run_config_for(p)
    else:
        from safetensors import safe_open
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata()
        adapter = model.clean_state_dict(read_file(p))
        run_config = json.loads(meta["nanocosmos_run"]) if "nanocosmos_run" in meta else None
    sd = merge_adapter(load_lora_base(spec, p, base), adapter, spec, run_config, p)
    n = sum(k.endswith(".lora_A") for k in adapter)
    print(f"convert: merged {p} (LoRA rank {spec['rank']}, alpha {spec['alpha']:g}, {n} layers, "
          f"{len(adapter) - 2 * n} heads) onto its base {base or spec['base']}")
    return sd, run_config


def export_adapter(checkpoint, dest):
    """LoRA training checkpoint -> one .safetensors adapter (its EMA factors and heads, {"net.<key>"}), with the
    LoRA record and the run config in the header. dest: a .safetensors path, or a directory (lora_adapter.safetensors
    in it). Returns the path written."""
    src = resolve(checkpoint)
    rc = run_config_for(src) if src.is_dir() else None
    if not rc or "lora" not in rc:
        raise ValueError(f"{src} is not a LoRA training checkpoint (no 'lora' in its config.json): --lora-only "
                         "exports the adapter of a run with lora_rank > 0")
    dest = Path(dest)
    path = dest if dest.suffix == ".safetensors" else dest / "lora_adapter.safetensors"
    adapter = cast(model.clean_state_dict(read_dcp(src, "ema")), torch.float32)
    save_weights(prefixed(adapter), path, metadata=adapter_metadata(rc))
    return path


def adapter_metadata(run_config):
    """The safetensors header entries that make {"net.<key>": trainable tensor} a loadable adapter (train.py's
    consolidated LoRA files use it too): the LoRA record and the whole run config, as JSON strings."""
    return {"nanocosmos_lora": json.dumps(run_config["lora"]), "nanocosmos_run": json.dumps(run_config)}


# -----------------------------------------------------------------------------
# info

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def peek(path):
    """(format description, {key: tensor or shape-only meta tensor}) without reading the weights where the
    format allows it (DCP metadata, safetensors header, memory-mapped .pt)."""
    p = resolve(path)
    if p.is_dir():
        shards = len(list(p.glob("*.distcp")))
        md = _dcp_metadata(p)
        tensors = {k: torch.empty(v.size, dtype=v.properties.dtype, device="meta") for k, v in md.items()}
        return f"training checkpoint (torch.distributed.checkpoint, {shards} shard file{'s' * (shards != 1)}) {p}", tensors
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(p), framework="pt") as f:
                tensors = {k: torch.empty(f.get_slice(k).get_shape(), dtype=_ST_DTYPES[f.get_slice(k).get_dtype()],
                                          device="meta") for k in f.keys()}
        except Exception as e:
            raise UserError(p, f"not a checkpoint nanocosmos can read ({type(e).__name__}; formats: "
                                     f"{FORMATS})") from None
        return f"safetensors file {p}", tensors
    return f"flat .pt file {p}", read_file(p)


# module order of model.DiT, for listing
_ORDER = ("x_embedder", "t_embedder", "t_embedding_norm", "crossattn_proj", "view_embeddings", "action_embedder_B_D",
          "action_embedder_B_3D", "blocks", "final_layer")


def info(path, ema=True):
    """Print what a checkpoint holds: format, prefixes, dropped entries, keys grouped by module with dtypes and
    parameter counts, and the configuration (run config, else inferred). Returns the printed text."""
    fmt, raw = peek(path)
    p = resolve(path)
    lines = [f"format: {fmt}"]
    heads = {}
    for k in raw:
        h = k.split(".", 1)[0] + "." if k.startswith(("net.", "net_ema.", "model.", "ema.")) else "(unprefixed)"
        if p.is_dir() and h == "(unprefixed)":
            h = k.split(".", 1)[0] + "."
        heads[h] = heads.get(h, 0) + 1
    lines.append("entries: " + ", ".join(f"{h}{'*' * (h != '(unprefixed)')} {n}" for h, n in heads.items()))
    if p.is_dir():
        group = "ema." if ema and "ema." in heads else "model."
        chosen = {k[len(group):]: v for k, v in raw.items() if k.startswith(group)}
    else:
        group = _source_prefix(raw, ema)
        chosen = {k[len(group):]: v for k, v in raw.items() if k.startswith(group)}
    sd = model.clean_state_dict(chosen)
    dropped = {}
    for k in set(chosen) - set(sd):
        kind = "_extra_state" if k.endswith("_extra_state") else "accum_*" if k.startswith("accum_") else "pos_embedder*"
        dropped[kind] = dropped.get(kind, 0) + 1
    lines.append(f"weights shown: {group + '*' if group else 'unprefixed keys'}" +
                 (f"; dropped on load: {', '.join(f'{n} {k}' for k, n in sorted(dropped.items()))}" if dropped else ""))
    groups = {}
    order = lambda kv: _ORDER.index(kv[0].split(".", 1)[0]) if kv[0].split(".", 1)[0] in _ORDER else len(_ORDER)
    for k, v in sorted(sd.items(), key=order):
        g = groups.setdefault(k.split(".", 1)[0], {"tensors": 0, "params": 0, "dtypes": set()})
        g["tensors"] += 1
        g["params"] += v.numel()
        g["dtypes"].add(str(v.dtype).replace("torch.", ""))
    nblocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for name, g in groups.items():
        label = f"blocks.0-{nblocks - 1}" if name == "blocks" else name
        lines.append(f"  {label:<24} {g['tensors']:>5} tensors {g['params']:>16,} params  {'/'.join(sorted(g['dtypes']))}")
    dtypes = {}
    for v in sd.values():
        dtypes[str(v.dtype).replace("torch.", "")] = dtypes.get(str(v.dtype).replace("torch.", ""), 0) + v.numel()
    lines.append(f"parameters: {sum(dtypes.values()):,} ({', '.join(f'{d} {n:,}' for d, n in dtypes.items())})")
    rc = run_config_for(p)
    if rc is not None:
        cfg = model.config_from_dict(rc["model"])
        extra = f", step {rc['step']}" if "step" in rc else ""
        lines.append(f"config (run config{extra}): {describe(cfg)}")
    elif "x_embedder.proj.1.weight" not in sd:
        raise UserError(p, f"no DiT weights found ({len(sd)} tensors, none is x_embedder.proj.1.weight; "
                                 f"first keys: {list(sd)[:3]})")
    else:
        cfg, assumed = infer_config(sd)
        lines.append(f"config (inferred from shapes): {describe(cfg)}")
        lines.append(f"  not in the weights, assumed: {', '.join(f'{k}={_fmt(getattr(cfg, k))}' for k in assumed)}")
    text = "\n".join(lines)
    print(text)
    return text


# -----------------------------------------------------------------------------
# command line

def _bool(s):
    v = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(s.lower())
    if v is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")
    return v


def _add_config_args(parser, names):
    for f in fields(model.DiTConfig):
        if f.name in names:
            typ = _bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(f"--{f.name}", type=typ, default=None, metavar=f.type if isinstance(f.type, str)
                                else f.type.__name__, help=f"(default: {'from the file' if parser.prog.endswith('import') else 'the base'})")


def _weights_args(parser):
    w = parser.add_mutually_exclusive_group()
    w.add_argument("--ema", dest="ema", action="store_true", default=True, help="EMA weights (net_ema.*) (default)")
    w.add_argument("--regular", dest="ema", action="store_false", help="regular weights (net.*) of a file with both")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("export", "import", "grow", "info")
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        argv.insert(0, "export")                       # python convert.py <iter_dir> <dest>
    ap = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="training checkpoint -> model.pt, model_ema_fp32.pt, model_ema_bf16.pt")
    e.add_argument("checkpoint", help="iter_XXXXXXXXX dir, or a dir holding [checkpoints/]latest_checkpoint.txt")
    e.add_argument("dest", help="output directory")
    e.add_argument("--safetensors", action="store_true", help="write .safetensors instead of .pt")
    e.add_argument("--lora-only", action="store_true",
                   help="LoRA run: write the adapter alone (DEST/lora_adapter.safetensors, or DEST if it ends in "
                        ".safetensors) instead of merging it onto the base")
    e.add_argument("--base", default=None, help="LoRA run: the base weights file, if it moved since training "
                   "(its fingerprint must still match)")
    i = sub.add_parser("import", help="official Cosmos file -> nanocosmos file + config json")
    i.add_argument("file")
    i.add_argument("out", help="output .pt or .safetensors (config goes to <out>.json)")
    _weights_args(i)
    i.add_argument("--allow-missing", action="store_true", help="initialise weights the file lacks")
    i.add_argument("--allow-unexpected", action="store_true", help="drop tensors the model has no place for")
    i.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="(default: as in the file)")
    i.add_argument("--seed", type=int, default=0, help="init seed for --allow-missing")
    _add_config_args(i, {f.name for f in fields(model.DiTConfig)})
    g = sub.add_parser("grow", help="add action MLPs and/or view-embedding channels to a base checkpoint")
    g.add_argument("base")
    g.add_argument("out", help="output .pt or .safetensors (config goes to <out>.json)")
    _weights_args(g)
    g.add_argument("--views", dest="n_views_emb", type=int, default=None, help="view embeddings (= --n_views_emb)")
    g.add_argument("--seed", type=int, default=0, help="init seed of the new heads")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="(default: the base's)")
    _add_config_args(g, set(GROW_FIELDS) - {"n_views_emb"})
    n = sub.add_parser("info", help="print what a checkpoint holds")
    n.add_argument("path")
    _weights_args(n)
    args = vars(ap.parse_args(argv))

    command = args.pop("command")
    if command == "export":
        export(args["checkpoint"], args["dest"], safetensors=args["safetensors"], lora_only=args["lora_only"],
               base=args["base"])
    elif command == "info":
        info(args["path"], ema=args["ema"])
    else:
        names = {f.name for f in fields(model.DiTConfig)}
        overrides = {k: v for k, v in args.items() if k in names and v is not None}
        dtype = DTYPES[args["dtype"]] if args["dtype"] else None
        if command == "import":
            import_official(args["file"], args["out"], ema=args["ema"], allow_missing=args["allow_missing"],
                            allow_unexpected=args["allow_unexpected"], dtype=dtype, seed=args["seed"], **overrides)
        else:
            grow(args["base"], args["out"], ema=args["ema"], seed=args["seed"], dtype=dtype, **overrides)


if __name__ == "__main__":
    exit_on_known_errors(main)
