"""data.py: the Cosmos action maths, both on-disk layouts, window counts, shapes and dtypes, determinism without
global RNG, multi-camera items, every bad-data case (the error names the file), skip_bad, the real Bridge samples
(recomputed actions = stored ones), the synthetic world, and the check / synth / bench commands.
Small synthetic data is generated once per module: the whole file runs in well under a minute on 2 cores."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checks
import data
from configurator import UserError
from synth import WORK_HI, WORK_LO, make_synthetic, simulate_episode

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = Path(__file__).resolve().parents[2] / "shared" / "bridge_samples"
H, W, T, V = 32, 40, 16, 3          # synthetic videos: 16 frames of 32x40, 3 cameras
EPISODES, VAL = 5, 2                # ep00000..ep00002 train, ep00003..ep00004 val


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "syn"
    make_synthetic(str(root), episodes=EPISODES, cameras=V, frames=T, size=(H, W), seed=0, val_episodes=VAL,
                       workers=1)
    return root


@pytest.fixture(scope="module")
def irasim(synth, tmp_path_factory):
    """The same episodes in the IRASim/Bridge layout: annotation/<split>/<i>.json with a 'videos' list of paths."""
    root = tmp_path_factory.mktemp("data") / "irasim"
    for split in ("train", "val"):
        for i, ann in enumerate(sorted((synth / "annotations" / split).glob("*.json"))):
            d = json.loads(ann.read_text())
            d["videos"] = []
            for k in range(V):
                rel = f"videos/{split}/{i}/rgb_{k}.mp4"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(synth / "videos" / f"cam{k}" / f"{ann.stem}.mp4", root / rel)
                d["videos"].append({"video_path": rel})
            (root / "annotation" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotation" / split / f"{i}.json").write_text(json.dumps(d))
    return root


@pytest.fixture
def copy(synth, tmp_path):
    """A private copy of the synthetic dataset, to break."""
    shutil.copytree(synth, tmp_path / "syn")
    return tmp_path / "syn"


def edit_json(path, fn):
    d = json.loads(Path(path).read_text())
    fn(d)
    Path(path).write_text(json.dumps(d))


def frames_of(path, n=None):
    n = n or data.count_frames(path)[0]
    return data.read_frames(path, n).permute(0, 2, 3, 1).numpy()


# -----------------------------------------------------------------------------
# the action convention


def test_euler_convention_and_round_trip():
    rng = np.random.default_rng(0)
    rpy = rng.uniform([-np.pi, -1.5, -np.pi], [np.pi, 1.5, np.pi], size=(50, 3))
    R = data.euler_to_rotm(rpy)
    for (a, b, c), Rk in zip(rpy[:5], R[:5]):  # extrinsic xyz: Rz(yaw) Ry(pitch) Rx(roll)
        Rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        Ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        Rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
        np.testing.assert_allclose(Rk, Rz @ Ry @ Rx, atol=1e-12)
    np.testing.assert_allclose(data.rotm_to_euler(R), rpy, atol=1e-9)
    assert data.rotm_to_euler(data.euler_to_rotm([np.pi, 0.0, 0.0]))[0] == pytest.approx(np.pi)  # (-pi, pi]


def test_compute_actions_formula():
    """Translation in the previous end-effector frame, relative rotation, gripper of the target frame, x scale."""
    state = np.array([[0.1, 0.2, 0.3, 0.0, 0.0, np.pi / 2, 1.0],
                      [0.1, 0.3, 0.3, 0.0, 0.0, np.pi / 2 + 0.1, 1.0],     # +0.1 along world y = +x of the EE
                      [0.1, 0.3, 0.25, 0.05, 0.0, np.pi / 2 + 0.1, 0.0]])
    gripper = np.array([0.0, 0.4, 0.9])
    a = data.compute_actions(state, gripper, action_scale=20.0, gripper_scale=2.0)
    assert a.dtype == np.float32 and a.shape == (2, 7)
    np.testing.assert_allclose(a[0], [2.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.8], atol=1e-5)
    np.testing.assert_allclose(a[1], [0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 1.8], atol=1e-5)
    assert np.all(data.compute_actions(np.repeat(state[:1], 4, 0), np.zeros(4))[:, :6] == 0)


def test_read_frames_is_pyav_rgb(synth):
    """read_frames (one swscale context per video) gives exactly PyAV's frame.to_ndarray(format='rgb24')."""
    import av
    paths = [synth / "videos" / "cam1" / "ep00002.mp4"] + ([BRIDGE / "videos" / "test" / "0" / "rgb.mp4"] if BRIDGE.is_dir() else [])
    for path in paths:
        with av.open(str(path)) as container:
            ref = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])
        got = data.read_frames(path, [len(ref) - 1, 0, 3])
        assert got.dtype == torch.uint8 and got.shape == (3, 3) + ref.shape[1:3]
        np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), ref[[len(ref) - 1, 0, 3]])
    with pytest.raises(UserError, match="has only 16 decodable frames, frame 16 was asked for"):
        data.read_frames(paths[0], [16])
    with pytest.raises(ValueError, match="non-negative"):
        data.read_frames(paths[0], [-1])


# -----------------------------------------------------------------------------
# the dataset: layouts, windows, shapes, determinism


@pytest.mark.parametrize("num_frames,frame_stride,start_stride", [(13, 1, 1), (5, 2, 1), (4, 3, 2), (16, 1, 1), (6, 1, 5)])
def test_window_counts(synth, num_frames, frame_stride, start_stride):
    ds = data.RobotVideoDataset(synth, "train", num_frames=num_frames, cameras=(0,), size=None,
                                frame_stride=frame_stride, start_stride=start_stride)
    span = (num_frames - 1) * frame_stride
    starts = list(range(0, T - span, start_stride))
    assert len(ds) == (EPISODES - VAL) * len(starts)
    assert [ds[i]["key"] for i in range(len(ds))] == [f"ep{e:05d}/{s}" for e in range(EPISODES - VAL) for s in starts]
    assert len(data.RobotVideoDataset(synth, "val", num_frames=num_frames, cameras=(0,), size=None,
                                      frame_stride=frame_stride, start_stride=start_stride)) == VAL * len(starts)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_no_windows_when_episodes_are_short(synth):
    assert len(data.RobotVideoDataset(synth, "train", num_frames=T + 1, cameras=(0,), size=None)) == 0
    assert len(data.RobotVideoDataset(synth, "train", num_frames=9, frame_stride=2, cameras=(0,), size=None)) == 0


def test_item_shapes_dtypes_and_content(synth):
    ds = data.RobotVideoDataset(synth, "train", num_frames=5, cameras=(0, 1, 2), size=(24, 30), frame_stride=2)
    item = ds[3]
    assert item["key"] == "ep00000/3"
    assert item["video"].dtype == torch.uint8 and item["video"].shape == (3, 3, 5, 24, 30)
    assert item["cond"]["action"].dtype == torch.float32 and item["cond"]["action"].shape == (4, 7)
    ann = data.parse_annotation(synth / "annotations" / "train" / "ep00000.json")
    idx = slice(3, 3 + 4 * 2 + 1, 2)
    np.testing.assert_array_equal(item["cond"]["action"].numpy(), data.compute_actions(ann["state"][idx], ann["gripper"][idx]))
    raw = data.read_frames(synth / "videos" / "cam1" / "ep00000.mp4", [3, 5, 7, 9, 11], (24, 30))
    assert torch.equal(item["video"][1].transpose(0, 1), raw)
    native = data.RobotVideoDataset(synth, "train", num_frames=13, cameras=(2,), size=None)[0]["video"]
    assert native.shape == (1, 3, 13, H, W)
    assert len(ds.episodes) == EPISODES - VAL and ds.episodes[0].actions.shape == (T - 2, 7)
    assert "3 episodes" in repr(ds)


def test_episode_frames_and_actions(synth):
    ds = data.RobotVideoDataset(synth, "val", num_frames=13, cameras=(0, 1), size=(H, W), frame_stride=2,
                                action_scale=10.0, gripper_scale=3.0)
    whole = ds.episode_frames(1)
    assert whole.shape == (2, 3, T // 2, H, W)
    assert torch.equal(ds.episode_frames(1, 4, 3), whole[:, :, 2:5])
    ann = data.parse_annotation(ds.episodes[1].annotation)
    np.testing.assert_array_equal(ds.episode_actions(1).numpy(),
                                  data.compute_actions(ann["state"][::2], ann["gripper"][::2], 10.0, 3.0))
    np.testing.assert_array_equal(ds.episode_actions(1, 4, 3).numpy(), ds.episode_actions(1)[2:4].numpy())
    with pytest.raises(IndexError, match="do not fit"):
        ds.episode_frames(1, 10, 4)


def test_multi_camera_item(synth):
    """Views come in the order asked for, each exactly its own camera's file; the cameras see different things."""
    a = data.RobotVideoDataset(synth, "train", num_frames=13, cameras=(0, 2), size=None)[1]
    b = data.RobotVideoDataset(synth, "train", num_frames=13, cameras=(2, 0), size=None)[1]
    assert torch.equal(a["video"][0], b["video"][1]) and torch.equal(a["video"][1], b["video"][0])
    assert torch.equal(a["cond"]["action"], b["cond"]["action"])
    for v, k in enumerate((0, 2)):
        raw = data.read_frames(synth / "videos" / f"cam{k}" / "ep00000.mp4", range(1, 14))
        assert torch.equal(a["video"][v].transpose(0, 1), raw)
    assert (a["video"][0].float() - a["video"][1].float()).abs().mean() > 10


def test_determinism_and_no_global_rng(synth):
    torch_state, np_state, py_state = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    ds = data.RobotVideoDataset(synth, "train", num_frames=13, cameras=(0, 1), size=(24, 30))
    first = [ds[i] for i in (0, 5, 11)]
    again = [data.RobotVideoDataset(synth, "train", num_frames=13, cameras=(0, 1), size=(24, 30))[i] for i in (0, 5, 11)]
    for x, y in zip(first, again):
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["cond"]["action"], y["cond"]["action"]) and x["key"] == y["key"]
    assert torch.equal(ds[5]["video"], first[1]["video"])
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    np_now = np.random.get_state()
    assert np_now[0] == np_state[0] and np.array_equal(np_now[1], np_state[1]) and np_now[2:] == np_state[2:]
    assert random.getstate() == py_state


def test_irasim_layout_matches_camera_folders(synth, irasim):
    assert data.detect_layout(irasim) == "irasim" and data.detect_layout(synth) == "camera_folders"
    assert data.available_splits(irasim) == ["train", "val"]
    a = data.RobotVideoDataset(irasim, "val", num_frames=13, cameras=(1, 2), size=(24, 30))
    b = data.RobotVideoDataset(synth, "val", num_frames=13, cameras=(1, 2), size=(24, 30))
    assert len(a) == len(b) == VAL * (T - 12)
    assert a.episodes[0].videos[0] == irasim / "videos" / "val" / "0" / "rgb_1.mp4"
    for i in (0, len(a) - 1):
        assert torch.equal(a[i]["video"], b[i]["video"]) and torch.equal(a[i]["cond"]["action"], b[i]["cond"]["action"])
    assert a[0]["key"] == "0/0"
    with pytest.raises(UserError, match=r"0\.json.*lists 3 camera\(s\).*camera 3"):
        data.RobotVideoDataset(irasim, "val", cameras=(3,))
    with pytest.raises(UserError, match="split folder not found.*'train', 'val'"):
        data.RobotVideoDataset(irasim, "test")


def test_camera_folders_without_split_folders(synth, tmp_path):
    """Loose annotations: 'val' is held out by a hash of the name, stable as episodes are added."""
    root = tmp_path / "flat"
    shutil.copytree(synth / "videos", root / "videos")
    (root / "annotations").mkdir()
    for ann in (synth / "annotations").glob("*/*.json"):
        shutil.copy(ann, root / "annotations" / ann.name)
    train = data.list_annotations(root, "train", val_fraction=0.3)
    val = data.list_annotations(root, "val", val_fraction=0.3)
    assert val and train and sorted(train + val) == sorted((root / "annotations").glob("*.json"))
    assert len(data.RobotVideoDataset(root, "val", num_frames=13, val_fraction=0.3, size=None)) == len(val) * (T - 12)
    with pytest.raises(UserError, match="only 'train' and 'val'"):
        data.list_annotations(root, "test")


def train_config(root, **kw):
    """train.py's config block (its defaults), for data.make_dataset."""
    import configurator
    c = configurator.script_defaults(str(ROOT / "train.py"))
    return {**c, **dict(data_root=str(root), cameras=(0, 2), frame_size=(H, W), num_frames=5, start_stride=2), **kw}


def test_make_dataset_protocol(synth, irasim):
    """Both annotation layouts through the one factory: the protocol's attributes, cond items, episode methods;
    validation windows do not overlap; the run is told the clip counts."""
    said = []
    for root in (synth, irasim):
        ds = data.make_dataset(train_config(root), "train", say=said.append)
        assert isinstance(ds, data.RobotVideoDataset) and ds.cameras == (0, 2) and ds.num_frames == 5
        assert ds.action_dim == 7 and len(ds.episode_names) == EPISODES - VAL and ds.start_stride == 2
        item = ds[len(ds) - 1]
        e, start = int(ds.window_episode[-1]), int(ds.window_start[-1])
        assert item["video"].shape == (2, 3, 5, H, W) and item["video"].dtype == torch.uint8
        assert torch.equal(item["video"], ds.episode_frames(e, start, 5))
        assert torch.equal(item["cond"]["action"], ds.episode_cond(e, start, 5)["action"])
        assert item["key"] == f"{ds.episode_names[e]}/{start}"
        assert ds.episode_frames(e).shape == (2, 3, T, H, W) and ds.episode_cond(e)["action"].shape == (T - 1, 7)
        batch = torch.utils.data.default_collate([ds[0], ds[1]])
        assert batch["cond"]["action"].shape == (2, 4, 7)
        val = data.make_dataset(train_config(root), "val", say=said.append)
        assert val.start_stride == 4 and len(val) == VAL * ((T - 5) // 4 + 1)
    assert said[0] == f"dataset {synth} split 'train': {len(ds)} clips of 5 frames from {EPISODES - VAL} episodes"


def test_make_dataset_names_the_nearest_folder(synth):
    typo = synth.parent / "sin"
    with pytest.raises(UserError, match=f"{typo}: data_root not found \\(did you mean {synth}\\?\\)"):
        data.make_dataset(train_config(typo), "train")
    with pytest.raises(UserError, match=r"--action_dim=10: the actions of .* have 7 dimensions"):
        data.make_dataset(train_config(synth, action_dim=10), "train", say=lambda *a: None)
    with pytest.raises(UserError, match="no training clips of 33 frames"):
        data.make_dataset(train_config(synth, num_frames=33), "train", say=lambda *a: None)


# -----------------------------------------------------------------------------
# bad data: every error names the file


def load(root, **kw):
    return data.RobotVideoDataset(root, "train", num_frames=13, cameras=(0, 1, 2), size=None, **kw)


def test_missing_video(copy):
    video = copy / "videos" / "cam1" / "ep00001.mp4"
    video.unlink()
    with pytest.raises(UserError, match=f"{video}: video file not found") as e:
        load(copy)
    assert e.value.path == str(video) and e.value.problem == "video file not found"  # the one error type


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_unreadable_video(copy, how):
    video = copy / "videos" / "cam2" / "ep00002.mp4"
    raw = video.read_bytes()
    video.write_bytes(raw[:len(raw) // 2] if how == "truncated" else b"not an mp4 " * 50)
    with pytest.raises(UserError, match=f"{video}: cannot open video"):
        load(copy)


def test_corrupt_frames_inside_a_video(copy):
    """The header is intact (the dataset opens), the coded frames are not: reading the clip names the file."""
    video = copy / "videos" / "cam0" / "ep00000.mp4"
    raw = bytearray(video.read_bytes())
    start = raw.find(b"mdat") + 600
    raw[start:start + 2400] = bytes(2400)
    video.write_bytes(bytes(raw))
    ds = load(copy)
    with pytest.raises(UserError, match=f"{video}: (cannot decode|has only)"):
        ds[0]


@pytest.mark.parametrize("breakage,message", [
    (lambda d: d.pop("state"), "missing key 'state'"),
    (lambda d: d.pop("continuous_gripper_state"), "missing key 'continuous_gripper_state'"),
    (lambda d: d.update(state=[row[:5] for row in d["state"]]), r"'state' must be T x >=6.*\[16, 5\]"),
    (lambda d: d.update(state=d["state"][0]), r"'state' must be T x >=6.*\[7\]"),
    (lambda d: d.update(continuous_gripper_state=d["continuous_gripper_state"][:-1]),
     r"'continuous_gripper_state' must have shape \[16\].*\[15\]"),
    (lambda d: d.update(state=d["state"][:3] + [[1.0, 2.0]] + d["state"][4:]), "not a rectangular array"),
    (lambda d: d["state"][4].__setitem__(2, float("nan")), r"'state' has 1 NaN/inf values, first at index \[4, 2\]"),
    (lambda d: d["continuous_gripper_state"].__setitem__(7, None), r"'continuous_gripper_state' has 1 NaN"),
    (lambda d: d.update(state="abc"), "'state'"),
])
def test_bad_annotation(copy, breakage, message):
    ann = copy / "annotations" / "train" / "ep00001.json"
    edit_json(ann, breakage)
    with pytest.raises(UserError, match=f"{ann}: .*{message}"):
        load(copy)


def test_truncated_json(copy):
    ann = copy / "annotations" / "train" / "ep00002.json"
    ann.write_text(ann.read_text()[:500])
    with pytest.raises(UserError, match=f"{ann}: not valid JSON.*truncated"):
        load(copy)


def test_fewer_video_frames_than_states(copy):
    for k in range(V):  # every camera cut to T - 3 frames: consistent with each other, too short for the states
        video = copy / "videos" / f"cam{k}" / "ep00001.mp4"
        data.write_mp4(video, frames_of(video, T - 3))
    ann = copy / "annotations" / "train" / "ep00001.json"
    with pytest.raises(UserError, match=f"cam0/ep00001.mp4: has {T - 3} frames but {ann} has {T} states"):
        load(copy)


def test_cameras_with_different_frame_counts(copy):
    video = copy / "videos" / "cam2" / "ep00000.mp4"
    data.write_mp4(video, frames_of(video, T - 1))
    ann = copy / "annotations" / "train" / "ep00000.json"
    with pytest.raises(UserError, match=f"{ann}: cameras have different frame counts: .*cam2/ep00000.mp4 has {T - 1}"):
        load(copy)
    assert len(data.RobotVideoDataset(copy, "train", num_frames=13, cameras=(0, 1), size=None)) == 3 * (T - 12)


def test_skip_bad_skips_and_says_so(copy, capsys):
    (copy / "videos" / "cam1" / "ep00001.mp4").unlink()
    edit_json(copy / "annotations" / "train" / "ep00002.json", lambda d: d["state"][0].__setitem__(0, float("nan")))
    with pytest.raises(UserError):
        load(copy)
    ds = load(copy, skip_bad=True)
    out = capsys.readouterr().out
    assert [e.name for e in ds.episodes] == ["ep00000"] and len(ds) == T - 12
    assert "skipping bad episode:" in out and "cam1/ep00001.mp4: video file not found" in out
    assert "ep00002.json: 'state' has 1 NaN" in out and "skipped 2 bad episode(s) of 3" in out
    said = []
    assert len(data.make_dataset(train_config(copy, cameras=(0, 1, 2), skip_bad=True), "train", say=said.append)) == (T - 5) // 2 + 1
    assert said[-1].endswith("from 1 episodes | skip_bad: 2 bad episodes skipped")
    (copy / "videos" / "cam1" / "ep00000.mp4").unlink()
    with pytest.raises(UserError, match="no usable episodes"):
        load(copy, skip_bad=True)


def test_missing_dataset_and_unknown_layout(tmp_path):
    with pytest.raises(UserError, match="dataset folder not found"):
        data.RobotVideoDataset(tmp_path / "nowhere")
    with pytest.raises(UserError, match="neither annotation"):
        data.RobotVideoDataset(tmp_path)


# -----------------------------------------------------------------------------
# the synthetic world


def test_synthetic_world_is_consistent(synth):
    meta = json.loads((synth / "synth.json").read_text())
    assert meta["episodes"] == EPISODES and meta["cameras"] == V and meta["size"] == [H, W]
    for ann_path in sorted((synth / "annotations").glob("*/*.json")):
        ann = data.parse_annotation(ann_path)
        a = data.relative_actions(ann["state"], ann["gripper"])
        stored = checks.stored_action(ann_path, ann)
        np.testing.assert_allclose(stored[:, :6], a[:, :6], atol=1e-9)    # stored like Bridge: unscaled,
        np.testing.assert_array_equal(stored[:, 6], ann["state"][1:, 6])  # column 6 = the open flag
        assert set(np.unique(ann["state"][:, 6])) <= {0.0, 1.0}
        assert np.all((ann["gripper"] >= 0) & (ann["gripper"] <= 1))
        for k in range(V):
            assert data.count_frames(synth / "videos" / f"cam{k}" / f"{ann_path.stem}.mp4") == (T, H, W)
    assert sorted(p.stem for p in (synth / "annotations" / "val").glob("*.json")) == ["ep00003", "ep00004"]


def test_synthetic_is_deterministic_per_seed(tmp_path):
    kw = dict(episodes=2, cameras=1, frames=6, size=(16, 20), val_episodes=1)
    make_synthetic(tmp_path / "a", seed=3, workers=1, **kw)
    make_synthetic(tmp_path / "b", seed=3, workers=2, **kw)
    make_synthetic(tmp_path / "c", seed=4, workers=1, **kw)
    for split, name in (("train", "ep00000"), ("val", "ep00001")):
        a, b, c = [(tmp_path / r / "annotations" / split / f"{name}.json").read_text() for r in "abc"]
        assert a == b and a != c
        va, vb = [frames_of(tmp_path / r / "videos" / "cam0" / f"{name}.mp4") for r in "ab"]
        np.testing.assert_array_equal(va, vb)


def test_synthetic_actions_are_random_and_move_the_gripper():
    """The motion must not be predictable from the first frame: many directions and speeds, the gripper is used,
    and over a 12-step window the tool centre travels far (the default run's 8x8-pixel blocks must change)."""
    moves, directions, toggles = [], [], 0
    for i in range(30):
        state, gripper, _, _ = simulate_episode(np.random.default_rng([0, i]), 40, 2)
        step = np.diff(state[:, :3], axis=0)
        moves += [np.linalg.norm(state[s + 12, :3] - state[s, :3]) for s in range(0, 27, 4)]
        directions += list(step[np.linalg.norm(step, axis=1) > 1e-3][:, :2])
        toggles += int(np.abs(np.diff(state[:, 6])).sum())
        assert np.all(state[:, :3] >= WORK_LO - 1e-9) and np.all(state[:, :3] <= WORK_HI + 1e-9)
        assert np.abs(np.diff(step, axis=0)).max() < 0.04    # smooth: the velocity eases, it never jumps
    assert np.median(moves) > 0.08                          # metres in 12 frames (the workspace is 0.26 m wide)
    angles = np.arctan2(*np.array(directions).T[::-1])
    assert np.histogram(angles, bins=8, range=(-np.pi, np.pi))[0].min() > 0.05 * len(angles)  # every heading
    assert toggles > 30


# -----------------------------------------------------------------------------
# the real Bridge samples (IRASim layout, 3 test episodes)

bridge = pytest.mark.skipif(not BRIDGE.is_dir(), reason=f"{BRIDGE} not found")


@bridge
def test_bridge_windows_load():
    ds = data.RobotVideoDataset(BRIDGE, "test", num_frames=13, cameras=(0,), size=(64, 80))
    lengths = [e.num_frames for e in ds.episodes]
    assert sorted(lengths) == [26, 28, 32] and len(ds) == sum(n - 12 for n in lengths)
    item = ds[len(ds) - 1]
    assert item["video"].shape == (1, 3, 13, 64, 80) and item["video"].dtype == torch.uint8
    assert item["cond"]["action"].shape == (12, 7) and item["video"].float().std() > 20


@bridge
def test_bridge_recomputed_actions_equal_the_stored_ones():
    """Columns 0-5: compute_actions(state) = 20 x stored action. Column 6: the recomputed action carries the target
    frame's continuous_gripper_state (0 open .. ~0.94 closed), while the stored column 6 is state[1:, 6], the
    binary gripper-open flag (1 = open), which Cosmos never uses for training."""
    ds = data.RobotVideoDataset(BRIDGE, "test", num_frames=13, cameras=(0,), size=(64, 80))
    for e, ep in enumerate(ds.episodes):
        ann = data.parse_annotation(ep.annotation)
        stored = checks.stored_action(ep.annotation, ann)
        np.testing.assert_allclose(ep.actions[:, :6], 20 * stored[:, :6], atol=1e-6, rtol=0)
        np.testing.assert_allclose(ep.actions[:, 6], ann["gripper"][1:], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(stored[:, 6], ann["state"][1:, 6])
        assert set(np.unique(stored[:, 6])) == {0.0, 1.0}
        start = 3
        np.testing.assert_allclose(ds.episode_actions(e, start, 13).numpy()[:, :6], 20 * stored[start:start + 12, :6],
                                   atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------
# the commands


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


def test_check_passes_on_synthetic_data(synth):
    p = run_cli("check", synth, "--cameras", "0,1,2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK" in p.stdout and "train" in p.stdout and "val" in p.stdout


@bridge
def test_check_passes_on_bridge():
    p = run_cli("check", BRIDGE)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK: 3 episodes" in p.stdout and "480x640" in p.stdout and "state[1:,6] (3)" in p.stdout


def test_check_lists_every_problem(copy):
    """A deleted video and a truncated JSON (and a stored action that disagrees with the state): all listed, exit 1."""
    (copy / "videos" / "cam1" / "ep00001.mp4").unlink()
    bad_json = copy / "annotations" / "val" / "ep00003.json"
    bad_json.write_text(bad_json.read_text()[:300])
    edit_json(copy / "annotations" / "train" / "ep00002.json", lambda d: d["action"][5].__setitem__(0, 0.5))
    edit_json(copy / "annotations" / "train" / "ep00000.json", lambda d: d["action"][2].__setitem__(6, 0.5))
    p = run_cli("check", copy)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert f"{copy / 'videos' / 'cam1' / 'ep00001.mp4'}: video file not found" in out
    assert f"{bad_json}: not valid JSON" in out
    assert "ep00002.json" in out and "ep00000.json" in out
    assert "4 problem" in out


def test_synth_and_bench_commands(tmp_path, capsys):
    import synth
    out = tmp_path / "s"
    assert synth.main(["--out", str(out), "--episodes", "3", "--val-episodes", "1", "--cameras", "2",
                       "--frames", "14", "--size", "32x40", "--workers", "1"]) == 0
    assert sorted(p.name for p in (out / "videos" / "cam1").iterdir()) == ["ep00000.mp4", "ep00001.mp4", "ep00002.mp4"]
    assert checks.main(["check", str(out)]) == 0
    assert checks.main(["encode", str(out), "--out", str(tmp_path / "cache"), "--tokenizer", "pixel", "--cameras", "0,1",
                      "--size", "32x40", "--workers", "0"]) == 0
    assert checks.main(["bench", str(out), "--cameras", "0,1", "--size", "32x40", "--workers", "1", "--batch-size", "2",
                      "--batches", "3", "--cache", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    assert "wrote 3 episodes" in text and "raw PyAV decode" in text and "x raw decode" in text
    assert "x the video loader" in text


def test_check_split_workers_and_notes(tmp_path, capsys):
    """--split restricts the check; a pool of workers finds the same problems; extra frames are a note, not a problem."""
    root = tmp_path / "many"
    make_synthetic(root, episodes=18, cameras=1, frames=4, size=(16, 20), seed=1, val_episodes=2, workers=1)
    video = root / "videos" / "cam0" / "ep00016.mp4"  # val
    data.write_mp4(video, np.concatenate([frames_of(video)] * 2))
    (root / "videos" / "cam0" / "ep00003.mp4").unlink()  # train
    one = checks.check_dataset(root, num_frames=4, workers=1)
    assert one == checks.check_dataset(root, num_frames=4, workers=2) and len(one) == 1 and "ep00003.mp4" in one[0]
    assert checks.check_dataset(root, num_frames=4, splits=("val",)) == []
    out = capsys.readouterr().out
    assert "ep00016.mp4: 8 frames for 4 states" in out and "in val" in out and "OK: 2 episodes" in out
    assert checks.main(["check", str(root), "--split", "train", "--num-frames", "4"]) == 1


# -----------------------------------------------------------------------------
# what a new user meets: seeking, checks that agree with training, one-line errors, progress


def test_seek_reads_the_same_frames_as_decoding_from_the_start(tmp_path):
    """A 200-frame video (a keyframe every 12): every window read with a seek equals the same frames decoded from
    frame 0, including windows that start on, just before and just after a keyframe, and strided ones."""
    rng = np.random.default_rng(0)
    frames = np.cumsum(rng.integers(0, 40, (200, 32, 40, 3)), 0).astype(np.uint8)  # every frame differs
    path = tmp_path / "long.mp4"
    data.write_mp4(path, frames)
    full = data.read_frames(path, 200)
    for start in [0, 1, 11, 12, 13, 23, 24, 100, 187]:
        assert torch.equal(data.read_frames(path, range(start, start + 13)), full[start:start + 13]), start
    assert torch.equal(data.read_frames(path, [150, 152, 154]), full[[150, 152, 154]])
    with pytest.raises(UserError, match="has only 200 decodable frames, frame 200 was asked for"):
        data.read_frames(path, range(190, 201))
    if BRIDGE.is_dir():  # mpeg4, keyframes every 12
        video = BRIDGE / "videos" / "test" / "0" / "rgb.mp4"
        full = data.read_frames(video, 28)
        assert all(torch.equal(data.read_frames(video, range(s, s + 13)), full[s:s + 13]) for s in range(16))


def test_stored_action_is_ignored_by_training_and_checked_by_check(copy):
    """Training recomputes actions from the state and never refuses a dataset for its stored 'action'; check does."""
    ann = copy / "annotations" / "train" / "ep00001.json"
    edit_json(ann, lambda d: d.update(action=d["action"][:-2]))
    ds = data.RobotVideoDataset(copy, "train", num_frames=13, cameras=(0,), size=None)
    assert len(ds.episodes) == 3 and ds[ds.window_start.tolist().index(0, 4)]["cond"]["action"].shape == (12, 7)
    problems = checks.check_dataset(copy, num_frames=13, workers=1)
    assert len(problems) == 1 and f"{ann}: 'action' must be [15, 7]" in problems[0]


def test_check_flags_nan_anywhere_in_the_json(copy):
    ann = copy / "annotations" / "val" / "ep00003.json"
    edit_json(ann, lambda d: (d["action"][3].__setitem__(2, float("nan")), d.update(extra={"x": [1.0, float("inf")]})))
    assert len(data.RobotVideoDataset(copy, "val", num_frames=13, cameras=(0,), size=None).episodes) == 2
    problems = checks.check_dataset(copy, num_frames=13, workers=1)
    assert f"{ann}: 2 NaN/Infinity value(s) in the JSON, first at action[3][2]" in problems


def test_check_reads_what_training_will_read(copy, capsys):
    """Default cameras are the folders found, and check says so; a camera asked for with no folder at all is one
    problem (not one per episode), and so is the training error; a folder lacking some episodes is counted."""
    shutil.rmtree(copy / "videos" / "cam2")
    assert checks.check_dataset(copy, num_frames=13, workers=1) == []
    assert "cameras 0,1 (default: the camera folders found; pass --cameras" in capsys.readouterr().out
    problems = checks.check_dataset(copy, cameras=(0, 1, 2), num_frames=13, workers=1)
    assert problems == [f"{copy / 'videos' / 'cam2'}: camera folder not found; the dataset has cam0, cam1"]
    with pytest.raises(UserError, match=r"cam2: camera folder not found: the config asks for 3 camera\(s\) "
                                             r"\[0, 1, 2\] and the dataset has 2 \(cam0, cam1\)"):
        data.RobotVideoDataset(copy, "train", cameras=(0, 1, 2))
    (copy / "videos" / "cam1" / "ep00002.mp4").unlink()
    capsys.readouterr()
    problems = checks.check_dataset(copy, cameras=(0, 1), num_frames=13, workers=1)
    assert len(problems) == 1 and "cam1/ep00002.mp4: video file not found" in problems[0]
    assert f"missing: {copy / 'videos' / 'cam1'}: has no video for 1 of {EPISODES} episodes (e.g. ep00002)" in \
        capsys.readouterr().out


def test_one_line_errors_and_argument_messages(tmp_path):
    p = run_cli("check", tmp_path / "nowhere")
    assert p.returncode == 1 and p.stderr.strip() == f"error: {tmp_path / 'nowhere'}: dataset folder not found"
    synth_cli = lambda *a: subprocess.run([sys.executable, str(ROOT / "synth.py"), *map(str, a)], capture_output=True,
                                          text=True, timeout=120)
    p = synth_cli("--out", tmp_path / "s", "--episodes", "3", "--val-episodes", "5")
    assert p.returncode == 2 and "val_episodes must be in 0..2" in p.stderr and "Traceback" not in p.stderr
    p = synth_cli("--out", tmp_path / "s", "--size", "32by40")
    assert p.returncode == 2 and "size must be HxW" in p.stderr and "Traceback" not in p.stderr
    p = synth_cli("--out", tmp_path / "s", "--episodes", "6", "--cameras", "1", "--frames", "3", "--size", "16x20")
    assert p.returncode == 0, p.stderr  # the val default scales with --episodes (it was 10: an AssertionError)
    assert len(list((tmp_path / "s" / "annotations" / "val").glob("*.json"))) == 1
    lines = [l for l in p.stderr.splitlines() if l.startswith("synth 6 episodes")]
    assert len(lines) == 6 and lines[-1].startswith("synth 6 episodes x 1 cameras: 6/6")  # not a tty: plain lines


def test_progress_is_one_line_per_tenth_off_a_terminal(capsys):
    assert list(data.progress(iter(range(95)), 95, "work")) == list(range(95))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[0].startswith("work: 10/95") and lines[-1].startswith("work: 95/95")
