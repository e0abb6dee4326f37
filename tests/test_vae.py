"""vae.py: parity with the official Wan2.1 VAE (data-driven over tests/fixtures/vae*.safetensors), the real
configuration's size and key names, causal chunking, bf16, loading, the pixel tokenizer, and input errors."""
import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vae
from configurator import UserError

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("vae*.safetensors"))
# Required agreement with the official float32 outputs (fixtures/README.md).
LATENT_MAX_ABS = 2e-6
VIDEO_MAX_ABS, VIDEO_REL_L2 = 2e-5, 2e-6


@functools.lru_cache(maxsize=None)
def fixture(path):
    """(tensors, sidecar, WanVAE built from the sidecar's constructor kwargs with the fixture's weights)."""
    tensors = load_file(str(path))
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["dtype"] == "float32" and sidecar["device"] == "cpu"
    model = vae.WanVAE(**sidecar["constructor_kwargs"]["VAE_"])
    model.load_state_dict({k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")},
                          strict=True)
    assert sum(p.numel() for p in model.parameters()) == sidecar["num_parameters"]
    return tensors, sidecar, model.eval().requires_grad_(False)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture
def tiny():
    return fixture(FIXTURES[0])


def test_fixtures_found():
    assert FIXTURES, "no tests/fixtures/vae*.safetensors"


# ----------------------------------------------------------------------------- parity with the official code

@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_parity_with_official(path):
    t, _, model = fixture(path)
    assert torch.equal(t["constants.latents_mean"], torch.tensor(vae.LATENT_MEAN))
    assert torch.equal(t["constants.latents_std"], torch.tensor(vae.LATENT_STD))

    mu = model.encode_mu(t["inputs.video"])
    z = model.encode(t["inputs.video"])
    assert mu.shape == z.shape == t["outputs.latent_normalized"].shape
    assert max_abs(mu, t["outputs.latent_mean_unnormalized"]) <= LATENT_MAX_ABS
    assert max_abs(z, t["outputs.latent_normalized"]) <= LATENT_MAX_ABS

    cases = [("inputs.latent_to_decode", "outputs.decoded_video"),
             ("outputs.latent_normalized", "outputs.decoded_video_from_latent_normalized")]  # 2nd is optional
    for latent, video in [(a, b) for a, b in cases if b in t]:
        out = model.decode(t[latent])
        assert out.shape == t[video].shape, video
        assert max_abs(out, t[video]) <= VIDEO_MAX_ABS, video
        assert rel_l2(out, t[video]) <= VIDEO_REL_L2, video


# ----------------------------------------------------------------------------- the real configuration

def test_real_config_size_and_key_names():
    with torch.device("meta"):
        model = vae.WanVAE()
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 126_892_531
    assert len(sd) == 194 and {n for n, _ in model.named_buffers()} == {"latent_mean", "latent_std"}  # not saved
    assert sum(v.numel() for k, v in sd.items() if k.startswith("encoder.")) == 53_595_872
    assert sum(v.numel() for k, v in sd.items() if k.startswith("decoder.")) == 73_295_331
    expected = {  # from spec/vae.md section 1.3
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.downsamples.8.time_conv.bias": (384,),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.middle.0.residual.3.gamma": (384, 1, 1, 1),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.7.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.8.residual.2.weight": (192, 192, 3, 3, 3),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.upsamples.14.residual.6.bias": (96,),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    shortcuts = {k for k in sd if "shortcut" in k}
    assert shortcuts == {f"{m}.shortcut.{p}" for m in ("encoder.downsamples.3", "encoder.downsamples.6",
                                                      "decoder.upsamples.4") for p in ("weight", "bias")}
    assert (model.latent_channels, model.spatial_factor, model.temporal_factor) == (16, 8, 4)


# ----------------------------------------------------------------------------- causal chunking (memory)

def test_streaming_is_chunked_and_causal(tiny):
    t, sidecar, model = tiny
    video, z_ref = t["inputs.video"], t["outputs.latent_normalized"]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, args[0].shape[2])))
             for name, m in [("enc", model.encoder), ("dec", model.decoder)]]
    try:
        z = model.encode(video)
        model.decode(z)
    finally:
        for h in hooks:
            h.remove()
    T, w = video.shape[2], model.temporal_window
    # frame 0 alone then chunks of temporal_window frames (encode), one latent frame per call (decode), so
    # activations are those of one chunk whatever the clip length
    assert seen == [("enc", 1)] + [("enc", min(w, T - a)) for a in range(1, T, w)] + [("dec", 1)] * z.shape[2]

    # the chunk size changes scheduling only (here: one pass over frames 1..T-1)
    kwargs = dict(sidecar["constructor_kwargs"]["VAE_"], temporal_window=max(4, T - 1))
    one_pass = vae.WanVAE(**kwargs).eval()
    one_pass.load_state_dict(model.state_dict())
    assert max_abs(one_pass.encode(video), z_ref) <= LATENT_MAX_ABS

    # latent j depends only on frames <= 4j
    changed = video.clone()
    changed[:, :, 5:] = -changed[:, :, 5:]
    z_changed = model.encode(changed)
    assert torch.equal(z_changed[:, :, :2], z[:, :, :2])
    assert T <= 5 or not torch.equal(z_changed[:, :, 2:], z[:, :, 2:])


def test_micro_batch_does_not_change_results(tiny):
    t, _, model = tiny
    video = torch.cat([t["inputs.video"], t["inputs.video"].flip(-1)])  # views folded into the batch
    assert model.micro_batch == 1
    z1 = model.encode(video)
    assert max_abs(z1[:1], t["outputs.latent_normalized"]) <= LATENT_MAX_ABS
    model.micro_batch = 2
    try:
        z2, v2 = model.encode(video), model.decode(z1)
    finally:
        model.micro_batch = 1
    assert max_abs(z1, z2) <= LATENT_MAX_ABS
    # a batch of 2 runs other conv kernels; the decoder amplifies that rounding (measured max 2.7e-5, rel 2.5e-6)
    v1 = model.decode(z1)
    assert max_abs(v1, v2) <= 1e-4 and rel_l2(v1, v2) <= 1e-5
    assert torch.equal(v1[:1], model.decode(z1[:1]))


def test_bf16_close_to_fp32(tiny):
    t, sidecar, model = tiny
    bf16 = vae.WanVAE(**sidecar["constructor_kwargs"]["VAE_"]).to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    z = bf16.encode(t["inputs.video"])
    video = bf16.decode(t["inputs.latent_to_decode"])
    assert z.dtype == video.dtype == torch.bfloat16
    # Measured with the dim-4 fixture model (bf16 weights, bf16-rounded mean/std as Cosmos uses them):
    # latents max-abs 0.019, rel-L2 0.0098; video max-abs 0.35 (outputs up to 3.2), rel-L2 0.029. The real dim-96
    # model drifts less (spec: latent max ~0.015, decode max ~0.05); bounds leave ~2x room.
    assert max_abs(z, t["outputs.latent_normalized"]) < 0.05
    assert rel_l2(z, t["outputs.latent_normalized"]) < 0.02
    assert rel_l2(video, t["outputs.decoded_video"]) < 0.06


# ----------------------------------------------------------------------------- loading

def test_load_tokenizer_strict(tiny, tmp_path, capsys):
    t, sidecar, model = tiny
    kwargs = sidecar["constructor_kwargs"]["VAE_"]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "tokenizer.pth")
    loaded = vae.load_tokenizer("wan2.1", str(tmp_path / "tokenizer.pth"), **kwargs)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.encode(t["inputs.video"]), model.encode(t["inputs.video"]))

    broken = dict(sd)
    del broken["decoder.head.2.bias"]
    broken["decoder.head.2.extra"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"broken.pth: .*1 keys missing, e.g. \['decoder.head.2.bias'\]; 1 unexpected"):
        vae.load_tokenizer("wan2.1", str(tmp_path / "broken.pth"), **kwargs)
    torch.save({"vae." + k: v for k, v in sd.items()}, tmp_path / "prefixed.pth")
    with pytest.raises(UserError, match="prefixed.pth: not a Wan2.1 VAE"):
        vae.load_tokenizer("wan2.1", str(tmp_path / "prefixed.pth"), **kwargs)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"text.pth: not a Wan2.1 VAE state dict") as e:
        vae.load_tokenizer("wan2.1", str(tmp_path / "text.pth"))
    assert "\n" not in str(e.value)

    rand = vae.load_tokenizer("wan2.1", None, dtype=torch.bfloat16, **kwargs)
    assert "RANDOM weights" in capsys.readouterr().out
    assert next(rand.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown tokenizer"):
        vae.load_tokenizer("wan2.2")


# ----------------------------------------------------------------------------- pixel tokenizer

def test_pixel_tokenizer_layout_and_round_trip():
    s = 4
    tok = vae.load_tokenizer("pixel", spatial_factor=s)
    assert (tok.latent_channels, tok.spatial_factor, tok.temporal_factor) == (12, 4, 4)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    z = tok.encode(x)
    assert z.shape == (2, 12, 3, 4, 6) and z.dtype == torch.float32

    pooled = x.reshape(2, 3, 9, 4, s, 6, s).mean(dim=(4, 6))  # (B, 3, T, h, w)
    for c in range(3):
        for f in range(4):  # channel 3f+c: colour c of frame f of the group; group 0 = frame 0 four times
            torch.testing.assert_close(z[:, 3 * f + c, 0], 2 * pooled[:, c, 0])
            for j in (1, 2):
                torch.testing.assert_close(z[:, 3 * f + c, j], 2 * pooled[:, c, 1 + 4 * (j - 1) + f])

    # the documented loss: spatial detail inside each s x s block, nothing else
    x_hat = tok.decode(z)
    torch.testing.assert_close(x_hat, pooled.repeat_interleave(s, 3).repeat_interleave(s, 4))
    torch.testing.assert_close(tok.encode(x_hat), z)  # encode(decode(z)) == z on encode's range
    z_any = torch.randn_like(z)  # elsewhere: latent 0 becomes the mean of its 4 copies, latents 1.. are kept
    z_back = tok.encode(tok.decode(z_any))
    torch.testing.assert_close(z_back[:, :, 1:], z_any[:, :, 1:])
    torch.testing.assert_close(z_back[:, :, 0], z_any[:, :, 0].unflatten(1, (4, 3)).mean(1).repeat(1, 4, 1, 1))
    blocky = pooled.repeat_interleave(s, 3).repeat_interleave(s, 4)
    torch.testing.assert_close(tok.decode(tok.encode(blocky)), blocky)

    bf16 = vae.load_tokenizer("pixel", dtype=torch.bfloat16)
    assert bf16.encode(torch.zeros(1, 3, 5, 16, 16)).dtype == torch.bfloat16


def test_pixel_latent_scale_is_near_unit_for_smooth_video():
    # natural frames are spatially smooth, so pooling keeps their spread; scale 2 maps std ~0.5 to ~1
    t = torch.linspace(0, 1, 13)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 80), indexing="ij")
    video = torch.stack([torch.sin(3 * xx + 2 * t[:, None, None] + k) * 0.8 for k in range(3)])[None]
    z = vae.PixelTokenizer().encode(video)
    assert z.shape == (1, 12, 4, 8, 10)
    assert 0.7 < z.std().item() < 1.4


# ----------------------------------------------------------------------------- input errors

def test_latent_frames():
    assert [vae.latent_frames(n) for n in (1, 5, 13, 29, 93)] == [1, 2, 4, 8, 24]
    for n in (0, 2, 8, 12):
        with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
            vae.latent_frames(n)


@pytest.mark.parametrize("kind", ["wan", "pixel"])
def test_bad_inputs(tiny, kind):
    tok = tiny[2] if kind == "wan" else vae.PixelTokenizer()
    C = tok.latent_channels
    bad_videos = {
        "must be \\(B, 3, T, H, W\\)": torch.zeros(3, 5, 16, 16),
        "RGB": torch.zeros(1, 4, 5, 16, 16),
        "1 \\+ 4\\*k": torch.zeros(1, 3, 8, 16, 16),
        "multiples of 8": torch.zeros(1, 3, 5, 20, 16),
        "float": torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8),
    }
    for message, video in bad_videos.items():
        with pytest.raises(ValueError, match=message):
            tok.encode(video)
    for message, latent in {f"\\(B, {C}, t, h, w\\)": torch.zeros(1, C + 1, 2, 2, 2),
                            "got shape": torch.zeros(C, 2, 2, 2)}.items():
        with pytest.raises(ValueError, match=message):
            tok.decode(latent)


def test_encode_batched_equals_one_by_one(tiny):
    """All B x V clips of a step in few calls (uint8 in, converted as the training step does) equal encoding each clip
    on its own, to float rounding for the VAE and exactly for the pixel tokenizer; the call count follows max_batch."""
    t, _, model = tiny
    video = t["inputs.video"]
    u8 = torch.cat([video, video.flip(-1), video.flip(-2), -video, video.roll(3, -1)]).add(1).mul(127.5).round()
    u8 = u8.clamp(0, 255).to(torch.uint8)                                        # 5 clips, uint8 like the loader's
    one_by_one = torch.cat([model.encode(x.float().div(127.5).sub(1.0)) for x in u8.split(1)])
    calls = []
    real = model.encode  # count the tokenizer calls by wrapping encode on the instance
    model.encode = lambda x, micro_batch=None: (calls.append(len(x)), real(x, micro_batch))[1]
    try:
        for max_batch, expect_calls in [(2, [2, 2, 1]), (5, [5]), (None, [5])]:
            calls.clear()
            z = vae.encode_batched(model, u8, max_batch)
            assert calls == expect_calls and z.shape == one_by_one.shape
            assert max_abs(z, one_by_one) <= LATENT_MAX_ABS
    finally:
        del model.encode
    pixel = vae.load_tokenizer("pixel")
    assert torch.equal(vae.encode_batched(pixel, u8, 2), torch.cat([pixel.encode(x.float() / 127.5 - 1) for x in u8.split(1)]))


def test_encode_micro_batch_bounds_memory(tiny):
    _, _, model = tiny
    per_sample = vae.ENCODE_BYTES_PER_PIXEL * 256 * 320 * 4
    assert vae.encode_micro_batch(model, 256, 320, memory_budget=10 * per_sample + 1) == 10
    assert vae.encode_micro_batch(model, 256, 320, memory_budget=1) == 1       # never zero
    assert vae.encode_micro_batch(vae.load_tokenizer("pixel"), 256, 320, 1) > 1 << 20  # no activations to bound


def test_wan_width_inferred_from_the_file():
    """issue 21 item 4: the e2e fixture's tokenizer.pth is dim 4 (the release: 96); no setting names the width."""
    path = Path(__file__).parent / "fixtures" / "e2e_action_p25" / "tokenizer.pth"
    tok = vae.load_tokenizer("wan2.1", str(path))
    assert tok.encoder.conv1.weight.shape[0] == 4 and tok.latent_channels == 16
    assert tok.latent_mean.device.type == "cpu" and tok.latent_mean.shape == (1, 16, 1, 1, 1)
