"""opcount: count FLOPs, memory-bound bytes/kernels, saved activations and host syncs
of a training step with TorchDispatchMode, and turn them into a roofline step-time estimate.
Works on meta tensors, so a 2B model is counted on a CPU in seconds."""
import copy
from collections import defaultdict
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Pure view/metadata ops and allocations launch no kernel and move no bytes.
VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "slice",
            "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "as_strided", "detach",
            "alias", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
            "unbind", "chunk", "_reshape_alias"}
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm"}
# ops CUDA autocast runs in float32 (aten/src/ATen/autocast_mode.cpp, the fp32 list; those this DiT uses). In the
# backward only the recomputed forward's layer norms (checkpointing replays autocast); backward ops run as recorded
AUTOCAST_FP32 = {"native_layer_norm", "pow", "sum", "softmax", "_softmax", "log_softmax", "exp", "rsqrt", "mse_loss"}
ATTN_OPS = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_attention_math"}


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _gemm_flops(name, args, out):
    # 2*M*N*K: the output has M*N (times batch) elements, each a K-long dot product.
    a = args[1] if name in ("addmm", "baddbmm") else args[0]
    return 2 * out.numel() * a.shape[-1]


def _attn_flops(args):
    # QK^T and PV: 2 GEMMs of 2*B*H*Lq*Lk*D each.
    q, k = args[0], args[1]
    B, H, Lq, D = q.shape
    return 4 * B * H * Lq * k.shape[-2] * D


# F.scaled_dot_product_attention and F.rms_norm are one fused kernel each way on CUDA (flash / cuDNN attention,
# _fused_rms_norm and its backward) but decompose on CPU and meta. While an OpCounter is active they are replaced by
# module attributes (not a function mode, so that activation checkpointing's recomputation in backward takes the
# same path) that count one kernel each way. Counting only: their backward returns empty gradients.
_ACTIVE = []   # the OpCounter in use (the backward pass runs under its own counter)
_ORIGINAL = {"scaled_dot_product_attention": F.scaled_dot_product_attention, "rms_norm": F.rms_norm}


def _counting():
    return bool(_ACTIVE) and not _ACTIVE[-1].paused


def _run_paused(fn, *args, **kwargs):
    counter = _ACTIVE[-1]
    counter.paused = True
    try:
        return fn(*args, **kwargs)
    finally:
        counter.paused = False


class _FlashAttention(torch.autograd.Function):
    """Attention FLOPs, one launch each way, and only q, k, v, out saved (not the L x L scores)."""

    @staticmethod
    def forward(ctx, q, k, v, kwargs):
        out = _run_paused(_ORIGINAL["scaled_dot_product_attention"], q, k, v, **kwargs)
        ctx.save_for_backward(q, k, v, out)
        _ACTIVE[-1].count_kernel("flash_attention", flops=_attn_flops((q, k)))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _ = ctx.saved_tensors
        _ACTIVE[-1].count_kernel("flash_attention_backward", flops=int(2.5 * _attn_flops((q, k))))  # P + 4 GEMMs
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


class _FusedRMSNorm(torch.autograd.Function):
    """One kernel reading x and the weight and writing y; backward one kernel reading grad, x, the weight and
    writing both gradients. Saves x (and the per-row rstd, negligible)."""

    @staticmethod
    def forward(ctx, x, shape, weight, eps):
        out = _run_paused(_ORIGINAL["rms_norm"], x, shape, weight, eps)
        ctx.save_for_backward(x, weight)
        _ACTIVE[-1].count_kernel("fused_rms_norm", nbytes=_nbytes([x, weight, out]))
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        _ACTIVE[-1].count_kernel("fused_rms_norm_backward", nbytes=_nbytes([grad, x, weight]) * 2 - _nbytes([grad]))
        return torch.empty_like(x), None, None if weight is None else torch.empty_like(weight), None


def _counted_sdpa(q, k, v, **kwargs):
    return _FlashAttention.apply(q, k, v, kwargs) if _counting() else _ORIGINAL["scaled_dot_product_attention"](
        q, k, v, **kwargs)


def _counted_rms_norm(x, normalized_shape, weight=None, eps=None):
    if not _counting():
        return _ORIGINAL["rms_norm"](x, normalized_shape, weight, eps)
    return _FusedRMSNorm.apply(x, tuple(normalized_shape), weight, eps)


_COUNTED = {"scaled_dot_product_attention": _counted_sdpa, "rms_norm": _counted_rms_norm}


class OpCounter(TorchDispatchMode):
    """Counts GEMM / attention FLOPs and the bytes and launches of the memory-bound ops. With a Fusion, the
    memory-bound ops are handed to it instead (compiled code: see Fusion) and F.rms_norm decomposes as under
    inductor."""

    def __init__(self, fusion=None, autocast=None, backward=False):
        super().__init__()
        self.paused = False
        self.fusion = fusion
        self.autocast = autocast             # None, or the dtype of a CUDA autocast region to emulate
        self.fp32_ops = {"native_layer_norm"} if backward else AUTOCAST_FP32
        self.flops = defaultdict(int)        # kind -> FLOPs
        self.bytes = 0                       # memory-bound bytes moved
        self.kernels = 0                     # memory-bound kernel launches
        self.table = defaultdict(lambda: [0, 0, 0])  # op -> [calls, flops, bytes]

    def __enter__(self):
        _ACTIVE.append(self)
        for name, fn in _COUNTED.items():
            if not (self.fusion and name == "rms_norm"):
                setattr(F, name, fn)
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        _ACTIVE.remove(self)
        if not _ACTIVE:
            for name, fn in _ORIGINAL.items():
                setattr(F, name, fn)

    def count_kernel(self, name, flops=0, nbytes=0):
        """One fused kernel: attention FLOPs, or memory-bound bytes."""
        if self.fusion is not None:    # a kernel inductor does not generate: it splits the fused runs
            self.fusion.ops.append((self, name, "barrier", [], []))
        self.flops["attention"] += flops
        self.bytes += nbytes
        self.kernels += 1
        row = self.table[name]
        row[0] += 1
        row[1] += flops
        row[2] += nbytes

    def memory_op(self, name, args, out):
        """A memory-bound kernel: its bytes read and written (or handed to the Fusion)."""
        self.table[name][0] += 1
        if self.fusion is not None:
            return self.fusion.record(self, name, False, args, out)
        b = _nbytes(_tensors(args)) + _nbytes(_tensors(out))
        self.bytes += b
        self.kernels += 1
        self.table[name][2] += b

    def autocast_args(self, args, dtype):
        """CUDA autocast on meta tensors (which autocast does not see): floating inputs cast to dtype, each cast
        one memory-bound kernel (autocast does the same casts before the op)."""
        def cast(t):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
                return t
            c = t.to(dtype)
            self.memory_op("_to_copy", [t], c)
            return c
        return [cast(t) for t in args] if isinstance(args, (list, tuple)) else args

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        base = name[:-len("_backward")] if name.endswith("_backward") else name
        if self.autocast and not self.paused and (base in GEMM_OPS or base in ATTN_OPS):
            args = self.autocast_args(args, self.autocast)          # CUDA autocast's bf16 ops
        elif self.autocast and not self.paused and name in self.fp32_ops:
            args = self.autocast_args(args, torch.float32)          # and its fp32 ones
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        if name not in VIEW_OPS and base not in GEMM_OPS and base not in ATTN_OPS:
            self.memory_op(name, args, out)
            return out
        row = self.table[name]
        row[0] += 1
        if self.fusion is not None and (base in GEMM_OPS or base in ATTN_OPS):
            self.fusion.record(self, name, True, args, out)
        if base in GEMM_OPS:
            f = _gemm_flops(base, args, _tensors(out)[0])
            self.flops["gemm"] += f
            row[1] += f
        elif base in ATTN_OPS:
            # backward recomputes P and does 4 GEMMs: ~2.5x the forward
            bwd = base != name  # backward args start with grad_out, then q, k
            f = int(_attn_flops(args[1:] if bwd else args) * (2.5 if bwd else 1))
            self.flops["attention"] += f
            row[1] += f
        elif self.fusion is not None:     # a view: it keeps the run it is in going
            self.fusion.record(self, name, False, args, out)
        return out


def _storage_key(t):
    # Meta tensors have no data_ptr; the untyped storage object identifies shared storage.
    try:
        return id(t.untyped_storage()) if t.is_meta else t.untyped_storage().data_ptr()
    except Exception:
        return id(t)


def saved_bytes(fn, params=()):
    """Bytes autograd saves for backward during fn(): (activation_bytes, param_bytes, result)."""
    pkeys = {_storage_key(p) for p in params}
    seen = {}
    keep = []  # hold tensors so ids stay unique for the duration

    def pack(t):
        keep.append(t)
        k = _storage_key(t)
        if k not in seen:
            try:
                seen[k] = t.untyped_storage().nbytes()
            except Exception:
                seen[k] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    act = sum(b for k, b in seen.items() if k not in pkeys)
    par = sum(b for k, b in seen.items() if k in pkeys)
    return act, par, out


class SyncCounter(TorchDispatchMode):
    """Counts ops that force the host to wait for the device."""
    SYNC = {"_local_scalar_dense", "nonzero", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.count, self.ops = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        sync = name in self.SYNC
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = _tensors(out)[0]
            sync = dst.device.type == "cpu" and src.device.type != "cpu"
        if sync:
            self.count += 1
            self.ops.append(name)
        return out


# Dense bf16 tensor-core FLOP/s (no sparsity) and memory bandwidth, from NVIDIA datasheets
# (H100/H200 datasheet, A100 datasheet, L40S datasheet, Ada RTX 4090 whitepaper).
GPUS = {"H100 SXM": (989e12, 3.35e12), "H100 PCIe": (756e12, 2.0e12), "H200": (989e12, 4.8e12),
        "A100 80GB": (312e12, 2.0e12), "L40S": (362e12, 0.864e12), "RTX 4090": (165e12, 1.0e12)}


def roofline(counts, gpu="H100 SXM", gemm_eff=0.7, attn_eff=0.5, bw_eff=0.8, launch_s=5e-6):
    """Serial roofline: each part at its own efficiency, plus one launch per kernel."""
    peak, bw = GPUS[gpu]
    t = {"gemm": counts["flops"].get("gemm", 0) / (peak * gemm_eff),
         "attention": counts["flops"].get("attention", 0) / (peak * attn_eff),
         "memory": counts["bytes"] / (bw * bw_eff),
         "launch": counts["kernels"] * launch_s}
    t["total"] = sum(t.values())
    flops = sum(counts["flops"].values())
    t["mfu"] = flops / (t["total"] * peak) if t["total"] else 0.0
    return t


def _snapshot(c):
    return {"flops": dict(c.flops), "bytes": c.bytes, "kernels": c.kernels, "table": dict(c.table)}


class Fusion:
    """A model of what torch.compile's inductor does to the memory-bound ops: every run of them between two
    kernels it does not generate (GEMMs and attention, which stay cuBLAS / flash calls) becomes one generated
    kernel per reduction in it (at least one), reading each tensor that comes from outside the run once and
    writing only what is used after it (by a later op, the backward, or nobody: results such as gradients).
    An estimate of compiled code, counted on the eager op sequence; the saved-for-backward bytes stay eager's."""
    REDUCTIONS = {"sum", "mean", "native_layer_norm", "native_layer_norm_backward", "amax", "var_mean", "norm",
                  "_fused_rms_norm", "_fused_rms_norm_backward", "_softmax", "_softmax_backward_data"}

    def __init__(self):
        self.ops = []       # (counter, name, kind, [(storage key, bytes) read], [(key, bytes) written])
        self.keep = []      # the traced tensors, alive so that storage keys stay unique

    def record(self, counter, name, barrier, args, out):
        ins, outs = _tensors(args), _tensors(out)
        self.keep += ins + outs
        kind = "barrier" if barrier else "view" if name in VIEW_OPS else "fused"
        self.ops.append((counter, name, kind, [(_storage_key(t), _nbytes([t])) for t in ins],
                         [(_storage_key(t), _nbytes([t])) for t in outs]))

    def apply(self):
        """Adds each group's bytes and kernels to the counter it ran under."""
        group, groups, prev = [], [], None
        for i, (counter, _, kind, _, _) in enumerate(self.ops):      # runs of fusable ops, views inside them
            if kind == "barrier" or counter is not prev:
                group = []
            if kind == "fused" or (kind == "view" and group):
                if not group:
                    groups.append(group)
                group.append(i)
            prev = counter
        owner = {i: g for g, idx in enumerate(groups) for i in idx}
        last_use = defaultdict(lambda: -1)                               # storage -> last op (group) reading it
        for i, (_, _, _, ins, _) in enumerate(self.ops):
            for k, _ in ins:
                last_use[k] = i
        for g, idx in enumerate(groups):
            made, read, written = set(), {}, {}
            for i in (i for i in idx if self.ops[i][2] == "fused"):     # (views move nothing)
                for k, b in self.ops[i][3]:
                    if k not in made:
                        read[k] = max(read.get(k, 0), b)
                for k, b in self.ops[i][4]:
                    made.add(k)
                    if last_use[k] < 0 or owner.get(last_use[k]) != g:
                        written[k] = b
            counter = self.ops[idx[0]][0]
            n = max(1, sum(self.ops[i][1] in self.REDUCTIONS for i in idx))
            counter.bytes += sum(read.values()) + sum(written.values())
            counter.kernels += n
            row = counter.table["fused (compiled)"]
            row[0] += n
            row[2] += sum(read.values()) + sum(written.values())


def count_step(net, inputs_kwargs, loss_fn=None, compiled=False, autocast=None):
    """Forward and backward of net(**inputs_kwargs), counted separately, plus saved bytes; compiled: the
    memory-bound ops priced as inductor would fuse them (Fusion); autocast: the dtype of CUDA autocast."""
    loss_fn = loss_fn or (lambda out: out.float().sum())
    params = list(net.parameters())
    fusion = Fusion() if compiled else None
    with OpCounter(fusion, autocast) as fwd:
        act, par, out = saved_bytes(lambda: net(**inputs_kwargs), params)
        loss = loss_fn(out)
    with OpCounter(fusion, autocast, backward=True) as bwd:
        loss.backward()
    if fusion:
        fusion.apply()
    return {"forward": _snapshot(fwd), "backward": _snapshot(bwd),
            "saved_act_bytes": act, "saved_param_bytes": par}


def _merge(a, b):
    kinds = set(a["flops"]) | set(b["flops"])
    return {"flops": {k: a["flops"].get(k, 0) + b["flops"].get(k, 0) for k in kinds},
            "bytes": a["bytes"] + b["bytes"], "kernels": a["kernels"] + b["kernels"]}


def report(result, gpu="H100 SXM", say=print):
    step = _merge(result["forward"], result["backward"])
    say(f"{'part':10s} {'gemm TF':>9s} {'attn TF':>9s} {'mem GB':>9s} {'kernels':>8s} {'est ms':>8s}")
    for part, c in (("forward", result["forward"]), ("backward", result["backward"]), ("step", step)):
        r = roofline(c, gpu)
        say(f"{part:10s} {c['flops'].get('gemm', 0) / 1e12:9.2f} {c['flops'].get('attention', 0) / 1e12:9.2f} "
            f"{c['bytes'] / 1e9:9.1f} {c['kernels']:8d} {r['total'] * 1e3:8.1f}")
    r = roofline(step, gpu)
    say(f"saved activations {result['saved_act_bytes'] / 2**30:.2f} GiB (+ params {result['saved_param_bytes'] / 2**30:.2f} GiB)")
    say(f"{gpu}: gemm {r['gemm']*1e3:.1f} ms, attention {r['attention']*1e3:.1f} ms, memory {r['memory']*1e3:.1f} ms, "
        f"launch {r['launch']*1e3:.1f} ms -> step {r['total']*1e3:.1f} ms, MFU {r['mfu']:.1%}")
    return r


def meta_copy(module, dtype=None):
    """module rebuilt on the meta device (same structure, LoRA layers, requires_grad flags), copying no data."""
    memo = {}
    for t in [*module.parameters(), *module.buffers()]:
        m = torch.empty(t.shape, dtype=dtype or t.dtype, device="meta")
        memo[id(t)] = torch.nn.Parameter(m, t.requires_grad) if isinstance(t, torch.nn.Parameter) else m
    return copy.deepcopy(module, memo)


def meta_step(raw, V, T, t, h, w, batch=1, checkpointing=False, dtype=torch.bfloat16):
    """A meta copy of the DiT `raw` in `dtype` (bf16: the compute weights under FSDP2) and its inputs at a run's
    shapes: V views of T pixel frames, t x h x w latents per view (stacked on t), the action input of its config."""
    cfg = raw.cfg
    net = meta_copy(raw, dtype)
    net.gradient_checkpointing = checkpointing
    with torch.device("meta"):
        kw = dict(x_B_C_T_H_W=torch.randn(batch, cfg.in_channels, V * t, h, w, dtype=dtype),
                  timesteps_B_T=torch.rand(batch, 1), num_views=V)
        if cfg.action_mode != "none":
            kw["action"] = torch.randn(batch, T - 1, cfg.action_dim)
    return net, kw


def count_run(raw, V, T, t, h, w, batch=1, checkpointing=False, compiled=False):
    """count_step of the DiT `raw` (any device: it is counted on a meta copy) at a run's shapes, as a CUDA run
    computes it: FSDP2's bf16 weights under bf16 autocast."""
    return count_step(*meta_step(raw, V, T, t, h, w, batch, checkpointing), compiled=compiled,
                      autocast=torch.bfloat16)


def saved_activations(raw, V, T, t, h, w, checkpointing=False, dtype=torch.bfloat16):
    """(activation bytes, parameter bytes) autograd keeps for backward in one sample's forward, attention counted as
    the fused kernel it is on CUDA; a meta forward, well under a second for the 2B model."""
    net, kw = meta_step(raw, V, T, t, h, w, 1, checkpointing, dtype)
    with OpCounter(autocast=dtype if dtype != torch.float32 else None):
        act, par, _ = saved_bytes(lambda: net(**kw), list(net.parameters()))
    return act, par
