"""opcount: exact GEMM FLOPs, saved bytes real vs meta, host-sync counting, fused vs unfused bytes."""
import torch

import opcount
from model import DiT, DiTConfig


def test_linear_gemm_flops_exact():
    lin, x = torch.nn.Linear(64, 32), torch.randn(8, 64)
    with opcount.OpCounter() as c:
        lin(x)
    assert c.flops["gemm"] == 2 * 8 * 64 * 32


def _tiny_step(device):
    with torch.device(device):
        torch.manual_seed(0)
        net = DiT(DiTConfig(model_channels=64, num_blocks=2, num_heads=4, adaln_lora_dim=16,
                            crossattn_emb_channels=32))
        x, t = torch.randn(1, 16, 2, 8, 8), torch.rand(1, 1)
        ctx = torch.randn(1, 8, 32)
    act, par, out = opcount.saved_bytes(lambda: net(x, t, ctx), list(net.parameters()))
    return act, par


def test_saved_bytes_real_vs_meta():
    real, meta = _tiny_step("cpu")[0], _tiny_step("meta")[0]
    assert real > 0 and abs(real - meta) / real < 0.10, (real, meta)


def test_sync_counter():
    x = torch.randn(4, 4)
    with opcount.SyncCounter() as s:
        x.sum().item()
    assert s.count == 1, s.ops
    with opcount.SyncCounter() as s:
        x @ x
    assert s.count == 0, s.ops


def test_fused_rms_norm_moves_fewer_bytes():
    x, w, eps = torch.randn(16, 256, device="meta"), torch.randn(256, device="meta"), 1e-6
    with opcount.OpCounter() as fused:
        torch.nn.functional.rms_norm(x, (256,), w, eps)
    with opcount.OpCounter() as unfused:
        x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    assert 0 < fused.bytes < unfused.bytes, (fused.bytes, unfused.bytes)


def test_attention_is_one_fused_kernel_with_its_flops():
    """SDPA counts its 4*B*H*L*L*D FLOPs forward (2.5x backward) as attention, saves q, k, v and out only (not the
    L x L scores its CPU decomposition would), and is one launch each way."""
    B, H, L, D = 2, 4, 256, 32
    q, k, v = (torch.randn(B, H, L, D, device="meta", requires_grad=True) for _ in range(3))
    with opcount.OpCounter() as fwd:
        act, _, out = opcount.saved_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with opcount.OpCounter() as bwd:
        out.sum().backward()
    assert fwd.flops["attention"] == 4 * B * H * L * L * D and fwd.flops["gemm"] == 0
    assert bwd.flops["attention"] == int(2.5 * 4 * B * H * L * L * D)
    assert fwd.table["flash_attention"][0] == 1 and act == 4 * B * H * L * D * 4
    assert q.grad.shape == q.shape


def test_plan_activations_are_what_a_real_cpu_run_saves():
    """The memory plan's activation figure (opcount.saved_activations: a meta copy of the net, attention as the
    fused kernel) is what autograd really keeps on a CPU forward of the same net and shapes, within 10%, with and
    without per-block checkpointing (CPU SDPA is a flash kernel too: it keeps q, k, v, out, logsumexp)."""
    torch.manual_seed(0)
    net = DiT(DiTConfig(model_channels=64, num_blocks=3, num_heads=4, adaln_lora_dim=16, crossattn_emb_channels=32,
                        in_channels=16, out_channels=16, n_views_emb=7, action_mode="per_frame", action_dim=7))
    for ck in (False, True):
        counted, _ = opcount.saved_activations(net, 2, 9, 3, 8, 10, ck, torch.float32)
        _, kw = opcount.meta_step(net, 2, 9, 3, 8, 10, 1, ck, torch.float32)
        kw = {k: torch.randn(v.shape) if torch.is_tensor(v) else v for k, v in kw.items()}
        net.gradient_checkpointing = ck
        real, _, _ = opcount.saved_bytes(lambda: net(**kw), list(net.parameters()))
        assert abs(counted - real) / real < 0.10, (ck, counted, real)


def test_fusion_model_one_kernel_per_run_of_pointwise_ops():
    """compile's estimate (opcount.Fusion): a run of pointwise ops between GEMMs is one kernel reading its outside
    inputs once and writing only what is used after it; a GEMM splits the runs."""
    x, w = torch.randn(64, 256, device="meta"), torch.randn(256, 256, device="meta")
    with opcount.OpCounter() as eager:
        y = ((x * 2 + 1).relu() * 3) @ w
        z = (y + 1).sigmoid()
    fusion = opcount.Fusion()
    with opcount.OpCounter(fusion) as fused:
        y = ((x * 2 + 1).relu() * 3) @ w
        z = (y + 1).sigmoid()
    fusion.apply()
    n = 64 * 256 * 4
    assert eager.kernels == 6 and eager.bytes == 12 * n
    assert fused.kernels == 2 and fused.bytes == 4 * n        # (read x, write the GEMM input), (read y, write z)
    assert fused.flops["gemm"] == eager.flops["gemm"] > 0 and z.shape == (64, 256)


def test_autocast_emulation_runs_gemms_in_bf16():
    """On meta, CUDA autocast does not act: the counter emulates it (the GEMM's fp32 input cast to bf16, one cast
    kernel; layer norm in fp32), as a bf16 CUDA run computes, and as CPU autocast does for the GEMM."""
    x, w = torch.randn(64, 256, device="meta"), torch.randn(256, 256, device="meta", dtype=torch.bfloat16)
    with opcount.OpCounter(autocast=torch.bfloat16) as c:
        y = x @ w
        ln = torch.nn.functional.layer_norm(y, (256,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = torch.randn(64, 256) @ torch.randn(256, 256, dtype=torch.bfloat16)
    assert y.dtype == real.dtype == torch.bfloat16 and ln.dtype == torch.float32
    assert c.table["_to_copy"][0] == 2                        # x to bf16 for the GEMM, y to fp32 for the norm
