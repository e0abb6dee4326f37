"""LoRA (lora.apply_lora / merge_lora, convert's LoRA checkpoints and adapters): step 0 is the base model bit for bit,
merged equals unmerged, only the factors and the new heads train (also under activation checkpointing,
torch.compile, bf16 autocast, DDP and FSDP2 with 2 gloo processes), and an adapter only loads onto its own base."""

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import lora
import model
from test_model import tiny


def lora_tiny(**lora_kw):
    """A tiny grown-style net (per-frame actions, views, crossattn_proj) and its LoRA twin (same weights)."""
    base = tiny(action_mode="per_frame", n_views_emb=7, crossattn_proj_in_channels=48)
    return base, lora.apply_lora(copy.deepcopy(base), rank=4, **lora_kw)


def inputs(views=2, T=3, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x_B_C_T_H_W=torch.randn(B, 16, views * T, 8, 8, generator=g),
                timesteps_B_T=torch.rand(B, generator=g),
                condition_video_input_mask_B_C_T_H_W=model.condition_mask(B, views, T, 8, 8, 1),
                action=torch.randn(B, (T - 1) * 4, 7, generator=g), num_views=views)


def randomise_factors(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith(".lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_step0_is_the_base_model_bit_for_bit_and_keys_stay_official():
    base, net = lora_tiny()
    with torch.no_grad():
        assert torch.equal(net(**inputs()), base(**inputs()))
    sd, base_sd = net.state_dict(), base.state_dict()
    extra = {k for k in sd if k not in base_sd}
    assert set(base_sd) <= set(sd) and extra and all(k.endswith((".lora_A", ".lora_B")) for k in extra)
    # the default targets: self-attention q/k/v/out and the MLP of every block, no cross-attention
    layers = {k.rsplit(".", 1)[0] for k in extra}
    assert len(layers) == 2 * 6 and not any("cross_attn" in k for k in layers)
    # official weights load into a LoRA net unchanged: only the factors are missing
    fresh = lora.apply_lora(copy.deepcopy(base), rank=4)
    missing, unexpected = fresh.load_state_dict(base_sd, strict=False)
    assert set(missing) == extra and not unexpected
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"x_embedder", "view_embeddings", "action_embedder_B_D", "action_embedder_B_3D"}
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_bf16_base_under_autocast_is_the_base_model_bit_for_bit():
    base = tiny(action_mode="per_frame", n_views_emb=7, crossattn_proj_in_channels=48)
    with torch.no_grad():
        for p in base.parameters():                       # bf16-representable weights, as the released bf16 files
            p.copy_(p.bfloat16().float())
    net = lora.apply_lora(copy.deepcopy(base), rank=4, base_dtype=torch.bfloat16)
    frozen = [p for p in net.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in net.parameters() if p.requires_grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(net(**inputs()), base(**inputs()))
    with pytest.raises(TypeError, match="bfloat16.*autocast"):
        net(**inputs())
    merged = lora.merge_lora(copy.deepcopy(net))                       # a plain fp32 net again: no check left
    with torch.no_grad():
        assert torch.equal(merged(**inputs()), base(**inputs()))


def test_merged_equals_unmerged_and_state_dict_merge_agrees():
    base, net = lora_tiny(targets=lora.default_lora_targets(text=True), alpha=8)
    randomise_factors(net)
    with torch.no_grad():
        unmerged = net(**inputs())
        assert not torch.allclose(unmerged, base(**inputs()), atol=1e-3)      # the factors do change the output
        adapter = lora.lora_state_dict(net)
        merged = lora.merge_lora(copy.deepcopy(net))
        got = merged(**inputs())
    assert type(merged.blocks[0].self_attn.q_proj) is torch.nn.Linear and merged.state_dict().keys() == base.state_dict().keys()
    err = ((got - unmerged).abs().max() / unmerged.abs().max()).item()
    assert err < 1e-5, err                                                  # fp32 reassociation only (measured 7e-7 to 8.5e-7)
    sd = lora.merge_lora_state_dict(base.state_dict(), adapter, rank=4, alpha=8)
    assert all(torch.equal(sd[k], v) for k, v in merged.state_dict().items())


def test_only_trainable_tensors_change_and_checkpointing_gives_the_same_grads():
    _, net = lora_tiny()
    randomise_factors(net)                          # B != 0, so A gets gradient too
    grads = []
    for ckpt in (False, True):
        net.zero_grad(set_to_none=True)
        net.gradient_checkpointing = ckpt
        net.train()
        net(**inputs()).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    assert all(g.abs().sum() > 0 for k, g in grads[0].items() if k.endswith((".lora_A", ".lora_B")))
    before = copy.deepcopy(net.state_dict())
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        net(**inputs()).square().mean().backward()
        opt.step()
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == set(lora.lora_state_dict(net))


def test_target_errors_and_param_counts():
    base = tiny()
    with pytest.raises(ValueError, match="matches no linear"):
        lora.apply_lora(copy.deepcopy(base), rank=4, targets=["self_attn.qkv"])
    with pytest.raises(ValueError, match="trained in full"):
        lora.apply_lora(copy.deepcopy(base), rank=4, targets=["x_embedder.proj.1"])
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(copy.deepcopy(base), rank=0)
    net = lora.apply_lora(copy.deepcopy(base), rank=4, targets=["blocks.1.*_proj"])       # a glob: block 1, both attentions
    assert {n.rsplit(".", 1)[0] for n in lora.lora_state_dict(net) if "lora" in n} == {
        f"blocks.1.{a}.{p}_proj" for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "output")}
    with pytest.raises(ValueError, match="already"):
        lora.apply_lora(net, rank=4)
    cfg = model.DiTConfig(model_channels=64, num_blocks=2, num_heads=4, adaln_lora_dim=16, crossattn_emb_channels=32,
                          action_mode="per_frame", n_views_emb=7)
    real = lora.apply_lora(model.DiT(cfg), 8)
    n_lora = sum(p.numel() for n, p in real.named_parameters() if n.endswith((".lora_A", ".lora_B")))
    assert all(p.requires_grad == (n.endswith((".lora_A", ".lora_B")) or n.startswith(lora.LORA_TRAIN_FULL))
               for n, p in real.named_parameters())
    assert n_lora == 2 * 8 * (4 * 128 + 2 * 320)


def test_torch_compile_traces_the_lora_net():
    """dynamo + AOT autograd over LoRA layers, the bf16-base check and activation checkpointing (aot_eager: the
    same graphs as inductor without its minute-long C++ build; test_torch_compile_inductor runs the real one)."""
    _, net = lora_tiny()
    randomise_factors(net)
    net.train()
    net.gradient_checkpointing = True
    compiled = torch.compile(net, backend="aot_eager", fullgraph=False)
    got = compiled(**inputs())
    got.square().mean().backward()
    g1 = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad(set_to_none=True)
    want = net(**inputs())
    want.square().mean().backward()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert all(torch.allclose(g1[n], p.grad, rtol=1e-4, atol=1e-6) for n, p in net.named_parameters() if p.requires_grad)


@pytest.mark.slow
def test_torch_compile_inductor_bf16_base():
    _, net = lora_tiny(base_dtype=torch.bfloat16)
    randomise_factors(net)
    net.train()
    net.gradient_checkpointing = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.compile(net)(**inputs())
        want = net(**inputs())
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 0.03   # bf16 rounding


# ---- DDP and FSDP2 (2 gloo processes) ------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_steps(net, fwd, rank=0, world=1, steps=3, bf16=False):
    """SGD steps (Adam would magnify rounding of near-zero gradients into sign flips) on a fixed batch of 4 split
    over the ranks; loss = mean over the global batch."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    per = 4 // world
    for step in range(steps):
        kw = inputs(B=4, seed=step)
        kw = {k: v[rank * per:(rank + 1) * per] if torch.is_tensor(v) else v for k, v in kw.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(**kw).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


CASES = [("ddp", False), ("fsdp", False), ("fsdp", True)]        # (parallel, bf16 base + autocast)


def dist_worker(rank, world, port, out_dir):
    """Every case in one pair of processes (a spawn costs seconds of imports)."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for parallel, bf16 in CASES:
        _, net = lora_tiny(base_dtype=torch.bfloat16 if bf16 else None)
        net.train()
        net.gradient_checkpointing = True
        fwd = net
        if parallel == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
                         else MixedPrecisionPolicy())
            for block in net.blocks:               # as train.py: one shard group per block, then the root
                fully_shard(block, mp_policy=mp_policy)
            fully_shard(net, mp_policy=mp_policy)
        else:
            from torch.nn.parallel import DistributedDataParallel
            fwd = DistributedDataParallel(net)
        train_steps(net, fwd, rank, world, bf16=bf16)
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().clone()
                for k, v in net.state_dict().items()}
        if rank == 0:
            torch.save(full, os.path.join(out_dir, f"{parallel}_{bf16}.pt"))
    dist.barrier()                                 # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


def test_ddp_and_fsdp2_train_the_factors_as_one_process(tmp_path):
    """DDP, FSDP2 (fp32) and FSDP2 with a bf16 base under autocast: the trainable tensors end as one process with
    the whole batch ends them; the frozen base is untouched."""
    mp.spawn(dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for parallel, bf16 in CASES:
        got = torch.load(tmp_path / f"{parallel}_{bf16}.pt")
        _, net = lora_tiny(base_dtype=torch.bfloat16 if bf16 else None)
        net.train()
        with torch.no_grad():
            frozen = {k: v.float().clone() for k, v in net.state_dict().items()}
        trainable = set(lora.lora_state_dict(net))
        train_steps(net, net, bf16=bf16)
        want = net.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            if k in trainable:
                assert not torch.equal(want[k].float(), frozen[k]), k          # it trained (B leaves zero at step 1)
                err = ((got[k] - want[k].float()).norm() / (want[k].float() - frozen[k]).norm()).item()
                assert err < (0.05 if bf16 else 1e-4), (parallel, bf16, k, err)  # relative to what training changed
            else:
                assert torch.equal(got[k], frozen[k]), (parallel, bf16, k)     # frozen base untouched


# ---- checkpoints, export, adapters (convert.py) --------------------------------------------

def lora_run(tmp_path, base_dtype=None, channels=16):
    """What a LoRA run of train.py leaves: a base file (no view embedding: grown on load), and a DCP checkpoint of
    the trainable tensors only (regular and EMA) with the LoRA record in config.json. Returns (unmerged EMA LoRA
    net, checkpoint dir, base path)."""
    import convert
    from test_convert import write_dcp
    base = tiny(action_mode="per_frame", in_channels=channels, out_channels=channels)
    base_path = tmp_path / "base.pt"
    torch.save({"net." + k: v for k, v in base.state_dict().items()}, base_path)
    cfg = model.DiTConfig(**{**model.config_dict(base.cfg), "n_views_emb": 7})
    net = model.DiT(cfg)
    net.init_weights()
    model.load_into(net, base.state_dict(), grow=True)
    lora.apply_lora(net, rank=4, alpha=8, base_dtype=base_dtype)
    randomise_factors(net)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(torch.randn_like(p) * 0.05)                      # the heads trained too
    ema = {k: v.clone() for k, v in lora.lora_state_dict(net).items()}
    regular = {k: v * 1.5 for k, v in ema.items()}                      # differs, so picking the wrong one shows
    ckpt = tmp_path / "out" / "checkpoints" / "iter_000000003"
    ckpt.mkdir(parents=True)
    rc = {"model": model.config_dict(cfg), "train": {"fps": 4}, "step": 3, "world_size": 1,
          "lora": convert.lora_record(net, base_path)}
    write_dcp(ckpt, regular, ema, rc)
    return net.eval(), ckpt, base_path


def test_lora_checkpoint_loads_merged_exports_and_round_trips(tmp_path):
    import convert
    net, ckpt, base_path = lora_run(tmp_path)
    with torch.no_grad():
        want = net(**inputs())
    # load_dit (what sample.py calls) takes the LoRA checkpoint itself: base + EMA factors, merged
    merged, rc = convert.load_dit(ckpt)
    assert rc["lora"]["rank"] == 4 and type(merged.blocks[0].mlp.layer1) is torch.nn.Linear
    with torch.no_grad():
        got = merged(**inputs())
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    # export merges into the official files, which load anywhere (no LoRA record left in their config)
    dest = tmp_path / "release"
    convert.main(["export", str(ckpt), str(dest)])
    fp32, rc32 = convert.load_dit(dest / "model_ema_fp32.pt")
    assert "lora" not in rc32 and rc32["merged_lora"]["base"] == str(base_path)
    assert all(torch.equal(a, b) for a, b in zip(fp32.state_dict().values(), merged.state_dict().values()))
    bf16, _ = convert.load_dit(dest / "model_ema_bf16.pt")
    with torch.no_grad():
        assert ((bf16(**inputs()) - want).abs().max() / want.abs().max()).item() < 0.05
    raw = torch.load(dest / "model.pt", weights_only=True)
    assert not any("lora_" in k for k in raw) and {k.split(".")[0] for k in raw} == {"net", "net_ema"}
    assert not torch.equal(raw["net.blocks.0.mlp.layer1.weight"], raw["net_ema.blocks.0.mlp.layer1.weight"])
    # the adapter alone + the base reproduces the merged model exactly
    convert.main(["export", str(ckpt), str(tmp_path / "adapter.safetensors"), "--lora-only"])
    adapter_net, arc = convert.load_dit(tmp_path / "adapter.safetensors")
    assert arc["lora"] == rc["lora"] and arc["model"] == rc["model"]
    assert all(torch.equal(a, b) for a, b in zip(adapter_net.state_dict().values(), merged.state_dict().values()))
    size = (tmp_path / "adapter.safetensors").stat().st_size
    assert size < 0.5 * base_path.stat().st_size                        # only factors and heads


def test_merged_export_samples_the_frames_of_the_unmerged_net(tmp_path):
    import convert
    import sample
    import vae
    net, ckpt, _ = lora_run(tmp_path, channels=12)                    # the pixel tokenizer's 12 channels
    convert.export(ckpt, tmp_path / "release")
    merged, _ = convert.load_dit(tmp_path / "release" / "model_ema_fp32.pt")
    tok = vae.load_tokenizer("pixel", None, spatial_factor=8)
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 256, (1, 2, 3, 32, 48), generator=g, dtype=torch.uint8)
    actions = torch.randn(1, 12, 7, generator=g)
    with torch.no_grad():
        videos = [sample.rollout(n, tok, first, actions, num_steps=4, progress=False).float() for n in (net, merged)]
    diff = (videos[0] - videos[1]).abs()
    assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())   # fp32 reassociation flips rare roundings


def test_lora_needs_its_own_base(tmp_path):
    import convert
    _, ckpt, base_path = lora_run(tmp_path)
    convert.export_adapter(ckpt, tmp_path)
    moved = tmp_path / "moved.pt"
    base_path.rename(moved)
    for src in (ckpt, tmp_path / "lora_adapter.safetensors"):
        with pytest.raises(FileNotFoundError, match="LoRA base .*base.pt does not exist"):
            convert.load_dit(src)
    convert.export(ckpt, tmp_path / "release", base=moved)              # --base: the same file, elsewhere
    sd = torch.load(moved, weights_only=True)
    sd["net.blocks.1.mlp.layer2.weight"][0, 0] += 1e-3                   # a base that changed, even slightly
    torch.save(sd, base_path)
    for src in (ckpt, tmp_path / "lora_adapter.safetensors"):
        with pytest.raises(ValueError, match="not the file it was trained on"):
            convert.load_dit(src)
    with pytest.raises(ValueError, match="not a LoRA training checkpoint"):
        convert.export_adapter(tmp_path / "release" / "model_ema_fp32.pt", tmp_path)


def test_base_fingerprint_ignores_mtime_and_sees_changes(tmp_path):
    import shutil
    import convert
    from safetensors.torch import save_file
    sd = {f"net.w{i}": torch.randn(300, 1000) for i in range(4)}       # 4.8 MB: more than the 3 MiB sampled
    for ext in ("pt", "safetensors"):
        a, b = tmp_path / "a" / f"base.{ext}", tmp_path / "b" / f"base.{ext}"   # same name: torch.save embeds it
        a.parent.mkdir(exist_ok=True)
        b.parent.mkdir(exist_ok=True)
        save = (lambda d, f: torch.save(d, f)) if ext == "pt" else (lambda d, f: save_file(d, str(f)))
        save(sd, a)
        fp = convert.base_fingerprint(a)
        os.utime(a, (0, 0))
        shutil.copy(a, b)
        assert convert.base_fingerprint(a) == convert.base_fingerprint(b) == fp
        changed = {k: v.clone() for k, v in sd.items()}
        changed["net.w2"][10, 0] += 1                 # ~2.4 MB in: the middle MiB (a .pt also ends with CRCs)
        save(changed, b)
        assert convert.base_fingerprint(b) != fp
        save({k: v.bfloat16() for k, v in sd.items()}, b)
        assert convert.base_fingerprint(b) != fp
