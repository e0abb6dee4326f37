"""sample.py: rollout alignment and conditioning, determinism and per-chunk seeds, AB2 vs Euler, metrics and the
eval report, tiling / mp4 / PNG, the command lines (default run, the official guide's command, IRASim, batches),
and clear errors. Tiny models and few steps: the whole file runs in well under a minute on 2 cores."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import configurator

import data
import evaluate
from synth import make_synthetic
import model
import sample
import vae
from test_model import assert_close

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = ROOT.parent / "shared" / "bridge_samples"
H, W = 32, 48          # pixel tokenizer /8 -> 4x6 latents -> 2x3 patches


def tiny_net(action_mode="per_frame", seed=0, init=False):
    torch.manual_seed(seed)
    cfg = model.DiTConfig(model_channels=32, num_blocks=2, num_heads=2, adaln_lora_dim=8, crossattn_emb_channels=16,
                          in_channels=12, out_channels=12, action_mode=action_mode, n_views_emb=7)
    net = model.DiT(cfg).eval()
    if init:
        net.init_weights()
    return net


@pytest.fixture(scope="module")
def tok():
    return vae.load_tokenizer("pixel", None, spatial_factor=8)


def first_and_actions(B=1, V=2, N=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (B, V, 3, H, W), generator=g, dtype=torch.uint8),
            torch.randn(B, N, 7, generator=g))


# -----------------------------------------------------------------------------
# rollout: alignment, conditioning, seeds

class OracleNet(torch.nn.Module):
    """Predicts, for every chunk, the clip whose frame j (1..12) is a flat image of value action[j-1, 0]: a correct
    rollout then shows action k-1's value at time step k. Records the conditioning latents it is given."""

    def __init__(self, tok, action_mode):
        super().__init__()
        self.cfg = model.DiTConfig(model_channels=8, num_blocks=0, num_heads=1, in_channels=12, out_channels=12,
                                   action_mode=action_mode)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.cond = tok, []

    def forward(self, x, t_B_T, condition_video_input_mask_B_C_T_H_W=None, action=None, num_views=1, **kw):
        B, C, VT, h, w = x.shape
        T = VT // num_views
        self.cond.append(x[:, :, ::T].clone())                          # latent 0 of every view (fed clean)
        values = torch.cat([torch.zeros(B, 1), action[:, :, 0]], dim=1)  # [B, 13]
        clip = values[:, None, :, None, None].expand(B, 3, 13, h * 8, w * 8)
        target = self.tok.encode(clip).repeat(1, 1, num_views, 1, 1)
        return (x - target) / t_B_T[:, None, :, None, None]             # velocity whose x0 is the target


@pytest.mark.parametrize("action_mode", ["per_frame", "global"])
@pytest.mark.parametrize("N", [12, 19, 5, 30])
def test_rollout_alignment_frame_k_is_time_step_k(tok, action_mode, N):
    net = OracleNet(tok, action_mode)
    first, actions = first_and_actions(B=2, V=3, N=N)
    values = torch.linspace(-0.9, 0.9, N + 1)[1:]                       # time step k shows values[k-1]
    actions[:, :, 0] = values
    out = sample.rollout(net, tok, first, actions, num_steps=3, progress=False)
    assert out.shape == (2, 3, 3, N + 1, H, W) and out.dtype == torch.uint8
    assert torch.equal(out[:, :, :, 0], first)                           # frame 0 is the given frame
    expected = sample.to_uint8(values)                                   # [N]
    got = out[:, :, :, 1:].float().mean(dim=(0, 1, 2, 4, 5))
    assert (got - expected.float()).abs().max() <= 1, (got, expected)
    # chunk c is conditioned on time step 12c of every view: the given frame, then the last generated frame
    calls = 4                                                            # 3 steps + the final x0 evaluation
    starts = list(range(0, N, 12))
    assert len(net.cond) == calls * len(starts)
    for c, start in enumerate(starts):
        frame = out[:, :, :, start]
        z = tok.encode(frame.flatten(0, 1)[:, :, None].float() / 127.5 - 1).view(2, 3, 12, 1, 4, 6)
        seen = net.cond[c * calls].view(2, 12, 3, 4, 6).permute(0, 2, 1, 3, 4)
        assert torch.allclose(seen, z[:, :, :, 0], atol=1e-6), f"chunk {c} not conditioned on time step {start}"


def test_rollout_never_reads_ground_truth(tok):
    """The tokenizer only ever encodes the given first frames or frames the rollout itself produced."""
    encoded = []

    class Spy(torch.nn.Module):
        spatial_factor, temporal_factor, latent_channels = 8, 4, 12

        def __init__(self):
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1))

        def encode(self, x):
            encoded.append(x.clone())
            return tok.encode(x)

        def decode(self, z):
            return tok.decode(z)

    first, actions = first_and_actions(V=2, N=30)
    out = sample.rollout(tiny_net(), Spy(), first, actions, num_steps=2, progress=False)
    assert len(encoded) == 3 and all(x.shape[2] == 1 for x in encoded)  # one conditioning frame per chunk
    for c, x in enumerate(encoded):
        frame = sample.to_uint8(x[:, :, 0]).view(1, 2, 3, H, W)
        assert torch.equal(frame, out[:, :, :, 12 * c])


def test_cli_prediction_ignores_ground_truth_beyond_first_frame(synth, ckpt2, tmp_path, monkeypatch):
    """Through the command line (dataset and files): ground truth after frame 0 replaced by noise, same video."""
    monkeypatch.chdir(tmp_path)
    ann = next((synth / "annotations" / "val").glob("*.json"))
    runs = [["--dit_path", str(ckpt2), f"--data_root={synth}", "--num_steps=2"],
            ["--dit_path", str(ckpt2), "--annotation", str(ann), "--num_steps=2"]]
    clean = [sample.main(args + ["--save_path", "a.mp4", "--overwrite"])[0][1] for args in runs]
    real = data.read_frames

    def noisy(path, indices, size=None):
        x = real(path, indices, size)
        idx = list(range(indices)) if isinstance(indices, int) else list(indices)
        for j, i in enumerate(idx):
            if i > 0:
                x[j] = torch.randint(0, 256, x[j].shape, dtype=torch.uint8)
        return x

    monkeypatch.setattr(data, "read_frames", noisy)
    for args, ref in zip(runs, clean):
        assert torch.equal(sample.main(args + ["--save_path", "b.mp4", "--overwrite"])[0][1], ref)


def test_determinism_and_chunk_seeds(tok):
    net = tiny_net()
    first, actions = first_and_actions(V=2, N=24)
    kw = dict(num_steps=3, progress=False)
    a = sample.rollout(net, tok, first, actions, seed=5, **kw)
    assert torch.equal(a, sample.rollout(net, tok, first, actions, seed=5, **kw))
    assert not torch.equal(a, sample.rollout(net, tok, first, actions, seed=6, **kw))
    # chunk 1 is exactly a fresh rollout from time step 12 with seed + 12 and actions 12..23
    b = sample.rollout(net, tok, a[:, :, :, 12], actions[:, 12:], seed=5 + 12, **kw)
    assert torch.equal(b, a[:, :, :, 12:])
    # a shorter trajectory is a prefix (the first chunk does not depend on later actions)
    assert torch.equal(sample.rollout(net, tok, first, actions[:, :12], seed=5, **kw), a[:, :, :, :13])


def test_cond_dict_and_policy_replay_equal_open_loop(tok):
    """The rollout takes the conditioning as one dict (passed per chunk as **cond) or from a policy asked chunk by
    chunk given the latest frames; replaying a fixed sequence through a policy equals open loop bit for bit."""
    first, actions = first_and_actions(N=17)
    net = tiny_net(init=True)
    kw = dict(num_steps=2, progress=False, seed=5)
    open_loop = sample.rollout(net, tok, first, actions, **kw)
    assert torch.equal(sample.rollout(net, tok, first, cond={"action": actions}, **kw), open_loop)
    asked = []

    def replay(frames_B_V_3_H_W, step, history):
        asked.append((step, history.shape[3]))
        assert torch.equal(frames_B_V_3_H_W, history[:, :, :, -1])
        return actions[:, step:step + 12]

    video, used = sample.rollout(net, tok, first, policy=replay, num_actions=17, return_actions=True, **kw)
    assert torch.equal(video, open_loop) and torch.equal(used, actions)
    assert asked == [(0, 1), (12, 13)]
    with pytest.raises(ValueError, match="exactly one of"):
        sample.rollout(net, tok, first, actions, policy=replay, num_actions=17, **kw)


def test_last_partial_chunk_is_padded_hold_still():
    a = torch.tensor([[[1.0, 2, 3, 4, 5, 6, 0.7], [1, 1, 1, 1, 1, 1, 0.3]]])
    p = sample.pad_actions(a, 5)
    assert p.shape == (1, 5, 7) and torch.equal(p[:, :2], a)
    assert torch.all(p[:, 2:, :6] == 0) and torch.all(p[:, 2:, 6] == 0.3)


def test_action_model_checks(tok):
    first, actions = first_and_actions(N=12)
    with pytest.raises(ValueError, match="7-D"):
        sample.rollout(tiny_net(), tok, first, actions[..., :6], num_steps=1, progress=False)
    with pytest.raises(ValueError, match="num_frames=9"):
        sample.rollout(tiny_net("global"), tok, first, actions, num_frames=9, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="sampler"):
        sample.rollout(tiny_net(), tok, first, actions, sampler="heun", progress=False)


# -----------------------------------------------------------------------------
# samplers

SAMPLER_FIXTURES = sorted((ROOT / "tests" / "fixtures").glob("sampler_*.safetensors"))


class FieldNet(torch.nn.Module):
    """The sampler fixtures' stand-in network (sidecar `network_replacement`): v = 0.9 x - 0.5 tau tanh(x + s D) + C
    with tau = 0.001 timesteps and s the mean of the text embedding, per sample."""

    def __init__(self, C, D):
        super().__init__()
        self.cfg = model.DiTConfig(timestep_scale=0.001)
        self.C, self.D = C, D

    def forward(self, x, timesteps_B_T, crossattn_emb=None, **kw):
        tau = 0.001 * timesteps_B_T[:, None, :, None, None]
        s = crossattn_emb.mean(dim=(1, 2))[:, None, None, None, None]
        return 0.9 * x - 0.5 * tau * torch.tanh(x + s * self.D) + self.C


@pytest.mark.parametrize("path", SAMPLER_FIXTURES, ids=[p.stem for p in SAMPLER_FIXTURES])
def test_unipc_sampler_parity(path):
    """The official Predict2.5 inference loop (flow UniPC, shift, truncated int timesteps, conditioned frames and
    CFG) against every case of every tests/fixtures/sampler_* file: schedules exact, every step's tensors close."""
    from safetensors.torch import load_file
    meta, f = json.loads(path.with_suffix(".json").read_text()), load_file(str(path))
    net = FieldNet(f["inputs.field_C"], f["inputs.field_D"])
    noise, gt = f["inputs.noise"], f["inputs.gt_latent"]
    uncond_anchored = "multiview" in meta["source"]["class"].lower()
    for case, c in meta["cases"].items():
        ts, sig = sample.unipc_schedule(c["num_steps"], c["shift"])
        assert torch.equal(ts, f[f"schedule.{case}.timesteps"]) and torch.equal(sig, f[f"schedule.{case}.sigmas"])
        assert torch.equal(noise, sample.chunk_noise(c["noise_seed"], tuple(noise.shape)))
        mask = model.condition_mask(1, 1, noise.shape[2], *noise.shape[3:], c["num_conditional_frames"])
        rec = {}

        def denoise(x, t, t_net):
            v = sample.guided_velocity(net, x, torch.tensor([t_net]), gt, mask, noise, c["guidance"],
                                       f["inputs.text_emb"], f["inputs.neg_text_emb"], uncond_anchored)
            rec.setdefault("velocity", []).append(v)
            return x - t * v

        out = sample.sample_unipc(denoise, noise, c["num_steps"], c["shift"], record=rec)
        for name, xs in rec.items():
            assert_close(torch.cat(xs), f[f"intermediates.{case}.{name}"], f"{case} {name}", 1e-5, 1e-6)
        assert_close(out, f["output" if case == "main" else f"extra_outputs.{case}"], f"{case} final", 1e-5, 1e-6)


def test_karras_grid():
    s = sample.karras_sigmas(35)
    assert s.dtype == torch.float64 and len(s) == 36
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert torch.all(s[1:] < s[:-1])


@pytest.mark.parametrize("name", ["ab2", "euler"])
def test_samplers_exact_for_a_constant_denoiser(name):
    """With x0 independent of x the ODE is linear and both integrators are exact: the last network input is
    x_t = (1 - t) X + t (eps - X / sigma_max) at sigma_min."""
    X, eps = torch.randn(2, 3), torch.randn(2, 3)
    seen = []

    def denoise(x_t, t):
        seen.append((x_t.clone(), t))
        return X

    out = sample.SAMPLERS[name](lambda x, t: denoise(x, t), eps, 10)
    assert torch.equal(out, X) and len(seen) == 11
    x_t, t = seen[-1]
    assert t == pytest.approx(model.sigma_to_t(0.002))
    assert torch.allclose(x_t, (1 - t) * X + t * (eps - X / 80.0), atol=1e-6)


def test_ab2_and_euler_agree_as_steps_grow(tok):
    net = tiny_net()                        # default PyTorch init: a non-trivial velocity field
    B, V, T, h, w = 1, 1, 4, 4, 6
    g = torch.Generator().manual_seed(0)
    x0_cond, act = torch.randn(B, 12, V * T, h, w, generator=g), torch.randn(B, 12, 7, generator=g)
    mask = model.condition_mask(B, V, T, h, w, 1)
    eps = sample.chunk_noise(0, (B, 12, V * T, h, w))

    def denoise(x_t, t):
        return model.predict_x0(net, x_t, torch.full((B,), t), x0_cond, mask, action=act, num_views=V)

    with torch.no_grad():
        gaps = {n: (sample.sample_ab2(denoise, eps, n) - sample.sample_euler(denoise, eps, n)).abs().max().item()
                for n in (4, 8, 16, 32)}
    assert gaps[8] < gaps[4] and gaps[16] < gaps[8] / 1.5 and gaps[32] < gaps[16] / 1.5, gaps
    assert gaps[32] < 0.25 * gaps[8], gaps


def test_guidance_needs_a_text_context(tok, capsys):
    first, actions = first_and_actions(N=12)
    net = tiny_net()
    a = sample.rollout(net, tok, first, actions, num_steps=2, guidance=7.0, progress=True)
    assert "no effect" in capsys.readouterr().out
    assert torch.equal(a, sample.rollout(net, tok, first, actions, num_steps=2, progress=False))
    timings = []
    ctx = torch.randn(1, 2 * 512, 16)                                    # multi-view: 512 tokens per view
    b = sample.rollout(net, tok, first, actions, num_steps=2, guidance=3.0, crossattn_emb=ctx, progress=False,
                       timings=timings)
    assert timings[0]["net_calls"] == 6 and b.shape == a.shape        # conditional + unconditional per step


# -----------------------------------------------------------------------------
# output

@pytest.mark.parametrize("V, grid_hw", [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (5, (2, 3)), (7, (3, 3))])
def test_tile_views_layout(V, grid_hw):
    video = torch.randint(0, 256, (V, 3, 5, 8, 10), dtype=torch.uint8)
    t = sample.tile_views(video)
    rows, cols = grid_hw
    assert t.shape == (5, rows * 8, cols * 10, 3)
    for v in range(V):
        r, c = divmod(v, cols)
        assert torch.equal(t[:, r * 8:(r + 1) * 8, c * 10:(c + 1) * 10], video[v].permute(1, 2, 3, 0))
    gt = torch.randint(0, 256, (V, 3, 3, 8, 10), dtype=torch.uint8)     # shorter ground truth: black after
    tc = sample.tile_views(video, gt)
    w = cols * 10
    assert tc.shape == (5, rows * 8, 2 * w + sample.SEPARATOR, 3)
    assert torch.all(tc[:, :, w:w + sample.SEPARATOR] == 255)
    assert torch.equal(tc[:3, :, w + sample.SEPARATOR:], sample.grid(gt))
    assert torch.all(tc[3:, :, w + sample.SEPARATOR:] == 0)


def read_mp4(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def read_png(path):
    with av.open(str(path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


def test_png_and_mp4_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 13, 3), dtype=np.uint8)
    sample.write_png(tmp_path / "a.png", img)
    assert np.array_equal(read_png(tmp_path / "a.png"), img)
    video = torch.randint(0, 256, (2, 3, 9, 16, 16), dtype=torch.uint8)
    sample.save_video(tmp_path / "v.mp4", video, gt=video, fps=5)
    frames = read_mp4(tmp_path / "v.mp4")
    assert frames.shape == (9, 16, 2 * 32 + sample.SEPARATOR, 3)
    with av.open(str(tmp_path / "v.mp4")) as c:
        assert c.streams.video[0].average_rate == 5
    times = sample.save_strip(tmp_path / "s.png", video, gt=video)
    assert times == [0, 1, 2, 3, 5, 6, 7, 8]
    assert read_png(tmp_path / "s.png").shape == (2 * 16 + 2, 8 * 32 + 7 * 2, 3)


def test_strip_labels_rows_and_cameras(tmp_path):
    """Issue 24 item 13: the strip's first tile says "prediction" / "ground truth" and each view's camera (cam<k>,
    a LeRobot key's last part), burnt in white on black; every other tile is the video's, untouched."""
    assert sample.camera_names((0, 3, "observation.images.top")) == ["cam0", "cam3", "top"]
    H, W = 32, 48
    video = torch.full((2, 3, 9, H, W), 128, dtype=torch.uint8)
    sample.save_strip(tmp_path / "s.png", video, gt=video, cameras=(0, "observation.images.top"))
    img = read_png(tmp_path / "s.png")
    assert img.shape == (2 * H + 2, 8 * 2 * W + 7 * 2, 3)

    def label(y0, x0, n):                     # n characters of the 3x5 font at (y0, x0): a black box, white text
        box = img[y0:y0 + 7, x0:x0 + 4 * n + 1]
        return (box == 0).any() and (box == 255).any() and set(np.unique(box)) <= {0, 255}
    for row in (0, H + 2):
        assert label(row, 0, 4) and label(row, W, 3)                            # cam0 | top
        assert label(row + H - 7, 0, len("prediction" if row == 0 else "ground truth"))
        assert (img[row + 7:row + H - 7, :W] == 128).all()                    # between the labels: the frame
        assert (img[row:row + H, 2 * W + 2:2 * W + 2 + 2 * W] == 128).all()   # the next tile: untouched
    assert not np.array_equal(img[H - 7:H, :W], img[2 * H + 2 - 7:, :W])     # two different row labels


# -----------------------------------------------------------------------------
# metrics and the eval report

def test_metrics():
    x = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    assert torch.all(evaluate.psnr(x, x) > 100) and torch.allclose(evaluate.ssim(x, x), torch.ones(4, dtype=torch.float64))
    y = (x.int() + 1).clamp(max=255).to(torch.uint8)
    y[x == 255] = 254                                                    # every value off by exactly 1
    assert torch.allclose(evaluate.psnr(x, y), torch.full((4,), 20 * math.log10(255), dtype=torch.float64))
    a, b = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8), torch.full((1, 3, 16, 16), 150, dtype=torch.uint8)
    c1 = (0.01 * 255) ** 2                                               # flat images: SSIM = luminance term only
    assert evaluate.ssim(a, b).item() == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rel=1e-6)
    s = evaluate.ssim(x, 255 - x)
    assert torch.all(s < 0.2) and torch.all(s >= -1)


def test_tokenizer_round_trip_is_exact_for_block_constant_video(tok):
    """The pixel tokenizer keeps 8x8-block-constant frames exactly (frame 0 of each window is the given one)."""
    video = torch.randint(0, 256, (2, 3, 20, 4, 6), dtype=torch.uint8)
    video = video.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
    assert torch.equal(evaluate.reconstruct(tok, video), video)


def test_eval_report(synth, tok):
    ds = data.RobotVideoDataset(synth, "val", num_frames=13, cameras=(0, 1), size=(H, W))
    report = evaluate.evaluate(tiny_net(init=True), tok, ds, num_steps=2, progress=False)
    json.dumps(report)
    N = ds.episodes[0].num_frames - 1
    assert report["episodes"] == len(ds.episodes) == 2 and report["views"] == 2
    assert len(report["per_view"]["psnr"]) == len(report["per_view"]["ssim"]) == 2
    assert len(report["per_chunk"]["psnr"]) == math.ceil(N / 12) == len(report["per_chunk"]["frames"])
    assert sum(report["per_chunk"]["frames"]) == 2 * 2 * N               # episodes x views x predicted frames
    assert report["per_chunk"]["time_steps"] == [[1, 12], [13, N]]
    for d in (report, report["shuffled_actions"], report["copy_first_frame"], report["tokenizer_round_trip"],
              report["no_motion"]):
        assert 0 < d["psnr"] < 150 and -1 <= d["ssim"] <= 1
    assert report["latent_l2"] > 0 and report["no_motion"]["latent_l2"] > 0
    assert report["beats_no_motion"] == {"psnr": report["psnr"] > report["no_motion"]["psnr"],
                                         "latent_l2": report["latent_l2"] < report["no_motion"]["latent_l2"]}
    for k in ("psnr", "ssim"):
        assert all(0 < p < 150 for p in report["per_chunk"]["psnr"] + report["per_view"]["psnr"])
        assert all(-1 <= s <= 1 for s in report["per_chunk"]["ssim"] + report["per_view"]["ssim"])
        assert math.isfinite(report["action_sensitivity"][k])
    assert "next episode" in report["shuffled_actions"]["how"]
    assert report["seconds_per_chunk"] > 0 and report["seconds_per_step"] > 0
    assert [e["name"] for e in report["per_episode"]] == [e.name for e in ds.episodes]
    table = evaluate.format_table(report, ["cam0", "cam1"])
    assert f"chunk 1 (t 13-{N})" in table and "action sensitivity" in table and "cam1" in table
    assert "no motion, through the tokenizer (baseline)" in table and "copy first frame, sharp (no tokenizer)" in table
    assert "beat" in table.splitlines()[-2] and "latent L2: model" in table


def test_no_motion_baseline_and_latent_l2(tok):
    """The no-motion model goes through the tokenizer (blocky with the pixel tokenizer, unlike the sharp copy), holds
    still, and a perfect prediction has latent L2 0 while standing still does not."""
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (2, 3, 20, H, W), generator=g, dtype=torch.uint8)
    still = evaluate.no_motion(tok, video[:, :, 0], 20)
    assert still.shape == video.shape and torch.equal(still[:, :, 0], video[:, :, 0])
    through = sample.decode(tok, sample.encode(tok, video[:, :, :1]))[:, :, 0]          # the first frame, tokenized
    assert all(torch.equal(still[:, :, k], through) for k in range(1, 20))
    assert not torch.equal(through, video[:, :, 0])                                     # not the sharp copy
    assert evaluate.latent_l2(tok, video, video) == 0
    assert evaluate.latent_l2(tok, still, video) > 0.1


def test_eval_says_whether_the_model_beats_standing_still(synth, tok):
    """An oracle that predicts the ground truth (through the tokenizer) beats standing still on both measures; the
    no-motion model itself does not."""
    ds = data.RobotVideoDataset(synth, "val", num_frames=13, cameras=(0, 1), size=(H, W))

    class Truth(OracleNet):
        def forward(self, x, t_B_T, **kw):
            return (x - self.target) / t_B_T[:, None, :, None, None]

    net = Truth(tok, "per_frame")
    net.target = rearrange_views(sample.encode(tok, ds.episode_frames(0)[:, :, :13]))
    report = evaluate.evaluate(net, tok, ds, episodes=1, max_actions=12, num_steps=2, progress=False)
    assert report["beats_no_motion"] == {"psnr": True, "latent_l2": True}
    assert "the model beats standing still" in evaluate.format_table(report)


def rearrange_views(z_V_C_T_h_w):
    return z_V_C_T_h_w.permute(1, 0, 2, 3, 4).flatten(1, 2)[None]                      # [1, C, V*T, h, w]


def test_eval_command_line(synth, ckpt2, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    report = sample.main(["--dit_path", str(ckpt2), "--eval", "--data_root", str(synth), "--num_steps", "1",
                          "--eval_episodes=1", "--eval_json", "r.json"])
    on_disk = json.loads(Path("r.json").read_text())
    assert on_disk["episodes"] == 1 and on_disk["psnr"] == report["psnr"] and on_disk["split"] == "val"
    assert "PSNR" in capsys.readouterr().out
    assert read_png(Path("r_strips") / "ep00002.png").shape == (2 * H + 2, 8 * 2 * W + 7 * 2, 3)   # per episode
    # issue 24 item 5: a second --eval replaces no report: a named one is refused, the default name moves on
    with pytest.raises(configurator.UserError, match="r.json: exists; pass --overwrite"):
        sample.main(["--dit_path", str(ckpt2), "--eval", "--data_root", str(synth), "--eval_json", "r.json"])
    for name in ("eval.json", "eval_1.json"):
        sample.main(["--dit_path", str(ckpt2), "--eval", "--data_root", str(synth), "--num_steps", "1",
                     "--eval_episodes=1"])
        assert Path("output", name).is_file() and Path("output", name.replace(".json", "_strips")).is_dir()
    assert "output/eval.json exists: writing output/eval_1.json" in capsys.readouterr().out
    assert json.loads(Path("output/eval.json").read_text())["episodes"] == 1


def test_settings_the_run_did_not_use_are_said_or_refused(synth, ckpt2, tmp_path, monkeypatch, capsys):
    """Issue 24 items 1, 2, 8, 10, 14: --cameras 0 is camera 0 (not "unset"); each setting that differs from the
    run's is printed as an override; 64x96 / 0,1 forms; tiny CPU nets sample on one thread (the train.py policy);
    a LeRobot run's camera names on other data are one line; --help lists the keys with their comments."""
    monkeypatch.chdir(tmp_path)
    budget = []
    monkeypatch.setattr(configurator, "cpu_budget", lambda *a, **k: budget.append((a, k)) or (0, 1))
    common = ["--dit_path", str(ckpt2), "--data_root", str(synth), "--num_steps", "1", "--max_actions", "3"]
    out = sample.main(common + ["--cameras", "0", "--save_path", "c0.mp4"])
    assert out[0][1].shape[0] == 1 and budget == [(("cpu",), dict(num_workers=0, tiny=True))]
    assert "override of the run's config: --cameras=0 (the run used [0, 1])" in capsys.readouterr().out
    out = sample.main(common + ["--cameras", "1,0", "--frame_size", "64x96", "--pixel_factor", "16", "--fps", "8",
                                "--save_path", "o.mp4"])
    assert out[0][1].shape == (2, 3, 4, 64, 96)
    said = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("override of the run's"))
    for k in ("--frame_size=(64, 96) (the run used [32, 48])", "--pixel_factor=16 (the run used 8)",
              "--cameras=(1, 0) (the run used [0, 1])", "--fps=8 (the run used 4)"):
        assert k in said, said
    named = write_checkpoint(tmp_path / "lr" / "m.pt", tiny_net(init=True), ("observation.images.top",))
    with pytest.raises(configurator.UserError, match=f"{synth}: cameras \\['observation.images.top'\\] are LeRobot "
                                                     "camera names .* pass --cameras with this data's ids"):
        sample.main(["--dit_path", str(named), "--data_root", str(synth), "--save_path", "n.mp4"])
    p = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and p.stdout.startswith("usage: python sample.py"), p.stdout[:300] + p.stderr[-500:]
    assert "\nwhat to roll out: a dataset episode (default) or files\n" in p.stdout
    assert "  --frame_size=()   H, W: 256x320, 256,320 or (256, 320)" in p.stdout


# -----------------------------------------------------------------------------
# command lines

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "syn"
    make_synthetic(str(root), episodes=4, cameras=4, frames=20, size=(H, W), seed=0, val_episodes=2, workers=1)
    return root


def write_checkpoint(path, net, cameras, data_root="datasets/synthetic"):
    """A consolidated file in the official layout ({"net.<key>"}) with train.py's run config beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net." + k: v for k, v in net.state_dict().items()}, path)
    train_cfg = dict(data_root=str(data_root), val_split="val", cameras=list(cameras), num_frames=13,
                     frame_size=[H, W], frame_stride=1, action_scale=20.0, gripper_scale=1.0, fps=4,
                     tokenizer="pixel", tokenizer_path="", pixel_factor=8, cond_t=-1.0)
    path.with_suffix(".json").write_text(json.dumps({"model": model.config_dict(net.cfg), "train": train_cfg}))
    return path


@pytest.fixture(scope="module")
def ckpt2(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ck") / "model" / "iter_000000010.pt", tiny_net(init=True), (0, 1))


def test_args_forms():
    c = sample.parse_args(["--eval", "--num_steps", "4", "--compare=True", "--disable_guardrail", "--seed=3"])
    assert c["eval"] is True and c["compare"] is True and c["disable_guardrail"] is True
    assert c["num_steps"] == 4 and c["seed"] == 3
    assert sample.parse_args([])["eval"] is False                        # defaults are not mutated by a call
    with pytest.raises(Exception, match="num_step"):
        sample.parse_args(["--num_step", "4"])


def test_guide_command(synth, tmp_path, monkeypatch, capsys):
    """The command of the project's guide, verbatim, on datasets/multiview_action/{annotations,videos/cam0..cam3}."""
    monkeypatch.chdir(tmp_path)
    ds = Path("datasets/multiview_action")
    (ds / "annotations").mkdir(parents=True)
    shutil.copy(synth / "annotations" / "val" / "ep00002.json", ds / "annotations" / "example.json")
    for k in range(4):
        (ds / "videos" / f"cam{k}").mkdir(parents=True)
        shutil.copy(synth / "videos" / f"cam{k}" / "ep00002.mp4", ds / "videos" / f"cam{k}" / "example.mp4")
    ckpt = Path("checkpoints/posttraining/multiview_action/2b/checkpoints/model/iter_000001000.pt")
    write_checkpoint(ckpt, tiny_net(init=True), (0, 1, 2, 3))
    guide = ("--model_size 2B --dit_path checkpoints/posttraining/multiview_action/2b/checkpoints/model/"
             "iter_000001000.pt --input_path datasets/multiview_action/videos/cam0/example.mp4 --annotation "
             "datasets/multiview_action/annotations/example.json --num_conditional_frames 1 "
             "--save_path output/multiview_action_result.mp4").split()
    sample.main(guide + ["--num_steps", "2", "--disable_guardrail"])
    assert "nothing to disable" in capsys.readouterr().out
    frames = read_mp4("output/multiview_action_result.mp4")
    assert frames.shape == (20, 2 * H, 2 * W, 3)                         # whole trajectory, 2x2 grid of 4 cameras
    assert read_png("output/multiview_action_result.png").shape[0] == 2 * H
    # --key=value spelling, and --compare: ground truth on the right
    eq = [f"{a}={b}" for a, b in zip(guide[::2], guide[1::2])]
    sample.main(eq + ["--num_steps=2", "--compare", "--save_path=output/cmp.mp4"])
    assert read_mp4("output/cmp.mp4").shape == (20, 2 * H, 4 * W + sample.SEPARATOR, 3)


def test_irasim_layout_and_batch(synth, ckpt2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path("bridge_like")
    names = []
    for name in ("ep00002", "ep00003"):
        ann = json.loads((synth / "annotations" / "val" / f"{name}.json").read_text())
        ann["videos"] = []
        for k in range(2):
            rel = f"videos/val/{name}/rgb{k}.mp4"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(synth / "videos" / f"cam{k}" / f"{name}.mp4", root / rel)
            ann["videos"].append({"video_path": rel})
        (root / "annotation" / "val").mkdir(parents=True, exist_ok=True)
        (root / "annotation" / "val" / f"{name}.json").write_text(json.dumps(ann))
        names.append(name)
    out = sample.main(["--dit_path", str(ckpt2), "--annotation", str(root / "annotation/val/ep00002.json"),
                       "--cameras", "(0, 1)", "--num_steps", "2", "--save_path", "one.mp4"])
    assert read_mp4("one.mp4").shape == (20, H, 2 * W, 3) and out[0][1].shape == (2, 3, 20, H, W)
    # a JSON list of episodes runs them all: IRASim and camera-folder entries, default and explicit outputs
    batch = [str(root / "annotation/val/ep00002.json"),
             {"annotation": str(synth / "annotations" / "val" / "ep00003.json"), "save_path": "b/three.mp4"}]
    Path("batch.json").write_text(json.dumps(batch))
    out = sample.main(["--dit_path", str(ckpt2), "--annotation", "batch.json", "--num_steps", "2",
                       "--save_path", "b/run.mp4", "--max_actions", "7"])
    assert [str(p) for p, _ in out] == ["b/run_ep00002.mp4", "b/three.mp4"]
    assert read_mp4("b/three.mp4").shape == (8, H, 2 * W, 3) and Path("b/three.png").is_file()
    # a folder of annotations is a batch too
    out = sample.main(["--dit_path", str(ckpt2), "--annotation", str(root / "annotation/val"), "--num_steps", "1",
                       "--max_actions", "3", "--save_path", "c/x.mp4"])
    assert [p.name for p, _ in out] == ["x_ep00002.mp4", "x_ep00003.mp4"]


@pytest.mark.skipif(not BRIDGE.is_dir(), reason="shared/bridge_samples not available")
def test_real_bridge_episode(tmp_path, monkeypatch):
    """A real Bridge episode (IRASim layout, 640x480 mp4v) with a single-camera model: resized to the run's size."""
    monkeypatch.chdir(tmp_path)
    ckpt = write_checkpoint(tmp_path / "m.pt", tiny_net(init=True), (0,))
    ann = BRIDGE / "annotation" / "test" / "0.json"
    T = len(json.loads(ann.read_text())["state"])
    out = sample.main(["--dit_path", str(ckpt), "--annotation", str(ann), "--num_steps", "1", "--save_path", "b.mp4"])
    assert out[0][1].shape == (1, 3, T, H, W) and read_mp4("b.mp4").shape == (T, H, W, 3)


def test_clear_errors(synth, ckpt2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import convert
    with pytest.raises(configurator.UserError, match="nope/ckpt: no such file"):
        sample.main(["--dit_path", "nope/ckpt"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"continuous_gripper_state": [0, 0]}))
    with pytest.raises(configurator.UserError, match=r"bad\.json.*'state'"):
        sample.main(["--dit_path", str(ckpt2), "--annotation", str(bad), "--input_path",
                     str(synth / "videos/cam0/ep00002.mp4")])
    # camera 1's file missing: named
    (tmp_path / "v" / "cam0").mkdir(parents=True)
    shutil.copy(synth / "videos/cam0/ep00002.mp4", tmp_path / "v" / "cam0" / "ep.mp4")
    with pytest.raises(FileNotFoundError, match=r"camera 1: .*cam1/ep\.mp4"):
        sample.main(["--dit_path", str(ckpt2), "--annotation", str(synth / "annotations/val/ep00002.json"),
                     "--input_path", str(tmp_path / "v" / "cam0" / "ep.mp4")])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        sample.main(["--dit_path", str(ckpt2), "--annotation", "missing.json"])
    with pytest.raises(ValueError, match="num_conditional_frames"):
        sample.main(["--dit_path", str(ckpt2), "--num_conditional_frames", "5"])


# -----------------------------------------------------------------------------
# the default run: `python train.py` then a bare `python sample.py`

def test_default_run_then_bare_sample(tmp_path):
    """train.py with its default out_dir / data_root (a tiny, 2-step version), then `python sample.py` with no
    arguments: an mp4 of the whole first val episode, 2 cameras side by side, and the PNG strip."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    make_synthetic(str(tmp_path / "datasets" / "synthetic"), episodes=4, cameras=2, frames=20, size=(H, W),
                        seed=0, val_episodes=2, workers=1)
    tiny = ["--model_channels=32", "--num_blocks=2", "--num_heads=2", f"--frame_size=({H}, {W})", "--batch_size=2",
            "--num_workers=0", "--eval_interval=0", "--warmup_iters=1", "--max_iters=2"]
    for cmd in ([str(ROOT / "train.py")] + tiny, [str(ROOT / "sample.py")]):
        p = subprocess.run([sys.executable] + cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 0, f"{cmd[0]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "s/chunk" in p.stdout and "ms/denoising step" in p.stdout
    frames = read_mp4(tmp_path / "output" / "sample.mp4")
    assert frames.shape == (20, H, 2 * W, 3)
    gt = torch.stack([data.read_frames(tmp_path / f"datasets/synthetic/videos/cam{k}/ep00002.mp4", [0], (H, W))[0]
                      for k in range(2)]).permute(0, 2, 3, 1).numpy()
    left, right = frames[0, :, :W], frames[0, :, W:]

    def err(a, b):
        return np.abs(a.astype(float) - b.astype(float)).mean()

    assert err(left, gt[0]) < 6 and err(right, gt[1]) < 6               # frame 0 is the given frame, cam0 left
    assert err(left, gt[1]) > err(left, gt[0])
    strip = read_png(tmp_path / "output" / "sample.png")
    assert strip.shape == (H, 8 * 2 * W + 7 * sample.SEPARATOR, 3)


# -----------------------------------------------------------------------------
# Predict2.5: family defaults, text context, the official inference command, bf16

def tiny_p25(seed=0, views=0, action_mode="per_frame"):
    """A tiny Predict2.5-shaped net: per-frame actions, crossattn_proj 24 -> 16, 1000-scale timesteps."""
    torch.manual_seed(seed)
    cfg = model.DiTConfig(model_channels=32, num_blocks=2, num_heads=2, adaln_lora_dim=8, crossattn_emb_channels=16,
                          crossattn_proj_in_channels=24, timestep_scale=0.001, in_channels=12, out_channels=12,
                          action_mode=action_mode, n_views_emb=views)
    return model.DiT(cfg).eval()


@pytest.mark.parametrize("fixture", sorted(p.stem for p in (ROOT / "tests" / "fixtures").glob("dit_*.safetensors")))
def test_family_defaults_for_official_files(fixture, tmp_path, capsys):
    """`--dit_path <official file>` without a run config: the family (from the file) picks resolution, conditioning
    and sampler, and one line says what was assumed. Files laid out like releases, from the fixtures' weights."""
    from test_convert import official_file
    official_file(fixture, tmp_path / "model.pt")
    family = json.loads((ROOT / "tests" / "fixtures" / f"{fixture}.json").read_text())["source"]["repo"]
    net, s, _, common = evaluate.setup(sample.parse_args(["--dit_path", str(tmp_path / "model.pt"), "--tokenizer=pixel"]))
    out = capsys.readouterr().out
    if family.endswith("cosmos-predict2.5"):
        assert s["frame_size"] == (256, 320) and s["cond_t"] is None and s["sampler"] == "unipc"
        assert "predict2.5 defaults assumed (256x320, conditioned frames clean at the same t" in out
        assert "unipc 35 steps shift 5" in out and out.count("warning: no --text_embedding") == 1
    else:
        assert s["frame_size"] == (480, 640) and s["cond_t"] == pytest.approx(1e-4 / (1 + 1e-4))
        assert s["sampler"] == "ab2" and "predict2 defaults assumed (480x640, conditioned frames at sigma 1e-4" in out
        assert "warning" not in out
    assert common["amp"] is None                                           # CPU: float32


@pytest.mark.skipif(not BRIDGE.is_dir(), reason="shared/bridge_samples not available")
def test_p25_net_samples_with_unipc_by_default(tok, tmp_path, capsys):
    net = tiny_p25()
    torch.save({"net." + k: v for k, v in net.state_dict().items()}, tmp_path / "p25.pt")
    (video_path, video), = sample.main(["--dit_path", str(tmp_path / "p25.pt"), "--tokenizer=pixel",
                                        f"--frame_size=({H}, {W})", "--cameras=(0,)", "--num_steps=3",
                                        "--annotation", str(BRIDGE / "annotation/test/0.json"), "--max_actions=12",
                                        "--save_path", str(tmp_path / "p25.mp4")])
    assert "unipc 3 steps shift 5" in capsys.readouterr().out
    first = data.read_frames(BRIDGE / "videos/test/0/rgb.mp4", [0], (H, W))[None, None, 0]
    actions = torch.from_numpy(data.compute_actions(*[np.asarray(json.loads(
        (BRIDGE / "annotation/test/0.json").read_text())[k]) for k in ("state", "continuous_gripper_state")]))
    want = sample.rollout(net, tok, first, actions[None, :12], num_steps=3, sampler="unipc", progress=False)[0]
    assert torch.equal(video, want)


def test_text_embedding(tok, tmp_path):
    """A text context file: either width, loaded once, broadcast over the batch; a wrong width is one line naming
    the file. Guidance has an effect for a Predict2.5 net once the two branches see different text."""
    import convert
    from safetensors.torch import save_file
    net = tiny_p25()
    raw = torch.randn(1, 8, 24)
    save_file({"text_embedding": raw}, str(tmp_path / "raw.safetensors"))
    with torch.no_grad():
        save_file({"x": net.crossattn_proj(raw)[0].contiguous()}, str(tmp_path / "proj.safetensors"))
    save_file({"x": torch.randn(8, 20)}, str(tmp_path / "bad.safetensors"))
    a = convert.load_text_embedding(tmp_path / "raw.safetensors", net.cfg)
    b = convert.load_text_embedding(tmp_path / "proj.safetensors", net.cfg)
    assert a.shape == (1, 8, 24) and b.shape == (1, 8, 16)
    with pytest.raises(configurator.UserError, match=r"bad\.safetensors: text embedding of shape \[1, 8, 20\]"):
        convert.load_text_embedding(tmp_path / "bad.safetensors", net.cfg)
    first, actions = first_and_actions(B=2, V=1, N=12)
    kw = dict(num_steps=3, sampler="unipc", progress=False)
    va = sample.rollout(net, tok, first, actions, crossattn_emb=a, **kw)
    vb = sample.rollout(net, tok, first, actions, crossattn_emb=b, **kw)
    assert (va.int() - vb.int()).abs().max() <= 1                           # same context, either width
    assert torch.equal(sample.rollout(net, tok, first[:1], actions[:1], crossattn_emb=a, **kw), va[:1])  # broadcast
    zero = sample.rollout(net, tok, first, actions, **kw)
    assert (zero.int() - va.int()).abs().float().mean() > 1                 # the text matters
    guided = sample.rollout(net, tok, first, actions, crossattn_emb=a, guidance=3.0, **kw)
    assert (guided.int() - va.int()).abs().float().mean() > 1               # cond + 3 (cond - uncond(zeros))


def official_checkpoint(folder):
    """A post-trained Predict2.5-shaped checkpoint as `convert.py export` writes it: model_ema_bf16.pt + config.json."""
    net = tiny_p25()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"net." + k: v.bfloat16() for k, v in net.state_dict().items()}, folder / "model_ema_bf16.pt")
    train_cfg = dict(tokenizer="pixel", pixel_factor=8, fps=4, num_frames=13, cameras=[0])
    (folder / "config.json").write_text(json.dumps({"model": model.config_dict(net.cfg), "train": train_cfg}))
    return folder / "model_ema_bf16.pt"


@pytest.mark.skipif(not BRIDGE.is_dir(), reason="shared/bridge_samples not available")
def test_official_inference_command(tmp_path, monkeypatch, capsys):
    """The Predict2.5 guide's command as written, on the Bridge samples, with a params file shaped like the official
    assets/action_conditioned/basic/inference_params.json (input_root and resolution changed: tiny net, fast)."""
    monkeypatch.chdir(tmp_path)
    ckpt = official_checkpoint(tmp_path / "ck")
    params = dict(name="basic", input_root=str(BRIDGE), input_json_sub_folder="annotation/test",
                  save_root="outputs/action_conditioned/basic", guidance=0, resolution=f"{H},{W}", camera_id=0,
                  start=0, end=2, fps_downsample_ratio=1, gripper_scale=1.0, gripper_key="continuous_gripper_state",
                  state_key="state", reverse=False, single_chunk=False, start_frame_idx=0, save_fps=20,
                  num_latent_conditional_frames=1, action_scaler=20.0, use_quat=False,
                  action_load_fn="cosmos_predict2.action_conditioned.load_default_action_fn",
                  negative_prompt="The video captures a series of frames showing ugly scenes", seed=0, prompt=None)
    Path("inference_params.json").write_text(json.dumps(params))
    cmd = ["-i", "inference_params.json", "-o", "outputs/action_conditioned/basic", "--checkpoint-path", str(ckpt),
           "--experiment", "ac_reason_embeddings_rectified_flow_2b_256_320"]
    outs = sample.main(cmd + ["--num_steps=2"])
    printed = capsys.readouterr().out
    assert "not honoured" not in printed                                  # every field of the example is honoured
    names = sorted(p.stem for p in (BRIDGE / "annotation/test").glob("*.json"))[:2]
    assert [p for p, _ in outs] == [Path(f"outputs/action_conditioned/basic/{n}_chunk.mp4") for n in names]
    for (path, video), n in zip(outs, names):
        N = len(json.loads((BRIDGE / f"annotation/test/{n}.json").read_text())["state"]) - 1
        T = 13 + 12 * (math.ceil(N / 12) - 1)   # the official layout: chunk 0's 13 frames + 12 of each later chunk
        assert video.shape == (1, 3, T, H, W) and read_mp4(path).shape == (T, H, W, 3)
        with av.open(str(path)) as c:
            assert c.streams.video[0].average_rate == 20                   # save_fps
    assert json.loads(Path("outputs/action_conditioned/basic/nanocosmos_settings.json").read_text())["not_honoured"] == []
    # run again: existing videos are skipped, as official; single_chunk from frame 3, and unhonoured fields named once
    params.update(single_chunk=True, start_frame_idx=3, action_load_fn="my.loader", use_quat=True, prompt="a robot",
                  guidance=3, end=1)
    Path("inference_params.json").write_text(json.dumps(params))
    (path, video), = sample.main(cmd + ["--num_steps=2"])
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if "not honoured" in line]
    assert len(warnings) == 1 and all(k in warnings[0] for k in ("action_load_fn='my.loader'", "use_quat=True",
                                                                 "prompt", "negative_prompt"))
    assert path.name == f"{names[0]}_single_chunk.mp4" and video.shape == (1, 3, 13, H, W)
    # chunk i is seeded with its first action index, as official: the rollout from frame 3 uses seed 3; the
    # guide's experiment samples on the Karras grid, with the official conversions and layout
    import convert
    import official
    ann = json.loads((BRIDGE / f"annotation/test/{names[0]}.json").read_text())
    actions = torch.from_numpy(data.compute_actions(np.asarray(ann["state"]), np.asarray(ann["continuous_gripper_state"])))
    first = official.lanczos(data.read_frames(BRIDGE / ann["videos"][0]["video_path"], [3])[0], (H, W))[None, None]
    chunks = []
    sample.rollout(convert.load_dit(ckpt)[0], vae.load_tokenizer("pixel", None, spatial_factor=8), first,
                   actions[None, 3:15], num_steps=2, sampler="unipc", seed=3, progress=False, sigma_grid="karras",
                   official=True, chunks=chunks)
    assert torch.equal(video, official.official_layout(chunks))
    sample.main(cmd + ["--num_steps=2"])
    assert "exists, skipped" in capsys.readouterr().out


def test_bf16_rollout_close_to_fp32(tok):
    """bf16 autocast (here on CPU; CUDA uses the same autocast) against float32, 2 chunks of a tiny Predict2.5 net
    with the UniPC sampler. Measured (torch 2.13, 2-core CPU): mean |diff| 0.14 uint8 levels, max 1; bound 2x."""
    net = tiny_p25()
    first, actions = first_and_actions(B=1, V=2, N=24)
    kw = dict(num_steps=8, sampler="unipc", progress=False)
    fp32 = sample.rollout(net, tok, first, actions, **kw)
    bf16 = sample.rollout(net, tok, first, actions, amp=torch.bfloat16, **kw)
    diff = (fp32.float() - bf16.float()).abs()
    print(f"bf16 vs fp32 rollout: mean |diff| {diff.mean():.3f}, max {diff.max():.0f} uint8 levels")
    assert 0 < diff.mean() < 0.3 and diff.max() <= 2


def test_command_line_errors_are_one_line(synth, ckpt2, tmp_path, capsys):
    """Known errors: one line 'error: <file>: <problem>', exit 1, no traceback (checked in-process through the
    script's entry point, and once as a real subprocess); output problems are found before the checkpoint is even
    read (nothing printed before the error)."""
    import convert
    (tmp_path / "afile").write_text("")
    (tmp_path / "exists.mp4").write_text("")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"continuous_gripper_state": [0, 0]}))
    cases = [(["--dit_path", str(tmp_path / "nope.pt"), "--save_path", str(tmp_path / "o.mp4")],   # (only under tmp)
              f"error: {tmp_path / 'nope.pt'}: no such file"),
             (["--dit_path", str(ckpt2), "--save_path", str(tmp_path / "afile" / "x.mp4")],
              f"error: {tmp_path / 'afile'}: cannot create the output folder"),
             (["--dit_path", str(ckpt2), "--save_path", str(tmp_path / "exists.mp4")],
              f"error: {tmp_path / 'exists.mp4'}: exists; pass --overwrite"),
             (["--dit_path", str(ckpt2), "--annotation", str(bad), "--input_path",
               str(synth / "videos/cam0/ep00002.mp4"), "--save_path", str(tmp_path / "o.mp4")],
              f"error: {bad}: "),
             (["--dit_path", str(ckpt2), "--sampler", "heun", "--save_path", str(tmp_path / "o.mp4")],
              "error: --sampler='heun': must be one of")]
    for args, want in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sample.cli(args)
        assert str(e.value.code).startswith(want) and "\n" not in str(e.value.code), (args, e.value.code)
        if "output folder" in want or "overwrite" in want:
            assert capsys.readouterr().out == ""                           # refused before any work
    p = subprocess.run([sys.executable, str(ROOT / "sample.py")] + cases[1][0], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.strip().startswith(cases[1][1]) and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_guidance_formula_follows_the_family(tok):
    """At guidance 0 the action model (cond + g (cond - uncond)) is its conditional branch; the Predict2.5 multi-view
    video model (uncond + g (cond - uncond)) is its unconditional one."""
    first, actions = first_and_actions(V=2, N=12)
    text = torch.randn(1, 2 * 512, 24)
    kw = dict(num_steps=2, sampler="unipc", progress=False)
    for net, anchored_on_uncond in ((tiny_p25(views=7), False), (tiny_p25(views=7, action_mode="none"), True)):
        both = sample.rollout(net, tok, first, actions, crossattn_emb=text, **kw)
        cond_only = sample.rollout(net, tok, first, actions, crossattn_emb=text, neg_crossattn_emb=text, **kw)
        uncond_only = sample.rollout(net, tok, first, actions, **kw)
        assert torch.equal(both, uncond_only if anchored_on_uncond else cond_only)
        assert not torch.equal(cond_only, uncond_only)
