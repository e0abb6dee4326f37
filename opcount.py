"""opcount: count FLOPs, memory-bound bytes/kernels, saved activations and host syncs
of a training step with TorchDispatchMode, and turn them into a roofline step-time estimate.
Works on meta tensors, so a 2B model is counted on a CPU in seconds."""
from collections import defaultdict
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Pure view/metadata ops launch no kernel and move no bytes.
VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "slice",
            "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "as_strided", "detach",
            "alias", "empty", "empty_strided", "lift_fresh", "unbind", "chunk", "_reshape_alias"}
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm"}
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


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.flops = defaultdict(int)        # kind -> FLOPs
        self.bytes = 0                       # memory-bound bytes moved
        self.kernels = 0                     # memory-bound kernel launches
        self.table = defaultdict(lambda: [0, 0, 0])  # op -> [calls, flops, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        base = name[:-len("_backward")] if name.endswith("_backward") else name
        row = self.table[name]
        row[0] += 1
        if base in GEMM_OPS:
            f = _gemm_flops(base, args, _tensors(out)[0])
            self.flops["gemm"] += f
            row[1] += f
        elif base in ATTN_OPS:
            # backward recomputes P and does 4 GEMMs: ~2.5x the forward
            f = int(_attn_flops(args) * (2.5 if base != name else 1))
            self.flops["attention"] += f
            row[1] += f
        elif name not in VIEW_OPS:
            b = _nbytes(_tensors(args)) + _nbytes(_tensors(out))
            self.bytes += b
            self.kernels += 1
            row[2] += b
        return out
