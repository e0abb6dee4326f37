"""policy.py and synth.World: the steppable world equals the dataset's episodes, `sample.py --policy` (default-run
and IRASim checkpoints, replay bit for bit), one-line errors for bad policies, and --policy_eval's report. Tiny
models, 1 denoising step: seconds each."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import policy
import sample
import synth
from test_sample import BRIDGE, H, W, ckpt2, read_mp4, synth as synth_data, tiny_net, write_checkpoint  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def test_world_is_the_dataset_episode():
    """World.episode renders the dataset's first frame exactly; stepping it with the episode's own (scaled) actions
    retraces the episode's states and frames."""
    for i in range(3):
        rng = np.random.default_rng([0, i])
        state, gripper, scenes, _ = synth.simulate_episode(rng, 30, int(rng.integers(1, 4)))
        world = synth.World.episode(0, i)
        frames = [synth.render(synth.camera(k, (H, W)), *scenes[0]).transpose(2, 0, 1) for k in (0, 1)]
        assert np.array_equal(world.render((0, 1), (H, W)), np.stack(frames))
        for t, a in enumerate(data.compute_actions(state, gripper, 20.0, 1.0).astype(np.float64), start=1):
            world.act(a, 20.0, 1.0)
            assert np.allclose(world.state[:6], state[t, :6], atol=1e-5) and abs(world.g - gripper[t]) < 1e-6, t
        last = np.stack([synth.render(synth.camera(k, (H, W)), *scenes[-1]).transpose(2, 0, 1) for k in (0, 1)])
        assert np.abs(world.render((0, 1), (H, W)).astype(int) - last).mean() < 1


def test_policy_command_line_and_replay(synth_data, ckpt2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--dit_path", str(ckpt2), "--data_root", str(synth_data), "--num_steps", "1", "--max_actions", "14"]
    (out, video, used), = sample.main(args + ["--policy", f"{ROOT}/policy.py:reference", "--policy_arg", "servo",
                                              "--save_path", "a.mp4"])
    saved = json.loads(Path("a.actions.json").read_text())
    assert read_mp4("a.mp4").shape == (15, H, 2 * W, 3) and Path("a.png").is_file()
    assert np.array_equal(np.array(saved["actions"], dtype=np.float32), used.numpy()) and used.shape == (14, 7)
    assert saved["action_scale"] == 20.0 and saved["cameras"] == [0, 1]
    (_, again, used2), = sample.main(args + ["--policy", "policy:replay", "--policy_arg", "a.actions.json",
                                             "--save_path", "b.mp4"])
    assert torch.equal(again, video) and torch.equal(used2, used)   # replay: the same rollout, bit for bit


def test_policy_on_an_irasim_checkpoint(synth_data, tmp_path, monkeypatch):
    """A single-camera checkpoint on an IRASim (Bridge-format) annotation."""
    monkeypatch.chdir(tmp_path)
    ann = json.loads((synth_data / "annotations" / "val" / "ep00002.json").read_text())
    ann["videos"] = [{"video_path": "videos/val/0/rgb.mp4"}]
    (tmp_path / "videos/val/0").mkdir(parents=True)
    shutil.copy(synth_data / "videos/cam0/ep00002.mp4", tmp_path / "videos/val/0/rgb.mp4")
    (tmp_path / "annotation" / "val").mkdir(parents=True)
    (tmp_path / "annotation/val/0.json").write_text(json.dumps(ann))
    ckpt = write_checkpoint(tmp_path / "m.pt", tiny_net(init=True), (0,))
    (out, video, used), = sample.main(["--dit_path", str(ckpt), "--annotation", "annotation/val/0.json",
                                       "--policy", "policy:reference", "--policy_arg", "random", "--num_steps", "1"])
    assert video.shape == (1, 3, 20, H, W) and used.shape == (19, 7) and out.with_suffix(".actions.json").is_file()


@pytest.mark.skipif(not BRIDGE.is_dir(), reason="shared/bridge_samples not available")
def test_policy_on_a_real_bridge_episode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = write_checkpoint(tmp_path / "m.pt", tiny_net(init=True), (0,))
    (_, video, _), = sample.main(["--dit_path", str(ckpt), "--annotation", str(BRIDGE / "annotation/test/0.json"),
                                  "--policy", "policy:reference", "--policy_arg", "servo", "--num_steps", "1",
                                  "--max_actions", "5"])
    assert video.shape == (1, 3, 6, H, W)


BAD = '''import torch
def flat(frames, step, history):
    return torch.zeros(frames.shape[0], 12)
def nan(frames, step, history):
    return torch.full((frames.shape[0], 12, 7), float("nan"))
def narrow(frames, step, history):
    return torch.zeros(frames.shape[0], 12, 6)
def factory(arg, settings):
    return lambda frames, step, history: torch.zeros(frames.shape[0], 12, settings["action_dim"])
'''


def test_bad_policies_are_one_line_errors(synth_data, ckpt2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.py").write_text(BAD)
    base = ["--dit_path", str(ckpt2), "--data_root", str(synth_data), "--num_steps", "1", "--max_actions", "3",
            "--overwrite"]
    cases = [("bad.py:flat", "error: bad.py:flat: returned shape [1, 12]"),
             ("bad.py:nan", "error: bad.py:nan: returned NaN"),
             ("bad.py:narrow", "error: bad.py:narrow: returned 6-D actions, the model takes 7-D"),
             ("nope.py:fn", "error: nope.py: policy file not found"),
             ("no_such_pkg.mod:fn", "error: no_such_pkg.mod: no such module"),
             ("bad.py:missing", "error: bad.py: has no function 'missing'"),
             ("bad.py", "error: --policy='bad.py': must be")]
    for spec, want in cases:
        with pytest.raises(SystemExit) as e:
            sample.cli(base + ["--policy", spec])
        assert str(e.value.code).startswith(want) and "\n" not in str(e.value.code), (spec, e.value.code)
    assert sample.main(base + ["--policy", "bad.py:factory", "--policy_arg", "x"])[0][2].abs().sum() == 0
    with pytest.raises(SystemExit, match="must be one of"):
        sample.cli(base + ["--policy", "policy:reference", "--policy_arg", "nope"])


def test_policy_eval_report(synth_data, ckpt2, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("scores.json").write_text(json.dumps({"servo": 0.9, "random": 0.1, "servo_slow": 0.5}))
    report = sample.main(["--dit_path", str(ckpt2), "--data_root", str(synth_data), "--policy_eval",
                          "--policy_episodes", "2", "--num_steps", "1", "--max_actions", "14",
                          "--policy_scores", "scores.json", "--policy_json", "e.json"])
    assert json.loads(Path("e.json").read_text()) == json.loads(json.dumps(report))
    assert [r["policy"] for r in report["policies"]] == ["servo", "random", "servo_slow"]
    assert report["first_episode"] == 2 and len(report["psnr_per_chunk"]) == 2
    assert set(report["agreement"]) == {"sim_vs_world_model", "real_vs_world_model", "real_vs_sim"}
    assert all(0 <= r[k] <= 1 for r in report["policies"] for k in ("sim", "world_model", "real"))
    assert Path("e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "Spearman" in capsys.readouterr().out


def test_success_measure_and_spearman():
    assert policy.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1) and policy.spearman([1, 1], [0, 2]) is None
    assert policy.spearman([0.1, 0.5, 0.5, 0.9], [1, 2, 2, 3]) == pytest.approx(1)
    st = dict(cameras=(0, 1), frame_size=(64, 80), action_scale=20.0, gripper_scale=1.0, chunk=12, action_dim=7)
    done = {}
    for name in ("servo_fast", "random"):
        worlds = [synth.World.episode(0, i) for i in range(4)]
        video = policy.simulate(worlds, policy.checked(policy.reference(name, st), name, 7), 24, st)
        done[name] = sum(policy.success(v) for v in video)
    assert done["servo_fast"] > done["random"]
