"""The GPU benchmark block's commands on CPU, tiny shapes: train.py --bench=True with and without
--bench_latents=True (a latent-cache step: no tokenizer encode), sample.py --bench (seconds per chunk, no dataset
read) and its random 2B net equal in shape to config/multiview_action.py's, vae.py bench over several sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import model
import sample
import train
from test_sample import tiny_net, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def train_globals(monkeypatch):
    """train.configure writes the overrides into train's module globals: restore them after the test."""
    for k in train._CONFIG_KEYS:
        monkeypatch.setattr(train, k, getattr(train, k))


def test_train_bench_latents_skip_the_encode(train_globals, tmp_path, monkeypatch):
    """Both modes time the same step on the same latent shape; only the video mode calls the tokenizer."""
    encodes, shapes = [], {}
    encode_views, diffusion_loss = train.encode_views, model.diffusion_loss

    def counting_encode(*a, **k):
        encodes.append(1)
        return encode_views(*a, **k)

    def recording_loss(net, x0, *a, **k):
        shapes.setdefault(mode, set()).add((tuple(x0.shape), x0.dtype))
        return diffusion_loss(net, x0, *a, **k)

    monkeypatch.setattr(train, "encode_views", counting_encode)
    monkeypatch.setattr(model, "diffusion_loss", recording_loss)
    res = {}
    for mode in (False, True):
        encodes.clear()
        res[mode] = train.main([str(ROOT / "config" / "tiny_cpu.py"), "--bench=True", f"--bench_latents={mode}",
                                "--bench_steps=1", "--batch_size=2", f"--out_dir={tmp_path / 'out'}"])
        assert len(encodes) == (0 if mode else 3)           # 2 warm-up steps + 1 timed
    assert shapes[False] == shapes[True] == {((2, 12, 2 * 4, 8, 10), torch.float32)}   # 2 views x 4 latent frames
    for r in res.values():
        assert r["steps_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 160)


def test_sample_bench_reads_no_data(tmp_path, monkeypatch, capsys):
    """A checkpoint whose run config names a dataset that does not exist: the bench rolls out two chunks of
    random frames and actions, times them and prints seconds per chunk."""
    ck = write_checkpoint(tmp_path / "model" / "iter_000000001.pt", tiny_net(init=True), (0, 1),
                          data_root=tmp_path / "missing")
    monkeypatch.chdir(tmp_path)
    timings = sample.main(["--bench", "--dit_path", str(ck), "--num_steps", "3"])
    assert [r["chunk"] for r in timings] == [0, 1] and all(r["net_calls"] == 4 for r in timings)   # ab2: N+1
    assert all(r["seconds"] >= r["sample_seconds"] > 0 for r in timings)
    out = capsys.readouterr().out
    assert "s per 2-view chunk (12 new frames at 32x48, ab2 3 steps, fp32)" in out
    assert not (tmp_path / "output").exists() and torch.is_grad_enabled()   # the caller keeps its gradients


def test_sample_bench_net_is_the_multiview_preset():
    """sample.py --bench --model_size 2B times the net config/multiview_action.py trains (built on meta here)."""
    c = {k: getattr(train, k) for k in train._CONFIG_KEYS}
    exec((ROOT / "config" / "multiview_action.py").read_text(), {}, c)
    net, run = evaluate.bench_net(dict(model_size="2B", seed=0), torch.device("meta"))
    assert run is None and net.cfg == train.model_config(c, 16)
    with pytest.raises(sample.ConfigError, match="--model_size must be one of"):
        evaluate.bench_net(dict(model_size="tiny", seed=0), torch.device("meta"))


def test_vae_bench_several_sizes():
    p = subprocess.run([sys.executable, str(ROOT / "vae.py"), "bench", "--size", "16x16,16x32", "--frames", "1",
                        "--views", "2", "--dtype", "bf16", "--device", "cpu", "--warmup", "0"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    for size in ("16x16", "16x32"):
        for what in ("encode", "decode"):
            assert f"2 view(s) x 1 x {size} {what}" in p.stdout
