"""train.py under FSDP2 on CPU (gloo, 2 processes): bf16 numerics equal the single-process bf16 autocast ones
(RoPE and the time embedding stay fp32 inside the blocks), and validation shares its batches out over ranks.

The test functions launch this file as a script under torch.distributed.run; the script part runs one check
per process and rank 0 writes the result as JSON."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(check, out, nproc=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={port}", __file__, check, str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(Path(out).read_text())


# ---- the checks, run inside each process ---------------------------------------------------------------------

def tiny_net(model, torch):
    cfg = model.DiTConfig(model_channels=64, num_blocks=2, num_heads=2, adaln_lora_dim=16, crossattn_emb_channels=32,
                          in_channels=12, out_channels=12, action_mode="per_frame", action_dim=7, num_actions=12,
                          n_views_emb=7, crossattn_proj_in_channels=16, timestep_scale=0.001)
    torch.manual_seed(0)
    net = model.DiT(cfg)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():          # every weight matters (no zero adaLN outputs or heads)
            p.normal_(0, 0.2 if p.ndim > 1 else 1.0)
            p.copy_(p.bfloat16().float())   # bf16-exact masters: FSDP's bf16 weights then equal autocast's casts
    return net


def check_fsdp_forward(out):
    import torch
    import torch.distributed as dist
    import model
    import train
    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 8, 8, 10, generator=g)                  # 2 views x 4 latent frames
    t = torch.rand(2, generator=g) * 1000                          # Predict2.5 nets take 1000 t
    action = torch.randn(2, 12, 7, generator=g)
    mask = model.condition_mask(2, 2, 4, 8, 10, 1)
    kw = dict(action=action, num_views=2, fps=torch.full((2,), 4.0))
    net = tiny_net(model, torch)
    with torch.no_grad():
        want32 = net(x, t, None, mask, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want16 = net(x, t, None, mask, **kw).float()
    env = train.Env(True, dist.get_rank(), dist.get_world_size(), torch.device("cpu"), True, True)
    c = {"hsdp_replicas": 1, "compile": ""}
    train.parallelize(net, c, env)
    seen = {}
    net.blocks[0].register_forward_pre_hook(      # after FSDP's own hook: what the block really receives
        lambda m, args: seen.update(x=str(args[0].dtype), emb=str(args[1].dtype), lora=str(args[2].dtype),
                                    rope=str(args[3][0].dtype)))     # the cos table
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = net(x, t, None, mask, **kw).float()
    scale = want32.abs().mean().item()
    res = {"fsdp_vs_autocast": (got - want16).abs().max().item() / scale,
           "autocast_vs_fp32": (want16 - want32).abs().max().item() / scale, "dtypes": seen}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def check_val_sharding(out):
    """evaluate() under FSDP with 2 ranks and 3 batches: the same losses as one process, each batch once."""
    import torch
    import torch.distributed as dist
    import data
    import model
    import synth
    import train
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(out).parent / "data"
    if rank == 0:
        synth.make_synthetic(str(root), episodes=4, cameras=2, frames=13, size=(32, 48), seed=0, val_episodes=3)
    dist.barrier()
    c = {k: getattr(train, k) for k in train._CONFIG_KEYS}
    c.update(model_channels=32, num_blocks=2, num_heads=2, batch_size=1, eval_batches=3, frame_size=(32, 48))
    val = data.RobotVideoDataset(root, "val", num_frames=13, cameras=(0, 1), size=(32, 48), start_stride=12)
    import vae
    tok = vae.load_tokenizer("pixel", None, spatial_factor=8)
    shapes = train.Shapes(2, 13, 32, 48, 4, 4, 6)
    cfg = train.model_config(c, 12)
    one = train.build_model(c, cfg, torch.device("cpu"), say=lambda *a: None)
    with torch.no_grad():
        for p in one.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    single = train.Env(False, 0, 1, torch.device("cpu"), False, False)
    want = train.evaluate(one, one, tok, torch.float32, val, c, shapes, single)
    batches = [i for i, w, _ in train.val_batches(val, c, rank, world) if w]
    env = train.Env(True, rank, world, torch.device("cpu"), False, False)
    train.parallelize(one, c, env)
    got = train.evaluate(one, one, tok, torch.float32, val, c, shapes, env)
    all_batches = [None] * world
    dist.all_gather_object(all_batches, batches)
    if rank == 0:
        Path(out).write_text(json.dumps({"want": want, "got": got, "batches": all_batches}))
    dist.destroy_process_group()


def check_compile_blocks(out):
    """compile="blocks" (inductor, each block compiled alone) with per-block checkpointing under FSDP2 on 2 ranks:
    the loss and the gradient norm of one step against the same net run eagerly in one process."""
    import copy
    import torch
    import torch.distributed as dist
    import torch._dynamo
    import model
    import train
    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(1)
    x0, action = torch.randn(2, 12, 8, 8, 10, generator=g), torch.randn(2, 12, 7, generator=g)
    net = tiny_net(model, torch)
    net.gradient_checkpointing = True
    eager = copy.deepcopy(net)

    def step(n):
        loss, _, _ = model.diffusion_loss(n, x0, {"action": action}, 2, torch.Generator().manual_seed(2),
                                          **train.loss_settings({k: getattr(train, k) for k in train._CONFIG_KEYS}))
        loss.backward()
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in n.parameters()
                 if p.grad is not None]
        return loss.item(), torch.cat([gr.flatten() for gr in grads]).norm().item()

    want = step(eager)
    env = train.Env(True, dist.get_rank(), dist.get_world_size(), torch.device("cpu"), False, True)
    train.parallelize(net, {"hsdp_replicas": 1, "compile": "blocks"}, env)
    got = step(net)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"want": want, "got": got,
                                         "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}))
    dist.destroy_process_group()


# ---- the tests ------------------------------------------------------------------------------------------------

def test_fsdp_bf16_forward_matches_single_process_autocast(tmp_path):
    r = launch("fsdp_forward", tmp_path / "r.json")
    # the RoPE angles and the time embedding reach the block in fp32 (FSDP's input cast would make them bf16)
    assert r["dtypes"]["rope"] == "torch.float32" and r["dtypes"]["emb"] == "torch.float32", r
    # bf16 weights under FSDP vs autocast's bf16 casts of the same (bf16-exact) fp32 weights: the same maths.
    # Measured (2-core CPU, max error / mean |output|): 0.0 now; 0.047 with FSDP's input cast (the code before),
    # about the whole bf16-vs-fp32 gap (0.052)
    assert r["fsdp_vs_autocast"] <= 0.1 * r["autocast_vs_fp32"], r
    print(json.dumps(r))


def test_fsdp_validation_shares_batches_over_ranks(tmp_path):
    r = launch("val_sharding", tmp_path / "r.json")
    assert sorted(sum(r["batches"], [])) == [0, 1, 2] and r["batches"][0] == [0, 2] and r["batches"][1] == [1]
    for k in ("val_loss", "val_loss_shuffled"):
        assert abs(r["got"][k] - r["want"][k]) < 1e-5 * abs(r["want"][k]), r


def test_compile_blocks_under_fsdp_with_checkpointing_equals_eager(tmp_path):
    """Inductor's C++ build of the block: ~30 s on 2 cores. Measured: the same loss, the gradient norm within 1e-7
    relative (fp32; the bound is 1e-4), 1 graph for the 2 blocks; printed."""
    r = launch("compile_blocks", tmp_path / "r.json")
    print(f"compile='blocks' under FSDP2 + checkpointing: {r}")
    for want, got in zip(r["want"], r["got"]):
        assert abs(got - want) <= 1e-4 * abs(want), r
    assert 1 <= r["graphs"] <= 4, r       # one block graph reused by every block (and its recompiles)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    {"fsdp_forward": check_fsdp_forward, "val_sharding": check_val_sharding,
     "compile_blocks": check_compile_blocks}[sys.argv[1]](sys.argv[2])
