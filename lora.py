"""
LoRA for the DiT: low-rank factors on frozen linears (the official recipe's targets), merging, and what a training
run checks and records about them. model.py knows nothing of LoRA; train.py calls check_config, apply, enabled,
check_resume, describe and run_config; convert.py merges adapters with merge_lora_state_dict.
"""

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import model
from configurator import UserError

# -----------------------------------------------------------------------------
# LoRA: post-training the released weights on one GPU
#   y = W x + (alpha / r) B A x with A [r, in] (Kaiming-uniform, as nn.Linear) and B [out, r] = 0, so the adapted
#   network starts exactly as its base. The wrapped layer keeps its official `.weight` / `.bias` names and adds
#   `<layer>.lora_A` / `<layer>.lora_B`, so official weights load into a LoRA net unchanged. Everything else is
#   frozen (and may be stored in bf16), except the heads a grown model must learn from scratch (LORA_TRAIN_FULL).

# The official LoRA recipe's targets (cosmos-predict2.5 cosmos_predict2/experiments/base/cosmos_nemo_assets_lora.py,
# lora_target_modules "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2", matched as name suffixes by PEFT,
# hence cross-attention too). Action models see an all-zero text, which gives cross-attention q/k no gradient at
# all, so cross-attention is a target only where text is used.
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.output_proj",
                "mlp.layer1", "mlp.layer2")
LORA_TEXT_TARGETS = ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.output_proj")
# Trained in full (fp32): the action MLPs and the view embedding are new (or re-purposed) heads. The view-embedding
# channels are the last input columns of x_embedder.proj.1, which is trained whole: splitting 0.2M parameters (2B)
# off into a second tensor would break the official key layout, and a gradient mask would not stop weight decay.
LORA_TRAIN_FULL = ("x_embedder",) + tuple(p.rstrip(".") for ps in model.NEW_HEADS.values() for p in ps)


def default_lora_targets(text=False):
    return list(LORA_TARGETS + (LORA_TEXT_TARGETS if text else ()))


def lora_delta(lora_A, lora_B, scale):
    """scale * B A in float32: what merging adds to a base weight (the one place this maths lives)."""
    return scale * (lora_B.float() @ lora_A.float())


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus trainable fp32 low-rank factors. Under autocast both paths run in the autocast
    dtype; without it the base runs in the input's dtype and the factors in theirs (float32)."""

    def __init__(self, base: nn.Linear, rank, alpha, generator=None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias          # the same Parameters: official keys, no copy
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        if dev.type != "meta":
            a = torch.empty(rank, self.in_features)            # drawn on the CPU: the same on every rank and device
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            with torch.no_grad():
                self.lora_A.copy_(a)

    def forward(self, x):
        # in-place adds: a linear's output is not saved for its backward, and one [tokens, out] temporary less
        # per layer is what the peak of a checkpointed block's recomputation is made of
        if not x.is_meta and torch.is_autocast_enabled(x.device.type):     # (meta: no autocast)
            return F.linear(x, self.weight, self.bias).add_(F.linear(F.linear(x, self.lora_A), self.lora_B),
                                                            alpha=self.scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        d = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return F.linear(x, self.weight.to(x.dtype), bias).add_(d.to(x.dtype), alpha=self.scale)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def _matches(name, pattern):
    """PEFT-style: a pattern names a layer by a suffix of its dotted path ("mlp.layer1"), or by a glob of the
    whole path ("blocks.2[0-7].self_attn.*")."""
    from fnmatch import fnmatchcase
    return name == pattern or name.endswith("." + pattern) or fnmatchcase(name, pattern)


def _check_base_dtype(module, args, kwargs):
    x = args[0] if args else kwargs["x_B_C_T_H_W"]
    if x.is_meta:         # shapes only (the plan's op count): no autocast on meta, nothing to check
        return
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != module.lora["base_dtype_t"]:
        raise TypeError(f"the frozen base weights are {module.lora['base_dtype']} and the input {x.dtype}: run the "
                        f"network under torch.autocast (train.py dtype=bfloat16) or keep base_dtype float32")


@torch.no_grad()
def apply_lora(net, rank, alpha=None, targets=None, train_full=LORA_TRAIN_FULL, base_dtype=None, seed=0):
    """Turn `net` (weights already loaded) into a LoRA net in place and return it. targets: layer-name patterns
    (see _matches; default: default_lora_targets()); each must match at least one nn.Linear. alpha defaults to
    rank (scale 1, as the official recipe). train_full: top-level modules trained in full. base_dtype (e.g.
    torch.bfloat16): storage dtype of every frozen tensor; a bf16 base then needs autocast, which a forward
    pre-hook checks. seed: the factors' init, identical on every rank without any broadcast.
    Apply it after loading the base and before DDP / FSDP wrapping and torch.compile."""
    if rank <= 0:
        raise ValueError(f"lora rank must be > 0, got {rank}")
    if getattr(net, "lora", None):
        raise ValueError("apply_lora: the network already has LoRA factors")
    targets = list(default_lora_targets() if targets is None else targets)
    alpha = float(rank if alpha is None else alpha)
    linears = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    chosen = []
    for pattern in targets:
        hit = [n for n in linears if _matches(n, pattern)]
        if not hit:
            raise ValueError(f"lora target {pattern!r} matches no linear layer (they are named like "
                             f"'blocks.0.self_attn.q_proj', 'blocks.0.mlp.layer1')")
        chosen += [n for n in hit if n not in chosen]
    train_full = tuple(train_full)    # top-level module names, or prefixes of them (model.NEW_HEADS)
    clash = [n for n in chosen if n.split(".")[0].startswith(train_full)]
    if clash:
        raise ValueError(f"lora targets {clash[:4]} lie in modules trained in full ({', '.join(train_full)})")
    net.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name in sorted(chosen, key=lambda n: list(linears).index(n)):     # module order: init independent of targets order
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, LoRALinear(linears[name], rank, alpha, g))
    for n, p in net.named_parameters():
        if n.split(".")[0].startswith(train_full) or n.endswith((".lora_A", ".lora_B")):
            p.requires_grad_(True)
    if base_dtype is not None and base_dtype != torch.float32:
        for m in net.modules():
            for k, p in list(m._parameters.items()):
                if p is not None and not p.requires_grad and p.is_floating_point():
                    m._parameters[k] = nn.Parameter(p.to(base_dtype), requires_grad=False)
        net.register_forward_pre_hook(_check_base_dtype, with_kwargs=True)
    net.lora = {"rank": rank, "alpha": alpha, "targets": targets, "train_full": list(train_full),
                "base_dtype": str(base_dtype or torch.float32).replace("torch.", ""),
                "base_dtype_t": base_dtype or torch.float32}
    return net


def lora_config(net):
    """The LoRA settings of a LoRA net as a JSON-able dict (rank, alpha, targets, train_full, base_dtype)."""
    net = model.unwrap(net)
    if not getattr(net, "lora", None):
        raise ValueError("the network has no LoRA factors")
    return {k: v for k, v in net.lora.items() if k != "base_dtype_t"}


def lora_state_dict(net):
    """What a LoRA training checkpoint holds: the trainable tensors only (factors + fully trained heads), by
    official-style key. (Under FSDP these are the DTensor shards; torch.distributed.checkpoint's
    get_model_state_dict(..., options=StateDictOptions(ignore_frozen_params=True)) gives the same keys.)"""
    return {n: p.detach() for n, p in model.unwrap(net).named_parameters() if p.requires_grad}


@torch.no_grad()
def merge_lora(net, dtype=torch.float32):
    """Fold the factors into the base weights (W + scale B A, in float32) and turn every LoRALinear back into an
    nn.Linear: the result is a plain DiT with the official keys, all in `dtype`, every parameter trainable."""
    for name, m in list(net.named_modules()):
        if isinstance(m, LoRALinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                            dtype=torch.float32)
            lin.weight.copy_(m.weight.float() + lora_delta(m.lora_A, m.lora_B, m.scale))
            if m.bias is not None:
                lin.bias.copy_(m.bias.float())
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, lin)
    for k, hook in list(net._forward_pre_hooks.items()):    # by identity: a deep copy's hook has its own key
        if hook is _check_base_dtype:
            del net._forward_pre_hooks[k]
            net._forward_pre_hooks_with_kwargs.pop(k, None)
    net.lora = None
    return net.to(dtype).requires_grad_(True)


def merge_lora_state_dict(base_sd, adapter_sd, rank, alpha):
    """State-dict form of merge_lora: base weights + an adapter's tensors (factors and fully trained heads, keys
    as lora_state_dict) -> a plain state dict. Merged weights are float32; heads replace the base's."""
    scale = alpha / rank
    out = dict(base_sd)
    for k, v in adapter_sd.items():
        if k.endswith(".lora_A"):
            layer = k[: -len(".lora_A")]
            if layer + ".weight" not in base_sd or layer + ".lora_B" not in adapter_sd:
                raise KeyError(f"LoRA factor {k}: the base has no {layer}.weight or the adapter no {layer}.lora_B")
            out[layer + ".weight"] = base_sd[layer + ".weight"].float() + lora_delta(v, adapter_sd[layer + ".lora_B"], scale)
        elif not k.endswith(".lora_B"):
            out[k] = v
    return out


def check_config(c):
    """LoRA settings that cannot work, as one line before any work (c: train.py's config)."""
    bad = lambda key, problem: UserError(f"--{key}={c[key]!r}", problem)  # noqa: E731
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
        # with an all-zero text the query side never reaches the loss (train.zero_gradient_params): DDP would stop
        # on parameters without a gradient, and the factors of the rest would only learn a constant
        raise bad("lora_targets", f"{cross[0]}: cross-attention sees an all-zero text here (no text_embedding); "
                                  "drop the cross_attn targets")


def fingerprint(path):
    """'sha256:<hex>' over the size and the first, middle and last MiB of a weights file (of .metadata and every
    shard, sorted, for a DCP checkpoint directory): 3 MiB read per file, whatever its size; the mtime is not used,
    so copies match. A .pt (zip) file ends with a CRC-32 of every entry, so any change to any tensor shows; a
    .safetensors file has no checksum, but other training changes nearly every tensor, and the sizes, the key list
    and dtypes (its header, in the first MiB) are covered too."""
    import hashlib
    from pathlib import Path
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    if p.is_dir():
        files = [f for f in files if f.name == ".metadata" or f.suffix == ".distcp"]
    h, mib = hashlib.sha256(), 2 ** 20
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name if p.is_dir() else ''}:{size}:".encode())
        with open(f, "rb") as fh:
            for start in sorted({0, max(0, size // 2 - mib // 2), max(0, size - mib)}):
                fh.seek(start)
                h.update(fh.read(mib))
    return "sha256:" + h.hexdigest()


def record(net, base, base_ema=True):
    """What a LoRA checkpoint's config.json holds under "lora": lora_config(net) plus the base weights' path, which
    of their weights (EMA or regular) and fingerprint (base: a weights file or DCP folder, already resolved)."""
    return {**lora_config(net), "base": str(base), "base_ema": bool(base_ema), "base_fingerprint": fingerprint(base)}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def apply(net, c, base):
    """LoRA from the config onto a loaded net (before DDP / FSDP / compile: they must see the factors), and the
    record the checkpoints keep: the base's path and fingerprint (base: init_from resolved; None on meta)."""
    targets = list(c["lora_targets"]) or default_lora_targets(text=bool(c["text_embedding"]))
    try:
        apply_lora(net, c["lora_rank"], c["lora_alpha"] or None, targets, base_dtype=DTYPES[c["base_dtype"]],
                   seed=c["seed"])
    except ValueError as e:       # a target naming nothing, or one inside a fully trained head
        raise UserError(f"--lora_targets={c['lora_targets']!r}", str(e)) from None
    if base is not None:
        net.lora_base = record(net, base, c["init_ema"])


def enabled(net):
    return bool(getattr(model.unwrap(net), "lora", None))


def run_config(net):
    """What config.json["lora"] records (None without LoRA)."""
    return getattr(model.unwrap(net), "lora_base", None)


def check_resume(path, net):
    """A LoRA checkpoint resumes only onto the very base and LoRA layout it was trained with (its factors are
    fitted to those weights); a full checkpoint only without LoRA, and the other way round."""
    saved = json.load(open(os.path.join(path, "config.json"))).get("lora")
    now = run_config(net)
    if (saved is None) != (now is None):
        raise UserError(path, f"{'a LoRA' if saved else 'a full fine-tuning'} checkpoint, but lora_rank="
                              f"{now['rank'] if now else 0} now: resume with the run's settings or use another out_dir")
    if saved is None:
        return
    if saved["base_fingerprint"] != now["base_fingerprint"]:
        raise UserError(path, f"its LoRA base {saved['base']} is not the file init_from={now['base']} names now "
                              f"(fingerprint {now['base_fingerprint'][:19]} != {saved['base_fingerprint'][:19]}): "
                              "LoRA factors only fit their exact base weights")
    for k in ("rank", "alpha", "targets", "train_full", "base_ema"):
        if saved[k] != now[k]:
            raise UserError(path, f"trained with LoRA {k} {saved[k]!r}, configured {now[k]!r} now")


def describe(net, init_from=""):
    """The start-up summary's LoRA line ("" without LoRA)."""
    lora = getattr(net, "lora", None)
    if not lora:
        return ""
    n_fac = sum(p.numel() for n, p in net.named_parameters() if n.endswith((".lora_A", ".lora_B")))
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(1 for p in net.parameters() if not p.requires_grad)
    return (f"LoRA rank {lora['rank']} alpha {lora['alpha']:g} on {', '.join(lora['targets'])}: {n_fac / 1e6:.2f}M "
            f"factors + {(n_train - n_fac) / 1e6:.2f}M in full ({', '.join(lora['train_full'])}) | frozen base "
            f"{lora['base_dtype']} ({frozen} tensors) from {init_from}")
