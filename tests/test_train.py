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

import data
import synth
import model
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
