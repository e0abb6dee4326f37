"""The official -i command (official.py) end to end against the official tool's own frames
(tests/fixtures/e2e_action_p25, issue 21): data-driven over every `<case>.<episode>.final_video_uint8` of
official_outputs.safetensors, so a new case of the same form (another episode, guidance, grid) is tested with no
code change. The command runs as a user runs it (sample.main with the guide's flags, from the fixture folder)."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import official
import sample
from configurator import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "e2e_action_p25"
GUIDE_EXPERIMENT = "ac_reason_embeddings_rectified_flow_2b_256_320"
OUTPUTS = load_file(FIXTURE / "official_outputs.safetensors") if FIXTURE.exists() else {}
CASES = sorted({k.rsplit(".", 1)[0] for k in OUTPUTS if k.endswith(".final_video_uint8")})
try:
    import PIL  # noqa: F401
    MIN_PSNR = 45.0       # with Pillow: the official Lanczos resize, measured 77 dB
except ImportError:
    MIN_PSNR = 40.0       # without: a bilinear conditioning frame (official.lanczos says so), measured 42.7 dB


def psnr(a, b):
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def guide_command(case, extra=()):
    """The guide's command with this case's grid: the run json says what the official config composed."""
    run = json.loads((FIXTURE / f"official_{case}_run.json").read_text())
    grid = "karras" if run["composed"]["use_kerras_sigma_at_inference"] == "True" else "linear"
    return ["-i", "inference_params.json", "-o", "out", "--checkpoint-path", "model_ema_fp32.pt",
            "--experiment", GUIDE_EXPERIMENT, "--tokenizer_path", "tokenizer.pth",
            "--text_embedding", "text_prompt.safetensors", "--negative_text_embedding", "text_negative.safetensors",
            "--save_frames", *([] if grid == "karras" else ["--sigma_grid", grid]), *extra]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    shutil.copytree(FIXTURE, tmp_path / "e2e")
    monkeypatch.chdir(tmp_path / "e2e")
    return tmp_path / "e2e"


@pytest.mark.parametrize("case_episode", CASES)
def test_official_command_reproduces_official_frames(folder, case_episode, capsys):
    case, episode = case_episode.split(".")
    sample.main(guide_command(case))
    out = capsys.readouterr().out
    assert "official conventions: sigma grid" in out and "truncating uint8" in out
    params = json.loads((folder / "inference_params.json").read_text())
    got = load_file(folder / params["save_root"] / f"{episode}_chunk.safetensors")["video"][0].permute(1, 2, 3, 0)
    ref = OUTPUTS[f"{case_episode}.final_video_uint8"]
    assert got.shape == ref.shape                                   # the official layout: same frame count
    level = (got.float() - ref.float()).abs().max().item()
    print(f"{case_episode}: PSNR {psnr(got, ref):.1f} dB, max {level:.0f} levels")
    assert psnr(got, ref) >= MIN_PSNR
    assert (folder / params["save_root"] / f"{episode}_chunk.mp4").is_file()


@pytest.mark.parametrize("case_episode", CASES[:1])
def test_lanczos_equals_the_official_conditioning_frame(case_episode):
    pytest.importorskip("PIL")
    ann = data.parse_annotation(FIXTURE / "data" / "annotation" / "test" / f"{case_episode.split('.')[1]}.json")
    video = FIXTURE / "data" / ann["json"]["videos"][0]["video_path"]
    frame = official.lanczos(data.read_frames(video, [0])[0], (256, 320))
    assert torch.equal(frame.permute(1, 2, 0), OUTPUTS[f"{case_episode}.initial_frame_uint8"])


def test_karras_grid_equals_official_set_timesteps():
    """fm_solvers_unipc.py:170-179 with 35 steps: 36 timesteps from 995 (the ladder keeps its N + 1 rungs)."""
    ts, sig = sample.unipc_schedule(35, 5.0, "karras")
    assert len(ts) == 36 and ts[0].item() == 995 and ts[-1].item() == 9 and sig[-1].item() == 0
    assert sig[0].item() == pytest.approx(200 / 201, abs=1e-6)
    assert torch.all(sig[1:] < sig[:-1])


def edit_params(folder, **fields):
    p = json.loads((folder / "inference_params.json").read_text())
    (folder / "inference_params.json").write_text(json.dumps({**p, **fields}))


@pytest.mark.parametrize("fields, message", [
    (dict(chunk_size="12"), r"inference_params.json: chunk_size='12': must be an integer"),
    (dict(guidance="7"), r"inference_params.json: guidance='7': must be a number"),
    (dict(resolution="256x320"), r"inference_params.json: resolution='256x320': must be \"H,W\""),
    (dict(start_frame_idx=500), r"inference_params.json: start_frame_idx=500: beyond .*a24.json \(25 frames\)"),
    (dict(chunk_size=8), r"inference_params.json: chunk_size=8: the checkpoint takes 12 actions per chunk"),
    (dict(start_frame_idx=20), r"a24.json: 4 actions from start_frame_idx 20: fewer than one chunk"),
])
def test_bad_params_are_one_line_naming_the_field(folder, fields, message):
    edit_params(folder, **fields)
    with pytest.raises(UserError, match=message) as e:
        sample.main(guide_command(CASES[0].split(".")[0]))
    assert "\n" not in str(e.value)
