"""train.py: exact resume (one process and DDP), crash safety, grown heads, configuration errors."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import configurator

import data
import synth
import model
import bench
import train

ROOT = Path(__file__).resolve().parents[1]
# a very small model and clip so that each run is a few seconds on 2 cores
TINY = ["--model_channels=32", "--num_blocks=2", "--num_heads=2", "--frame_size=(32, 48)", "--batch_size=2",
        "--num_workers=0", "--eval_interval=0", "--log_interval=2", "--warmup_iters=2", "--lr=1e-3",
        "--lr_decay_iters=6"]   # the schedule must not depend on where a run stops


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "syn"
    synth.make_synthetic(str(root), episodes=6, cameras=2, frames=20, size=(32, 48), seed=0, val_episodes=2)
    return root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, nproc=1, check=True, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
           if nproc > 1 else [sys.executable]) + [str(ROOT / "train.py")] + TINY + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def load_state(ckpt):
    """Everything in a training checkpoint as a flat {key: tensor-or-value} dict (no process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = Path(str(ckpt) + ".flat.pt")
    dcp_to_torch_save(str(ckpt), str(out))
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = obj
    walk("", torch.load(out, weights_only=False))
    out.unlink()
    return flat


def assert_same_state(a, b, exact=True):
    assert set(a) == set(b)
    groups = {"model": 0, "ema": 0, "optim": 0}
    for k in a:
        if torch.is_tensor(a[k]):
            if exact:
                assert torch.equal(a[k], b[k]), k
            else:
                assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k
            groups[k.split(".")[0]] = groups.get(k.split(".")[0], 0) + 1
        else:
            assert a[k] == b[k], k
    assert groups["model"] and groups["ema"] and groups["optim"]     # the comparison covered all three


def ckpt(out, step):
    return out / "checkpoints" / f"iter_{step:09d}"


def test_exact_resume_single_process(dataset, tmp_path):
    common = [f"--data_root={dataset}", "--save_interval=3", "--keep_last=5"]
    run(common + [f"--out_dir={tmp_path / 'a'}", "--max_iters=6"])
    run(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=3"])
    p = run(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=6"])
    assert "resumed from" in p.stdout and "at step 3" in p.stdout
    a, b = load_state(ckpt(tmp_path / "a", 6)), load_state(ckpt(tmp_path / "b", 6))
    assert_same_state(a, b)
    assert a["trainer.step"] == 6
    # the consolidated EMA file is the official flat format and equals the EMA in the training checkpoint
    flat = torch.load(tmp_path / "a" / "checkpoints" / "model" / "iter_000000006.pt", weights_only=True)
    assert all(k.startswith("net.") for k in flat)
    assert torch.equal(flat["net.final_layer.linear.weight"], a["ema.final_layer.linear.weight"])
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert log[-1]["step"] == 6 and "tokens_per_s" in log[-1] and "loss_t" in log[-1]


def test_exact_resume_ddp_and_reshard(dataset, tmp_path):
    common = [f"--data_root={dataset}", "--save_interval=2", "--keep_last=5", "--batch_size=1"]
    run(common + [f"--out_dir={tmp_path / 'a'}", "--max_iters=4"], nproc=2)
    run(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=2"], nproc=2)
    p = run(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=4"], nproc=2)
    assert "at step 2" in p.stdout and "world 2" in p.stdout
    assert_same_state(load_state(ckpt(tmp_path / "a", 4)), load_state(ckpt(tmp_path / "b", 4)))
    # a 2-process checkpoint resumes in 1 process with the same global batch (2 = 1 x accum 2): same samples,
    # same result up to the order of the gradient sum
    run(common + [f"--out_dir={tmp_path / 'c'}", "--max_iters=2"], nproc=2)
    p = run(common + [f"--out_dir={tmp_path / 'c'}", "--max_iters=4", "--grad_accum=2"])
    assert "at step 2" in p.stdout and "global batch changed" not in p.stdout
    assert_same_state(load_state(ckpt(tmp_path / "a", 4)), load_state(ckpt(tmp_path / "c", 4)), exact=False)


def test_exact_resume_fsdp2_and_reshard_to_one_process(dataset, tmp_path):
    """FSDP2 runs on CPU with gloo in torch 2.13: sharded model, EMA and optimizer state resume exactly, and the
    sharded checkpoint loads into a single unsharded process."""
    common = [f"--data_root={dataset}", "--save_interval=2", "--keep_last=5", "--batch_size=1", "--parallel=fsdp"]
    # run a also validates and writes a rollout video (collective under FSDP); neither may change the training state
    p = run(common + [f"--out_dir={tmp_path / 'a'}", "--max_iters=4", "--eval_interval=2", "--sample_interval=4"], nproc=2)
    assert "action gain" in p.stdout and (tmp_path / "a" / "samples" / "iter_000000004.mp4").exists()
    run(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=2"], nproc=2)
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt(tmp_path / "b", 2), ckpt(tmp_path / "c", 2))
    (tmp_path / "c" / "checkpoints" / "latest_checkpoint.txt").write_text("iter_000000002")
    p = run(common + [f"--out_dir={tmp_path / 'b'}", "--max_iters=4"], nproc=2)
    assert "at step 2" in p.stdout and "parallel fsdp" in p.stdout
    a = load_state(ckpt(tmp_path / "a", 4))
    assert_same_state(a, load_state(ckpt(tmp_path / "b", 4)))
    p = run(common[:-1] + [f"--out_dir={tmp_path / 'c'}", "--max_iters=4", "--grad_accum=2"])
    assert "at step 2" in p.stdout
    assert_same_state(a, load_state(ckpt(tmp_path / "c", 4)), exact=False)


def test_sigkill_resumes_from_last_complete_checkpoint(dataset, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py")] + TINY + [f"--data_root={dataset}", f"--out_dir={out}",
                                                              "--save_interval=2", "--max_iters=400", "--keep_last=2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = out / "checkpoints" / "latest_checkpoint.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "iter_000000004"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)        # mid-training, possibly mid-save
    proc.wait()
    assert latest.exists(), "no checkpoint was written before the kill"
    name = latest.read_text().strip()
    step = int(name.split("_")[1])
    assert (out / "checkpoints" / name / ".metadata").exists()
    p = run([f"--data_root={dataset}", f"--out_dir={out}", "--save_interval=2", f"--max_iters={step + 2}"])
    assert f"at step {step}" in p.stdout
    assert ckpt(out, step + 2).exists()
    assert not any(d.name.endswith(".tmp") for d in (out / "checkpoints").iterdir())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    out = tmp_path / "run"
    run([f"--data_root={dataset}", f"--out_dir={out}", "--save_interval=2", "--max_iters=2"])
    p = run([f"--data_root={dataset}", f"--out_dir={out}", "--save_interval=2", "--max_iters=8", "--log_interval=100",
             "--lr=1e30", "--grad_clip=0.0", "--warmup_iters=0", "--lr_schedule=constant"], check=False)
    assert p.returncode != 0 and "non-finite loss" in p.stderr and "iter_000000002" in p.stderr
    assert (out / "checkpoints" / "latest_checkpoint.txt").read_text() == "iter_000000002"
    assert sorted(d.name for d in (out / "checkpoints").iterdir() if d.name.startswith("iter_")) == ["iter_000000002"]


@pytest.mark.slow
def test_default_run(tmp_path):
    """`python train.py` exactly as a new user runs it (in a scratch directory): data generated, loss falls,
    checkpoint written, positive action gain printed at the end."""
    p = subprocess.run([sys.executable, str(ROOT / "train.py")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "out" / "synthetic" / "log.jsonl")]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    evals = [r for r in log if "action_gain" in r]
    assert evals[-1]["action_gain"] > 0
    assert (tmp_path / "out" / "synthetic" / "checkpoints" / "latest_checkpoint.txt").exists()
    assert "action gain +" in p.stdout


def test_grown_heads_start_as_the_checkpoint(tmp_path):
    c = {k: getattr(train, k) for k in train._CONFIG_KEYS}
    c.update(model_channels=32, num_blocks=2, num_heads=2)
    base_cfg = train.model_config({**c, "action_mode": "none", "n_views_emb": 0}, 12)
    torch.manual_seed(0)
    base = model.DiT(base_cfg)
    base.init_weights()
    for p in base.parameters():                      # make every weight matter
        p.data.normal_(0, 0.1)
    torch.save({"net." + k: v for k, v in base.state_dict().items()}, tmp_path / "base.pt")
    grown = train.build_model({**c, "init_from": str(tmp_path / "base.pt")}, train.model_config(c, 12),
                              torch.device("cpu"), say=lambda *a: None)
    assert grown.cfg.action_mode == "per_frame" and grown.cfg.n_views_emb == 7
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 8, 4, 6, generator=g)
    t = torch.rand(2, generator=g)
    mask = model.condition_mask(2, 2, 4, 4, 6, 1)
    with torch.no_grad():
        want = base(x, t, None, mask, num_views=2)
        got = grown(x, t, None, mask, action=torch.randn(2, 12, 7, generator=g), num_views=2)
    assert torch.allclose(got, want, atol=1e-6)


def test_config_errors(dataset, tmp_path):
    p = run([f"--out_dir={tmp_path}", "--max_iter=3"], check=False)
    assert p.returncode != 0 and "max_iters" in p.stderr
    p = run([f"--out_dir={tmp_path}", "--batch_size=two"], check=False)
    assert p.returncode != 0 and "batch_size" in p.stderr
    p = run([f"--out_dir={tmp_path}", "--frame_size=(30, 48)", f"--data_root={dataset}"], check=False)
    assert p.returncode != 0 and "frame_size" in p.stderr


def test_power_ema_and_schedule():
    assert abs(train.power_ema_gamma(0.1) - 6.9372) < 1e-3
    c = {"warmup_iters": 10, "max_iters": 110, "lr_schedule": "linear", "min_lr_ratio": 0.4}
    assert train.lr_factor(0, c) == pytest.approx(1e-6) and train.lr_factor(10, c) == pytest.approx(1.0)
    assert train.lr_factor(110, c) == pytest.approx(0.4)
    assert train.lr_factor(110, {**c, "lr_schedule": "cosine"}) == pytest.approx(0.4)


def test_step_sampler_is_a_global_stream():
    # 2 ranks x batch 1 see exactly what 1 rank x batch 1 x accum 2 sees, from any start step
    one = train.StepBatchSampler(10, 1, 2, 0, 1, seed=0, start_step=3)
    r0, r1 = (train.StepBatchSampler(10, 1, 1, r, 2, seed=0, start_step=3) for r in (0, 1))
    it, i0, i1 = iter(one), iter(r0), iter(r1)
    for _ in range(8):
        assert next(it) + next(it) == next(i0) + next(i1)


# ---- validation, frozen weights, init, schedule, loss, presets, plan ---------------------------------------

def test_batch_size_1_validation_sees_the_action_gain(dataset, tmp_path):
    """Batch 1 (the main preset): the shuffled actions come from another val clip, not a roll of the batch.
    Also: no progress bar when stdout is not a terminal, and the closing lines say where things are."""
    out = tmp_path / "b1"
    p = run([f"--data_root={dataset}", f"--out_dir={out}", "--batch_size=1", "--max_iters=2", "--eval_interval=2",
             "--save_interval=2"])
    ev = [json.loads(line) for line in open(out / "log.jsonl") if "val_loss" in line][-1]
    assert ev["val_loss_shuffled"] != ev["val_loss"]
    assert "it/s" not in p.stderr and "train:" not in p.stderr                    # no tqdm bar in a log file
    assert f"log: {out / 'log.jsonl'}" in p.stdout
    assert f"next: python sample.py --dit_path {out / 'checkpoints' / 'model' / 'iter_000000002.pt'}" in p.stdout
    assert "distributed is disabled" not in p.stderr


def tiny_config(**kw):
    c = {k: getattr(train, k) for k in train._CONFIG_KEYS}
    c.update(model_channels=32, num_blocks=2, num_heads=2)
    c.update(kw)
    return c


@pytest.mark.parametrize("proj", [0, 16])
def test_frozen_set_is_exactly_the_zero_gradient_set(proj):
    """With the all-zero text, the parameters train.py freezes are exactly those whose gradient is zero."""
    c = tiny_config(crossattn_proj_in_channels=proj)
    net = train.build_model(c, train.model_config(c, 12), torch.device("cpu"), say=lambda *a: None)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    net.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 12, 8, 4, 6, generator=g)
    with torch.enable_grad():                            # (sample.main switches autograd off for the process)
        loss, _, _ = model.diffusion_loss(net, x0, {"action": torch.randn(2, 12, 7, generator=g)}, 2, g, **train.loss_settings(c))
        loss.backward()
    zero = {n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()}
    assert zero == train.zero_gradient_params(net, text=False)
    assert ("crossattn_proj.0.weight" in zero) == bool(proj) and "crossattn_proj.0.bias" not in zero


def test_frozen_weights_stay_bit_identical(dataset, tmp_path):
    c = tiny_config(crossattn_proj_in_channels=16)
    base = train.build_model(c, train.model_config(c, 12), torch.device("cpu"), say=lambda *a: None)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.1)
    torch.save({"net." + k: v for k, v in base.state_dict().items()}, tmp_path / "init.pt")
    out = tmp_path / "run"
    p = run([f"--data_root={dataset}", f"--out_dir={out}", f"--init_from={tmp_path / 'init.pt'}", "--max_iters=3",
             "--save_interval=3", "--crossattn_proj_in_channels=16", "--weight_decay=0.5"])
    assert "frozen (zero gradient with the all-zero text): 9 tensors" in p.stdout and "crossattn_proj.0.weight" in p.stdout
    state = load_state(ckpt(out, 3))
    frozen = train.zero_gradient_params(base, text=False)
    assert len(frozen) == 9
    for n, v in base.state_dict().items():
        same = torch.equal(state["model." + n], v)
        assert same == (n in frozen), n                 # frozen: untouched by AdamW's decay; the rest trained


def test_init_from_is_strict_and_says_why(dataset, tmp_path):
    c = tiny_config()
    sd = train.build_model(c, train.model_config(c, 12), torch.device("cpu"), say=lambda *a: None).state_dict()
    torch.save({"weights." + k: v for k, v in sd.items()}, tmp_path / "prefixed.pt")
    common = [f"--data_root={dataset}", f"--out_dir={tmp_path / 'o'}", "--max_iters=1", "--save_interval=1"]
    p = run(common + [f"--init_from={tmp_path / 'prefixed.pt'}"], check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'prefixed.pt'}: ") and "keys start with 'weights.': strip that prefix" in line
    # a Predict2.5 file (text projection) into a model built without crossattn_proj_in_channels
    c25 = tiny_config(crossattn_proj_in_channels=16)
    sd25 = train.build_model(c25, train.model_config(c25, 12), torch.device("cpu"), say=lambda *a: None).state_dict()
    torch.save({"net." + k: v for k, v in sd25.items()}, tmp_path / "p25.pt")
    p = run(common + [f"--init_from={tmp_path / 'p25.pt'}"], check=False)
    assert p.returncode != 0 and "crossattn_proj_in_channels=16" in p.stderr and "Traceback" not in p.stderr
    p = run(common + [f"--init_from={tmp_path / 'p25.pt'}", "--init_strict=False"])
    assert "partial load" in p.stdout


def test_lambda_linear_is_the_cosmos_schedule():
    c = {"lr_schedule": "lambda_linear", "warmup_iters": 100, "lr_cycle_iters": 400000, "lr_f_start": 1e-6,
         "lr_f_max": 0.99, "lr_f_min": 0.4, "max_iters": 20000}
    assert train.lr_factor(0, c) == pytest.approx(1e-6)
    assert train.lr_factor(50, c) == pytest.approx(1e-6 + (0.99 - 1e-6) / 2)
    assert train.lr_factor(100, c) == pytest.approx(0.99)
    assert train.lr_factor(20000, c) == pytest.approx(0.4 + 0.59 * 380000 / 399900)      # ~0.96, not 0.4
    assert train.lr_factor(400000, c) == pytest.approx(0.4) and train.lr_factor(500000, c) == pytest.approx(0.4)


def test_loss_normalisation_keys():
    c = tiny_config(loss_mean="noisy", loss_scale=1.0)
    net = train.build_model(c, train.model_config(c, 12), torch.device("cpu"), say=lambda *a: None)
    x0 = torch.randn(2, 12, 8, 4, 6, generator=torch.Generator().manual_seed(0))
    a = torch.randn(2, 12, 7)
    losses = {}
    for mean, scale in (("noisy", 1.0), ("all", 1.0), ("all", 10.0)):
        g = torch.Generator().manual_seed(1)
        losses[mean, scale] = model.diffusion_loss(net, x0, {"action": a}, 2, g, **train.loss_settings({**c, "loss_mean": mean, "loss_scale": scale}))[0]
    # 2 views x 4 latent frames, 1 conditioned per view: "all" divides by 8 frames where "noisy" divides by 6
    assert losses["all", 1.0].item() == pytest.approx(losses["noisy", 1.0].item() * 6 / 8, rel=1e-5)
    assert losses["all", 10.0].item() == pytest.approx(10 * losses["all", 1.0].item(), rel=1e-5)


def test_2B_and_14B_build_on_meta_with_rope_keys():
    for size, ratios in (("2B", (3.0, 3.0, 1.0)), ("14B", (2.0, 2.0, 20 / 24))):
        c = tiny_config(model_size=size, model_channels=0, num_blocks=0, num_heads=0)
        net = train.build_model(c, train.model_config(c, 16), "meta")
        assert (net.cfg.rope_h_extrapolation_ratio, net.cfg.rope_w_extrapolation_ratio,
                net.cfg.rope_t_extrapolation_ratio) == pytest.approx(ratios)
        assert net.num_params() > (14e9 if size == "14B" else 2e9)
    c = tiny_config(model_size="14B", model_channels=0, num_blocks=0, num_heads=0, rope_h_extrapolation_ratio=3.0,
                    rope_w_extrapolation_ratio=3.0, rope_t_extrapolation_ratio=1.0)      # Predict2.5 14B
    cfg = train.model_config(c, 16)
    assert (cfg.rope_h_extrapolation_ratio, cfg.rope_t_extrapolation_ratio) == (3.0, 1.0)


@pytest.mark.parametrize("args", [[str(ROOT / "config" / "multiview_action.py")], ["--model_size=14B", "--parallel=fsdp"]])
def test_dry_run_prints_the_plan_without_data_or_weights(args, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "train.py")] + args + ["--dry_run=True"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "memory per GPU: model state" in p.stdout and "TFLOP/step" in p.stdout and "tokens/step" in p.stdout
    assert "sharded 8 ways" in p.stdout and "dry run" in p.stdout
    assert "op count of one sample's DiT step" in p.stdout and "saved activations" in p.stdout and "MFU" in p.stdout
    assert not any(tmp_path.iterdir())                                  # nothing written, nothing generated


def test_memory_plan_arithmetic():
    cfg = model.DiTConfig(**model.PRESETS["2B"])
    n, saved = 2_000_000_000, {False: (28e9, 4e9), True: (1e9, 4e7)}   # (activation, weight bytes) per sample
    m = bench.memory_plan(cfg, n, n, saved, batch_size=2)
    assert m["weights"] + m["grads"] + m["optimizer"] + m["ema"] == 20 * n           # fp32 + grad + 2 moments + EMA
    assert m["activations"] == 2 * 28e9                                             # the count, times the batch
    assert m["activations_checkpointed"] == 2 * (1e9 + 28e9 / cfg.num_blocks)       # + one block recomputed
    casts = bench.memory_plan(cfg, n, n, saved, batch_size=2, autocast_copies=True)
    assert casts["activations"] == 2 * 28e9 + 4e9                                   # autocast's bf16 weight copies
    lora = bench.memory_plan(cfg, n, 10_000_000, saved, batch_size=1, shards=8, ema_params=10_000_000,
                             frozen_bytes=2)                                        # LoRA: bf16 frozen base
    assert lora["weights"] == (2 * (n - 10_000_000) + 4 * 10_000_000) / 8 and lora["optimizer"] == 8e7 / 8


def test_joint_views_differ_from_per_view_forwards():
    """A grown multi-view model at step 0 is the base model run jointly over the views: each view also attends
    to the others, so it is not the base model's per-view prediction. Measured (2-core CPU; this tiny net,
    every linear weight N(0, 1/fan_in) as at init, adaLN outputs included): 0.24 relative L2 (printed)."""
    c = tiny_config(action_mode="none", n_views_emb=7)
    net = train.build_model(c, train.model_config(c, 12), torch.device("cpu"), say=lambda *a: None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.ndim == 2 and not n.startswith(("view_embeddings", "x_embedder")):
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
        V, x = 2, torch.randn(1, 12, 8, 4, 6, generator=g)
        t, mask = torch.tensor([0.5]), model.condition_mask(1, V, 4, 4, 6, 1)
        joint = net(x, t, None, mask, num_views=V)
        per_view = torch.cat([net(x[:, :, 4 * v:4 * v + 4], t, None, mask[:, :, 4 * v:4 * v + 4], num_views=1,
                                  view_indices_B_T=torch.full((1, 4), v)) for v in range(V)], dim=2)
    rel = ((joint - per_view).norm() / per_view.norm()).item()
    print(f"joint vs per-view relative difference: {rel:.4f}")
    assert 1e-3 < rel < 0.5


def test_one_line_errors_before_work(dataset, tmp_path):
    (tmp_path / "irasm").mkdir()
    p = run([f"--out_dir={tmp_path / 'o'}", f"--data_root={tmp_path / 'irasm2'}"], check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and not (tmp_path / "irasm2").exists()
    assert p.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'irasm2'}: data_root not found (did you mean {tmp_path / 'irasm'}?)"
    for bad in ("--batch_size=0", "--grad_accum=-1", "--max_iters=0"):
        p = run([f"--out_dir={tmp_path / 'o'}", f"--data_root={dataset}", bad], check=False)
        assert p.returncode != 0 and bad.split("=")[0] in p.stderr and "Traceback" not in p.stderr
        assert "tokens/step" not in p.stdout                           # refused before any work
    (tmp_path / "file").write_text("")
    p = run([f"--out_dir={tmp_path / 'file' / 'out'}", f"--data_root={dataset}"], check=False)
    assert p.returncode != 0 and "out_dir is not writable" in p.stderr and "Traceback" not in p.stderr


def test_bad_episodes_and_save_leftovers(dataset, tmp_path):
    """A bad annotation: one error line; skip_bad=True skips and counts it. A killed save's model/*.pt.tmp is
    cleaned at start-up."""
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    ann = sorted((root / "annotations").rglob("*.json"))
    ann[0].write_text("{not json")
    common = [f"--data_root={root}", f"--out_dir={tmp_path / 'o'}", "--max_iters=1", "--save_interval=1"]
    p = run(common, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith(
        f"error: {ann[0]}")
    (tmp_path / "o" / "checkpoints" / "model").mkdir(parents=True)
    (tmp_path / "o" / "checkpoints" / "model" / "iter_000000009.pt.tmp").write_text("")
    p = run(common + ["--skip_bad=True"])
    assert "skipped 1 bad episode(s) of" in p.stdout
    assert not (tmp_path / "o" / "checkpoints" / "model" / "iter_000000009.pt.tmp").exists()


class BrokenClips(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise configurator.UserError("cam0/ep00001.mp4", "cannot decode frame 3")


def test_dataloader_worker_errors_are_unwrapped_to_one_line():
    loader = torch.utils.data.DataLoader(BrokenClips(), num_workers=1)
    with pytest.raises(Exception) as e:
        next(iter(loader))
    assert "Traceback" in str(e.value)                                 # what torch hands over: the worker's text
    assert configurator.known_error(e.value) == "cam0/ep00001.mp4: cannot decode frame 3"
    assert configurator.known_error(KeyError("x")) is None                    # unexpected errors keep their traceback


def test_no_config_key_is_shadowed_by_a_function():
    assert all(not callable(getattr(train, k)) for k in train._CONFIG_KEYS)


def test_configure_leaves_the_module_defaults_alone():
    """train.main may run twice in one process (tests, notebooks): overrides never become the next run's defaults."""
    before = train.lr
    c = train.configure(["--lr=0.5", f"--max_iters={train.max_iters + 1}"])
    assert c["lr"] == 0.5 and train.lr == before and train.configure([])["max_iters"] == train.max_iters


def test_training_steps_make_no_host_syncs(dataset, tmp_path):
    """A step between log/eval/save steps never makes the host wait for the device: the syncs counted
    (opcount.SyncCounter: .item(), nonzero, bool(tensor), device-to-host copies) are the same for 2 steps and for
    5 (set-up, the final log and save make the rest). The fused AdamW keeps its step counters as tensors."""
    import opcount
    counts = []
    for n in (2, 5):
        args = TINY + [f"--data_root={dataset}", "--cameras=(0, 1)", "--log_interval=1000", "--save_interval=1000",
                       f"--max_iters={n}", f"--out_dir={tmp_path / str(n)}"]
        with opcount.SyncCounter() as s:
            train.main(args)
        counts.append(s.count)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the caller's handler back (forked workers)
    assert counts[0] == counts[1] > 0, counts


def test_keep_consolidated_keeps_the_last_and_every_nth(tmp_path):
    """Retention of the consolidated files (each 8.5 GB for the 2B model): the `last` newest plus the steps that are
    multiples of `every`, each with its .json; 0 keeps all."""
    import checkpoint
    steps = [500, 1000, 1500, 2000, 2500, 3000]
    for s in steps:
        for ext in (".pt", ".json"):
            (tmp_path / f"iter_{s:09d}{ext}").write_text("x")
    checkpoint.keep_consolidated(str(tmp_path), 0, 1000)
    assert len(list(tmp_path.iterdir())) == 12
    checkpoint.keep_consolidated(str(tmp_path), 2, 1000)
    left = sorted(int(p.name[5:14]) for p in tmp_path.glob("*.pt"))
    assert left == [1000, 2000, 2500, 3000] and len(list(tmp_path.glob("*.json"))) == 4
    checkpoint.keep_consolidated(str(tmp_path), 1, 0)
    assert [p.name for p in tmp_path.glob("*.pt")] == ["iter_000003000.pt"]


def last_error_line(p):
    """The one error line of a refused command: exit 1, no traceback."""
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stderr.strip().splitlines()[-1]


# a file-size limit (what a full disk looks like to the writer) during train.py's consolidated write only
FULL_DURING_CONSOLIDATED = """import resource, runpy, sys
import checkpoint
write = checkpoint.write_consolidated
def limited(*args):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        return write(*args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
checkpoint.write_consolidated = limited
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_damaged_checkpoints_and_full_disks_are_one_line(dataset, tmp_path):
    """A truncated shard of the latest checkpoint: resuming, sample.py and convert.py export name it in one line,
    the resume names the intact one and --resume_from=previous resumes from it. A full disk (a file-size limit)
    during the DCP save and during the consolidated write: one line naming the file and the intact checkpoint, no
    partial file left, and the same run without the limit resumes from that checkpoint."""
    import resource
    out = tmp_path / "o"
    common = [f"--data_root={dataset}", f"--out_dir={out}", "--save_interval=2", "--keep_last=9"]
    run(common + ["--max_iters=4"])
    shard = ckpt(out, 4) / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    damaged = f"error: {ckpt(out, 4)}: a damaged checkpoint: __0_0.distcp is truncated ({size // 2} of {size} bytes)"
    assert last_error_line(run(common + ["--max_iters=6"], check=False)) == \
        f"{damaged}; iter_000000002 is intact: resume from it with --resume_from=previous"
    for script, args in (("sample.py", ["--dit_path", ckpt(out, 4), f"--data_root={dataset}"]),
                         ("convert.py", ["export", ckpt(out, 4), tmp_path / "release"])):
        p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert last_error_line(p) == damaged
    assert f"resumed from {ckpt(out, 2)} at step 2" in run(common + ["--max_iters=6", "--resume_from=previous"]).stdout
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))  # noqa: E731
    p = run(common + ["--max_iters=8"], check=False, preexec_fn=limit)
    assert last_error_line(p) == (f"error: {ckpt(out, 8)}.tmp: no space left on device writing this checkpoint "
                                  f"(removed): the previous checkpoint {ckpt(out, 6)} is intact")
    assert not list((out / "checkpoints").rglob("*.tmp*"))
    assert (out / "checkpoints" / "model" / "iter_000000006.pt").exists()
    p = subprocess.run([sys.executable, "-c", FULL_DURING_CONSOLIDATED, str(ROOT / "train.py")] + TINY + common +
                       ["--max_iters=8"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert f"resumed from {ckpt(out, 6)} at step 6" in p.stdout
    pt = out / "checkpoints" / "model" / "iter_000000008.pt"
    assert last_error_line(p) == (f"error: {pt}: no space left on device writing the consolidated weights (removed): "
                                  f"the training checkpoint {ckpt(out, 8)} is intact (a resume writes them)")
    assert not list((out / "checkpoints").rglob("*.tmp*")) and not pt.exists()
    p = run(common + ["--max_iters=8"])
    assert f"resumed from {ckpt(out, 8)} at step 8" in p.stdout and "missing consolidated weights of step 8" in p.stdout
    assert pt.exists() and (out / "checkpoints" / "model" / "iter_000000006.pt").exists()


@pytest.mark.parametrize("text, says", [
    ("lr = 1e-3\nbatch_size = (\n", "{f}:2: syntax error: '(' was never closed"),
    ("lr = 1e-3\nx = 1 / 0\n", "{f}:2: ZeroDivisionError: division by zero"),
    ("# views\ncameras = 0\n", "{f}:2: cameras: expected a tuple such as (0, 1) (or 0,1), got 0"),
    ("frame_size = 64\n", "{f}:1: frame_size: expected a tuple such as (64, 80) (or 64,80), got 64"),
    ('lr = "1e-3"\n', "{f}:1: lr: expected float (default 0.001), got '1e-3'"),
    ("\nnum_frames = 14\n", "{f}:2: --num_frames=14: must be 1 + 4k (the tokenizer packs 4 frames per latent frame "
                            "after the first)"),
    ("action_type = 'relative'\n", "{f}:1: --action_type='relative': must be one of 'absolute', 'delta', "
                                   "'delta_state'"),
    ("learning_rate = 1e-3\n", "{f}:1: unknown config key 'learning_rate'. Did you mean: lr?"),
])
def test_config_file_errors_name_the_file_and_line(tmp_path, text, says):
    """A config file's syntax error, exception, wrong-typed value or value a later check refuses: one line naming
    the file, the line and the key (the defaults of train.py itself: the file is the only setting)."""
    f = tmp_path / "my_config.py"
    f.write_text(text)
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), str(f), f"--out_dir={tmp_path / 'o'}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert last_error_line(p) == "error: " + says.format(f=f)
    if "num_frames" in text:          # set again on the command line: the command line is named
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), str(f), "--num_frames=15"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert last_error_line(p).startswith("error: --num_frames=15: must be 1 + 4k")


def test_sampling_on_fewer_cameras_than_trained_is_one_line(dataset, tmp_path):
    """A 2-camera checkpoint sampled on a 1-camera Bridge/IRASim folder: one line with both camera counts."""
    run([f"--data_root={dataset}", f"--out_dir={tmp_path / 'o'}", "--max_iters=1", "--save_interval=1"])
    bridge = tmp_path / "bridge"
    ann = json.loads(sorted((dataset / "annotations" / "val").glob("*.json"))[0].read_text())
    (bridge / "videos" / "val" / "0").mkdir(parents=True)
    shutil.copy(sorted((dataset / "videos" / "cam0").glob("*.mp4"))[-1], bridge / "videos" / "val" / "0" / "rgb.mp4")
    (bridge / "annotation" / "val").mkdir(parents=True)
    ann["videos"] = [{"video_path": "videos/val/0/rgb.mp4"}]
    (bridge / "annotation" / "val" / "0.json").write_text(json.dumps(ann))
    p = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--dit_path", str(tmp_path / "o"),
                        f"--data_root={bridge}", "--num_steps=2"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert last_error_line(p) == (f"error: {bridge / 'annotation' / 'val' / '0.json'}: the config asks for 2 "
                                  f"camera(s) [0, 1] and this episode lists 1 camera(s) in 'videos' (0..0); camera 1 "
                                  f"was asked for")


# -----------------------------------------------------------------------------
# issue 24: signals, a lost consolidated file, --help and the plain flag forms, ETA and the curves

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_resumes_exactly(dataset, tmp_path, sig):
    """SIGTERM (a preempted job) or SIGINT (Ctrl-C) mid-run: the step finishes, a checkpoint is saved, one line says
    so, the exit is 128 + signal with no traceback; resuming to step N + 2 equals an uninterrupted run to N + 2."""
    common = [f"--data_root={dataset}", "--save_interval=1000", "--keep_last=5"]
    out = tmp_path / "a"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py")] + TINY + common + [f"--out_dir={out}",
                            "--max_iters=400"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()):
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in stderr, stderr[-3000:]
    last = stdout.strip().splitlines()[-1]
    step = int(last.split(" at step ")[1].split(":")[0])
    assert last == (f"stopped by {signal.Signals(sig).name} at step {step}: saved {ckpt(out, step)}; the same "
                    f"command resumes it") and 0 < step < 400
    p = run(common + [f"--out_dir={out}", f"--max_iters={step + 2}"])
    assert f"at step {step}" in p.stdout and "| eta " in p.stdout                # progress lines carry an ETA
    run(common + [f"--out_dir={tmp_path / 'b'}", f"--max_iters={step + 2}"])
    assert_same_state(load_state(ckpt(out, step + 2)), load_state(ckpt(tmp_path / "b", step + 2)))


def test_resume_writes_a_consolidated_file_lost_to_a_kill(dataset, tmp_path):
    """A kill -9 during the final consolidated write leaves model/iter_X.pt.tmp and no iter_X.pt: the resume (already
    at max_iters) writes it, the same file. The run draws its loss curves next to log.jsonl at each eval."""
    out = tmp_path / "run"
    args = [f"--data_root={dataset}", f"--out_dir={out}", "--save_interval=2", "--max_iters=2", "--eval_interval=2"]
    run(args)
    final = out / "checkpoints" / "model" / "iter_000000002.pt"
    want = torch.load(final, weights_only=True)
    final.rename(str(final) + ".tmp")                                   # as the kill left it
    p = run(args)
    assert "writing the missing consolidated weights of step 2" in p.stdout
    got = torch.load(final, weights_only=True)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not Path(str(final) + ".tmp").exists()
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and png[16:24] == (640).to_bytes(4, "big") + (240).to_bytes(4, "big")
    latest = out / "checkpoints" / "latest_checkpoint.txt"                 # issue 24 item 14: emptied by a crash
    latest.write_text("")
    assert last_error_line(run(args, check=False)) == (f"error: {latest}: a damaged checkpoint: is empty; "
                                                       "iter_000000002 is intact: resume from it with "
                                                       "--resume_from=previous")


def test_help_and_the_plain_flag_forms(tmp_path):
    """--help / -h list the keys with their defaults and comments under the config block's headings; 32x48, 0,1 and 0
    are tuples as the tuple forms are; an unknown key names the key meant (learning_rate -> lr)."""
    for flag in ("--help", "-h"):
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), flag], cwd=tmp_path, capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0 and p.stdout.startswith("usage: python train.py"), p.stderr[-2000:]
        assert "\n  --save_interval=200   also saved at max_iters and on SIGTERM / SIGINT\n" in p.stdout
        assert not list(tmp_path.iterdir())                             # nothing written
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--help"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    p.stdout.close()                                                # a reader that left (`--help | head`)
    assert p.wait(timeout=120) == 1 and not p.stderr.read()         # no BrokenPipeError traceback
    c = train.configure(["--frame_size=32x48", "--cameras=0,1"])
    assert c["frame_size"] == (32, 48) and c["cameras"] == (0, 1)
    assert train.configure(["--cameras", "0"])["cameras"] == (0,)
    assert train.configure(["--frame_size=(32, 48)", "--cameras=(1,)"])["cameras"] == (1,)
    with pytest.raises(configurator.UserError, match=r"^--learning_rate: unknown config key. Did you mean: lr\?$"):
        train.configure(["--learning_rate=1e-4"])
