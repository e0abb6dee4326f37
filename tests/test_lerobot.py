"""lerobot.py: LeRobot v2.1 and v3.0 folders written here with pyarrow and PyAV (the layout LeRobot writes), read back:
clips, frames chosen by timestamp (each synthetic frame paints its own index), actions, stats, errors, check."""

import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow", reason="LeRobot datasets need the optional pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import checks
import data
from configurator import UserError
import lerobot

FPS, H, W, A = 30, 48, 64, 10
LENGTHS = [47, 52, 40, 61, 45]                  # frames per episode at 30 fps
CAMERAS = {"observation.images.top": "libx264", "observation.images.wrist": "libsvtav1", "observation.images.side": "libx264"}
TASKS = ["pick up the red cube", "open the drawer"]
GOP = 10                                         # a keyframe every 10 frames, so clips must seek


def paint(episode, i):
    """A flat frame whose colour says (episode, frame index), robust to lossy codecs (levels 24 apart)."""
    f = np.empty((H, W, 3), np.uint8)
    f[..., 0], f[..., 1], f[..., 2] = 16 + 24 * (i % 10), 16 + 24 * (i // 10), 16 + 24 * episode
    return f


def identify(x_3_H_W):
    """(episode, frame index) read back from a decoded frame."""
    r, g, b = (int(round((float(x_3_H_W[c].float().mean()) - 16) / 24)) for c in range(3))
    return b, 10 * g + r


def write_video(path, frames, codec):
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(FPS))
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"g": str(GOP), "crf": "20", **({"bf": "2"} if codec == "libx264" else {"preset": "12"})}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


def vectors(x, fixed):
    """A vector column as HF datasets writes one: fixed_size_list (newer) or list (older)."""
    if fixed:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])
    return pa.ListArray.from_arrays(pa.array(np.arange(len(x) + 1) * x.shape[1], pa.int32()), pa.array(x.reshape(-1), pa.float32()))


def episode_rows(e, n, start_index, rng):
    action = np.cumsum(rng.normal(0, 0.1, (n, A)), 0).astype(np.float32) + np.arange(A, dtype=np.float32)
    state = (np.roll(action, 1, 0) + rng.normal(0, 0.01, (n, A))).astype(np.float32)
    return dict(action=action, state=state, timestamp=(np.arange(n) / FPS).astype(np.float32),
                frame_index=np.arange(n), episode_index=np.full(n, e), index=start_index + np.arange(n),
                task_index=np.full(n, e % 2))


def rows_table(rows, fixed=True):
    return pa.table({"action": vectors(np.concatenate([r["action"] for r in rows]), fixed),
                     "observation.state": vectors(np.concatenate([r["state"] for r in rows]), fixed),
                     **{k: pa.array(np.concatenate([r[k] for r in rows]).astype(np.float32 if k == "timestamp" else np.int64))
                        for k in ("timestamp", "frame_index", "episode_index", "index", "task_index")}})


def feature_stats(x):
    return dict(mean=x.mean(0).tolist(), std=x.std(0).tolist(), min=x.min(0).tolist(), max=x.max(0).tolist(), count=[len(x)])


def info_json(version, data_path, video_path):
    feats = {k: {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"],
                 "info": {"video.fps": FPS, "video.codec": "av1" if c == "libsvtav1" else "h264"}} for k, c in CAMERAS.items()}
    feats.update({k: {"dtype": "float32", "shape": [A], "names": None} for k in ("action", "observation.state")})
    feats.update({k: {"dtype": "int64" if k != "timestamp" else "float32", "shape": [1], "names": None}
                  for k in ("timestamp", "frame_index", "episode_index", "index", "task_index")})
    return dict(codebase_version=version, robot_type="test_arm", fps=FPS, total_episodes=len(LENGTHS),
                total_frames=sum(LENGTHS), total_tasks=len(TASKS), chunks_size=1000, data_path=data_path,
                video_path=video_path, features=feats, splits={"train": f"0:{len(LENGTHS)}"})


def write_v21(root, rows):
    """One parquet per episode and one mp4 per episode and camera; v2.1 keeps per-episode stats only."""
    meta = root / "meta"
    meta.mkdir(parents=True)
    info = info_json("v2.1", "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                     "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    (meta / "info.json").write_text(json.dumps(info))
    (meta / "tasks.jsonl").write_text("".join(json.dumps(dict(task_index=i, task=t)) + "\n" for i, t in enumerate(TASKS)))
    (meta / "episodes.jsonl").write_text("".join(json.dumps(dict(episode_index=e, tasks=[TASKS[e % 2]], length=n)) + "\n"
                                                 for e, n in enumerate(LENGTHS)))
    (meta / "episodes_stats.jsonl").write_text("".join(json.dumps(dict(episode_index=e, stats={
        "action": feature_stats(r["action"]), "observation.state": feature_stats(r["state"])})) + "\n" for e, r in enumerate(rows)))
    for e, (n, r) in enumerate(zip(LENGTHS, rows)):
        f = dict(episode_chunk=0, episode_index=e)
        path = root / info["data_path"].format(**f)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_table([r], fixed=False), path)
        for key, codec in CAMERAS.items():
            write_video(root / info["video_path"].format(video_key=key, **f), [paint(e, i) for i in range(n)], codec)


def write_v30(root, rows):
    """Episodes 0-2 in data file 0 and 3-4 in data file 1; every camera's episodes in one mp4, back to back."""
    meta = root / "meta"
    meta.mkdir(parents=True)
    info = info_json("v3.0", "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                     "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
    (meta / "info.json").write_text(json.dumps(info))
    pq.write_table(pa.table({"task_index": pa.array(range(len(TASKS)), pa.int64()), "task": TASKS}), meta / "tasks.parquet")
    allrows = {"action": np.concatenate([r["action"] for r in rows]), "state": np.concatenate([r["state"] for r in rows])}
    (meta / "stats.json").write_text(json.dumps({"action": feature_stats(allrows["action"]),
                                                 "observation.state": feature_stats(allrows["state"])}))
    files = [0, 0, 0, 1, 1]
    for fi in (0, 1):
        path = root / info["data_path"].format(chunk_index=0, file_index=fi)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_table([r for r, f in zip(rows, files) if f == fi]), path)
    for key, codec in CAMERAS.items():
        write_video(root / info["video_path"].format(video_key=key, chunk_index=0, file_index=0),
                    [paint(e, i) for e, n in enumerate(LENGTHS) for i in range(n)], codec)
    starts = np.concatenate([[0], np.cumsum(LENGTHS)])
    cols = {"episode_index": list(range(len(LENGTHS))), "tasks": [[TASKS[e % 2]] for e in range(len(LENGTHS))],
            "length": LENGTHS, "data/chunk_index": [0] * len(LENGTHS), "data/file_index": files,
            "dataset_from_index": starts[:-1].tolist(), "dataset_to_index": starts[1:].tolist()}
    for key in CAMERAS:
        cols.update({f"videos/{key}/chunk_index": [0] * len(LENGTHS), f"videos/{key}/file_index": [0] * len(LENGTHS),
                     f"videos/{key}/from_timestamp": (starts[:-1] / FPS).tolist(),
                     f"videos/{key}/to_timestamp": (starts[1:] / FPS).tolist()})
    path = meta / "episodes" / "chunk-000" / "file-000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table(cols), path)


@pytest.fixture(scope="session")
def rows():
    rng = np.random.default_rng(0)
    starts = np.concatenate([[0], np.cumsum(LENGTHS)])
    return [episode_rows(e, n, int(starts[e]), rng) for e, n in enumerate(LENGTHS)]


@pytest.fixture(scope="session")
def folders(tmp_path_factory, rows):
    base = tmp_path_factory.mktemp("lerobot")
    write_v21(base / "v21", rows)
    write_v30(base / "v30", rows)
    return {"v2.1": base / "v21", "v3.0": base / "v30"}


def reference_rows(n, start, count, stride):
    """The documented rule in frame units: nearest row to start + k * stride, a tie to the earlier one."""
    return [start + int(np.ceil(k * stride - 0.5)) for k in range(count)]


def all_episodes(root, **kw):
    """Train and val together: every episode, in index order."""
    tr, va = (lerobot.LeRobotDataset(root, s, **kw) for s in ("train", "val"))
    return sorted(tr.episodes + va.episodes, key=lambda e: e.index), tr, va


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_items_clip_counts_and_splits(folders, version):
    kw = dict(num_frames=5, fps=4, size=(32, 40), cameras=("observation.images.top", "wrist", 2))
    eps, tr, va = all_episodes(folders[version], **kw)
    assert [e.index for e in eps] == list(range(len(LENGTHS)))          # the splits partition the episodes
    assert len(va.episodes) >= 1 and len(tr.episodes) >= 1
    assert tr.cameras == list(CAMERAS) and tr.action_dim == A and tr.version == version
    # a clip fits when its last wanted time (start + 4 x 7.5 rows) is within half a frame of the last row
    for ds in (tr, va):
        assert len(ds) == sum(max(0, e.num_frames - 30) for e in ds.episodes)
    item = tr[len(tr) - 1]
    assert item["video"].shape == (3, 3, 5, 32, 40) and item["video"].dtype == torch.uint8
    assert item["cond"]["action"].shape == (4, A) and item["cond"]["action"].dtype == torch.float32
    e = tr.episodes[-1]
    assert item["task"] == TASKS[e.index % 2] and item["key"] == f"{e.name}/{e.num_frames - 31}"
    batch = next(iter(torch.utils.data.DataLoader(tr, batch_size=2)))
    assert batch["video"].shape == (2, 3, 3, 5, 32, 40) and len(batch["task"]) == 2


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
@pytest.mark.parametrize("fps", [4, 10, 30])
def test_frames_chosen_by_timestamp(folders, version, fps):
    """Every camera (h264 with B-frames, AV1) returns the frames the nearest-timestamp rule names, pixel-equal to a
    full decode of the file, and a clip late in a shared v3 file decodes a few GOPs, not the file from its start."""
    ds = lerobot.LeRobotDataset(folders[version], "train", num_frames=5, fps=fps, size=None, val_fraction=0)
    stride = FPS / fps
    for e, ep in enumerate(ds.episodes):
        for start in (0, ep.num_frames - 1 - int(4 * stride + 0.5), 3):
            before = ds.decoded_frames
            video = ds.episode_frames(e, start, 5)
            want = reference_rows(ep.num_frames, start, 5, stride)
            assert [identify(video[v, :, k]) for v in range(3) for k in range(5)] == [(ep.index, r) for r in want] * 3
            assert ds.decoded_frames - before <= 3 * (want[-1] - want[0] + GOP + 3)   # from the keyframe before
    # against a reference decode of a whole file (the AV1 camera of the last episode)
    path, from_ts, _ = ds.episodes[-1].videos[1]
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec.canonical_name == "av1" and "libdav1d" in av.codecs_available
        full = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    offset = int(round(from_ts * FPS))
    rows = lerobot.clip_rows(ds.episodes[-1].timestamps, 2, 5, fps)
    ref = np.stack([full[offset + r] for r in rows])
    assert torch.equal(ds.episode_frames(len(ds.episodes) - 1, 2, 5)[1].permute(1, 2, 3, 0), torch.from_numpy(ref))


@pytest.mark.parametrize("norm", ["none", "mean_std", "min_max"])
@pytest.mark.parametrize("mode", ["absolute", "delta", "delta_state"])
def test_action_types_and_normalisation(folders, rows, mode, norm):
    allact = np.concatenate([r["action"] for r in rows]).astype(np.float64)
    mean, std, lo, hi = allact.mean(0), allact.std(0), allact.min(0), allact.max(0)
    for version in ("v2.1", "v3.0"):   # v2.1 pools its per-episode stats, v3.0 reads stats.json
        ds = lerobot.LeRobotDataset(folders[version], "train", num_frames=5, fps=4, size=(16, 16), action_type=mode,
                                    action_norm=norm, val_fraction=0)
        if norm != "none":
            np.testing.assert_allclose(ds.stats["mean"], mean, rtol=1e-5)
            np.testing.assert_allclose(ds.stats["std"], std, rtol=1e-4)
        for e, ep in enumerate(ds.episodes):
            a, s = rows[ep.index]["action"].astype(np.float64), rows[ep.index]["state"].astype(np.float64)
            i = np.array(reference_rows(ep.num_frames, 6, 5, 7.5))     # rows 6, 13, 21, 28, 36
            ref = {"absolute": a[i[1:] - 1], "delta": a[i[1:]] - a[i[:-1]], "delta_state": a[i[1:] - 1] - s[i[:-1]]}[mode]
            if norm != "none":
                offset, scale = (mean, std) if norm == "mean_std" else ((hi + lo) / 2, (hi - lo) / 2)
                ref = (ref - offset) / scale if mode == "absolute" else ref / scale
            np.testing.assert_allclose(ds.episode_actions(e, 6, 5).numpy(), ref, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(ds.episode_cond(e)["action"][:4], ds.episode_actions(e, 0, 5).numpy())
        if norm == "min_max" and mode == "absolute":
            whole = np.concatenate([ds.episode_actions(e, 0, None, ) for e in range(len(ds.episodes))])
            assert whole.min() >= -1 - 1e-5 and whole.max() <= 1 + 1e-5


def test_stride_one_pairs_each_frame_with_its_own_action(folders, rows):
    ds = lerobot.LeRobotDataset(folders["v3.0"], "train", num_frames=4, size=(16, 16), action_norm="none", val_fraction=0)
    assert ds.fps == FPS and len(ds) == sum(n - 3 for n in LENGTHS)
    np.testing.assert_allclose(ds[0]["cond"]["action"].numpy(), rows[0]["action"][:3])


def test_errors_name_the_problem(folders, tmp_path):
    root = folders["v3.0"]
    with pytest.raises(UserError, match=r"no camera 'observation.images.front'; the cameras are 0 = "
                                             r"observation.images.top, 1 = observation.images.wrist, 2 = "):
        lerobot.LeRobotDataset(root, cameras=("observation.images.front",))
    with pytest.raises(UserError, match="camera index 3 out of range"):
        lerobot.LeRobotDataset(root, cameras=(0, 3))
    c = train_config(root)
    with pytest.raises(UserError, match=r"--action_dim=7: the actions of .* have 10 dimensions but the model takes 7: "
                                        r"set action_dim=10"):
        data.make_dataset(dict(c, action_dim=7), "train")
    with pytest.raises(UserError, match=r"--frame_stride=2: a LeRobot folder .* takes its clip rate from fps"):
        data.make_dataset(dict(c, frame_stride=2), "train")
    with pytest.raises(UserError, match=r"--action_type='relative': must be one of absolute, delta, delta_state"):
        data.make_dataset(dict(c, action_type="relative"), "train")
    with pytest.raises(UserError, match="fps=60 would repeat frames"):
        lerobot.LeRobotDataset(root, fps=60)
    with pytest.raises(UserError, match="has no feature 'observation.joints'"):
        lerobot.LeRobotDataset(root, action_type="delta_state", state_key="observation.joints")
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    info = json.loads((bad / "meta" / "info.json").read_text())
    (bad / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(UserError, match=r"info.json: codebase_version 'v1.6'"):
        lerobot.LeRobotDataset(bad)


def train_config(root, **kw):
    """train.py's config block (its defaults) for a LeRobot folder: what data.make_dataset is given."""
    import configurator
    c = configurator.script_defaults(str(Path(__file__).resolve().parents[1] / "train.py"))
    return {**c, **dict(data_root=str(root), cameras=(0, 2), action_dim=A, frame_size=(16, 16), num_frames=5), **kw}


def test_make_dataset_reads_lerobot_folders(folders):
    """The factory finds the format from the folder; the protocol's attributes and cond items; no latent cache."""
    ds = data.make_dataset(train_config(folders["v3.0"]), "train", say=lambda *a: None)
    assert isinstance(ds, lerobot.LeRobotDataset) and ds.action_dim == A and ds.num_frames == 5
    assert ds.episode_names == [ep.name for ep in ds.episodes] and len(ds.window_episode) == len(ds)
    item = ds[3]
    e, s = int(ds.window_episode[3]), int(ds.window_start[3])
    assert item["video"].shape == (2, 3, 5, 16, 16) and torch.equal(item["cond"]["action"], ds.episode_cond(e, s, 5)["action"])
    assert ds.episode_frames(e).shape[2] == ds.episode_cond(e)["action"].shape[0] + 1
    val = data.make_dataset(train_config(folders["v3.0"]), "val", say=lambda *a: None)
    assert (np.diff(val.window_start[val.window_episode == val.window_episode[0]]) == 4).all()   # distinct clips
    with pytest.raises(UserError, match="--latent_cache='c': latent caches are built from Bridge/IRASim"):
        data.make_dataset(train_config(folders["v3.0"], latent_cache="c"), "train", say=lambda *a: None)


def test_pyarrow_missing_is_one_clear_line(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"reading LeRobot datasets needs pyarrow \(pip install pyarrow\)"):
        lerobot.LeRobotDataset(folders["v3.0"])


def test_check_reports_cameras_and_problems(folders, rows, tmp_path, capsys):
    assert checks.check_lerobot(folders["v3.0"], num_frames=5, fps=4) == []
    out = capsys.readouterr().out
    total = sum(LENGTHS)
    assert f"observation.images.wrist{'':10}{'av1':>8}{'30.0':>6}{'48x64':>11}{total:>9}{1:>7}" in out
    assert f"observation.images.top{'':12}{'h264':>8}" in out and "OK: 5 episodes" in out
    clips = re.findall(r"^(train|val) +(\d+) episodes +(\d+) clips of 5 frames at 4 fps$", out, re.M)
    assert sum(int(c) for _, _, c in clips) == sum(n - 30 for n in LENGTHS) and sum(int(e) for _, e, _ in clips) == 5
    bad = tmp_path / "bad"
    shutil.copytree(folders["v2.1"], bad)
    r = dict(rows[2])
    r["action"] = r["action"].copy()
    r["action"][7, 3] = np.nan
    pq.write_table(rows_table([r], fixed=False), bad / "data/chunk-000/episode_000002.parquet")
    short = bad / "videos/chunk-000/observation.images.top/episode_000001.mp4"
    write_video(short, [paint(1, i) for i in range(LENGTHS[1] - 3)], "libx264")
    problems = checks.check_lerobot(bad, fast=True)
    assert problems == [f"{bad}/data/chunk-000/episode_000002.parquet: episode 2: 1 NaN/inf in 'action', first at row 7",
                        f"{short}: episode 1 has {LENGTHS[1] - 3} video frames ({(LENGTHS[1] - 3) / 30:.3f} s) but "
                        f"{LENGTHS[1]} parquet rows ({LENGTHS[1] / 30:.3f} s)"]
    assert "FAILED: 2 problem(s)" in capsys.readouterr().out


def with_info(src, dst, **changes):
    """A copy of a LeRobot folder with info.json fields changed."""
    shutil.copytree(src, dst)
    info = json.loads((dst / "meta" / "info.json").read_text())
    (dst / "meta" / "info.json").write_text(json.dumps({**info, **changes}))
    return dst


def test_declared_fps_that_the_data_contradicts_is_refused(folders, tmp_path):
    """info.json says 15 fps: the parquet timestamps (30 per second) contradict it; with the timestamps rewritten
    to 15 per second, the videos' own 30 fps do. The reader refuses both naming the file, and check lists them."""
    bad = with_info(folders["v2.1"], tmp_path / "fps15", fps=15)
    parquet = bad / "data/chunk-000/episode_000000.parquet"
    with pytest.raises(UserError, match=f"{parquet}: episode 0: the timestamps run at 30 per second but "
                                        f".*info.json says fps 15"):
        lerobot.LeRobotDataset(bad, fps=4)
    problems = checks.check_lerobot(bad, fast=True)
    assert sum("the timestamps run at 30 per second" in p for p in problems) == len(LENGTHS)
    for path in sorted((bad / "data").glob("*/*.parquet")):
        t = pq.read_table(path)
        pq.write_table(t.set_column(t.schema.get_field_index("timestamp"), "timestamp",
                                    pa.array(t.column("timestamp").to_numpy() * 2, pa.float32())), path)
    video = bad / "videos/chunk-000/observation.images.top/episode_000000.mp4"
    with pytest.raises(UserError, match=f"{video}: the video runs at 30 fps but .*info.json says fps 15"):
        lerobot.LeRobotDataset(bad, fps=4)
    assert any(p.startswith(f"{video}: the video runs at 30 fps") for p in checks.check_lerobot(bad, fast=True))


def test_nan_in_the_actions_is_refused_before_training(folders, rows, tmp_path):
    """What check finds, the reader refuses when the dataset is opened (not 5 steps into training)."""
    bad = tmp_path / "nan"
    shutil.copytree(folders["v2.1"], bad)
    r = dict(rows[2], state=rows[2]["state"].copy())
    r["state"][4, 1] = np.inf
    path = bad / "data/chunk-000/episode_000002.parquet"
    pq.write_table(rows_table([r], fixed=False), path)
    lerobot.LeRobotDataset(bad, val_fraction=0)   # absolute actions: the state column is not read
    with pytest.raises(UserError, match=f"{path}: episode 2: 1 NaN/inf in 'observation.state', first at row 4"):
        lerobot.LeRobotDataset(bad, action_type="delta_state", val_fraction=0)


def run_data_py(*args):
    return subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "data.py"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_check_takes_training_settings(folders, tmp_path):
    """Without meta/stats.json, training's default action_norm refuses the folder: so does check, saying which
    settings it used; with --action-norm none (what such a run must set) it passes."""
    bare = tmp_path / "nostats"
    shutil.copytree(folders["v3.0"], bare)
    (bare / "meta" / "stats.json").unlink()
    p = run_data_py("check", bare, "--fast", "--num-frames", "5")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "settings (as training: train.py's defaults unless given): fps=4, " in p.stdout
    assert "action_norm='mean_std'" in p.stdout
    assert f"{bare / 'meta' / 'stats.json'}: not found" in p.stdout and "(action_norm='mean_std';" in p.stdout
    p = run_data_py("check", bare, "--fast", "--num-frames", "5", "--action-norm", "none")
    assert p.returncode == 0 and "OK: 5 episodes" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("info, problem", [
    (dict(codebase_version="v4.0"), "codebase_version 'v4.0'; nanocosmos reads v2.0, v2.1, v3.0"),
    (dict(fps="thirty"), "'fps' must be a positive number, got 'thirty'"),
    (dict(features=["action"]), "'features' must be an object"),
    ("[1, 2]", "must be a JSON object, got list"),
    ('{"fps": 30,', "cannot read JSON"),
])
def test_bad_info_json_is_one_line(folders, tmp_path, info, problem):
    bad = tmp_path / "bad"
    if isinstance(info, dict):
        with_info(folders["v3.0"], bad, **info)
    else:
        shutil.copytree(folders["v3.0"], bad)
        (bad / "meta" / "info.json").write_text(info)
    for command in ("check", "bench"):
        p = run_data_py(command, bad)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().startswith(f"error: {bad / 'meta' / 'info.json'}: {problem}")
        assert len(p.stderr.strip().splitlines()) == 1


def test_bench_counts_decoded_frames(folders):
    figures = checks.bench_lerobot(folders["v3.0"], cameras=(1,), size=(32, 32), num_frames=5, fps=4, workers=0,
                                    batch_size=2, batches=3)
    assert figures["dataset_clips_per_s"] > 0 and figures["loader_clips_per_s"] > 0
    assert 5 <= figures["decoded_frames_per_clip"] <= 31 + GOP + 3   # the clip's span and at most one GOP before it


def test_tiny_training_and_eval_on_a_lerobot_folder(folders, tmp_path):
    """A few steps of a very small model on the v3.0 folder (3 cameras by name and index, the 10-D action at 10 fps),
    then sample.py --eval rolls out a LeRobot episode from the checkpoint."""
    import sample
    import train
    out = tmp_path / "run"
    train.main([str(Path(__file__).resolve().parents[1] / "config" / "tiny_cpu.py"), f"--data_root={folders['v3.0']}",
                f"--out_dir={out}", "--synth_if_missing=False", "--cameras=('observation.images.top', 'wrist', 2)",
                "--action_dim=10", "--fps=10", "--action_type=delta_state", "--model_channels=32", "--num_blocks=2",
                "--num_heads=2", "--frame_size=(32, 48)", "--batch_size=2", "--num_workers=0", "--eval_interval=0",
                "--log_interval=1", "--warmup_iters=1", "--max_iters=3", "--save_interval=3"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[-1]["step"] == 3 and np.isfinite(log[-1]["loss"])
    report = sample.main(["--eval", f"--dit_path={out}", "--eval_episodes=1", "--num_steps=2", "--tokenizer=pixel",
                          f"--eval_json={tmp_path / 'eval.json'}"])
    assert report["episodes"] and np.isfinite(report["psnr"])


def test_data_py_commands_dispatch_lerobot_folders(folders):
    """`python data.py check|bench ROOT` on a LeRobot folder runs lerobot's check and bench (camera names, --fps)."""
    root = Path(__file__).resolve().parents[1]
    run = lambda *args: subprocess.run([sys.executable, "data.py", *args], cwd=root, capture_output=True, text=True,  # noqa: E731
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    p = run("check", str(folders["v2.1"]), "--cameras", "wrist,0", "--num-frames", "5", "--fps", "4", "--fast")
    assert p.returncode == 0 and "LeRobot v2.1" in p.stdout and "OK: 5 episodes" in p.stdout, p.stdout + p.stderr
    assert p.stdout.index("observation.images.wrist") < p.stdout.index("observation.images.top")
    p = run("bench", str(folders["v3.0"]), "--cameras", "1", "--size", "32x32", "--num-frames", "5", "--fps", "4",
            "--workers", "1", "--batches", "2")   # a loader worker process: the dataset pickles
    assert p.returncode == 0 and "clips/s" in p.stdout, p.stdout + p.stderr


def test_sparse_clip_seeks_ahead_between_keyframes(tmp_path, monkeypatch):
    """LeRobot encodes a keyframe every 2 frames: a 4 fps clip of a 30 fps AV1 video decodes ~2 frames per frame
    it returns (seeking ahead) instead of the whole 91-frame span, and returns exactly the right frames."""
    monkeypatch.setattr(sys.modules[__name__], "GOP", 2)
    path = tmp_path / "g2.mp4"
    write_video(path, [paint(0, i % 60) for i in range(120)], "libsvtav1")
    rows = reference_rows(120, 3, 13, 7.5)                         # 3, 10, 18, 25, ..., 93
    x, decoded = lerobot.decode_at(path, np.array(rows) / FPS, 0.5 / FPS)
    assert [identify(f)[1] for f in x] == [r % 60 for r in rows]
    assert decoded <= 2 * len(rows) + 1 < rows[-1] - rows[0]


def test_train_py_refuses_bad_lerobot_data_in_one_line(folders, rows, tmp_path):
    """What the reader refuses (a NaN action, a declared fps the data contradicts, a frame_stride LeRobot has no
    use for) stops `python train.py` in one line naming the file or key, before any step."""
    nan = tmp_path / "nan"
    shutil.copytree(folders["v2.1"], nan)
    r = dict(rows[3], action=rows[3]["action"].copy())
    r["action"][5, 0] = np.nan
    parquet = nan / "data/chunk-000/episode_000003.parquet"
    pq.write_table(rows_table([r], fixed=False), parquet)
    fps15 = with_info(folders["v2.1"], tmp_path / "fps15", fps=15)
    for root, extra, says in (
            (nan, [], f"error: {parquet}: episode 3: 1 NaN/inf in 'action', first at row 5"),
            (fps15, [], f"error: {fps15 / 'data/chunk-000/episode_000000.parquet'}: episode 0: the timestamps run at "
                        f"30 per second but"),
            (folders["v3.0"], ["--frame_stride=2"], "error: --frame_stride=2: a LeRobot folder")):
        p = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"),
                            f"--data_root={root}", f"--out_dir={tmp_path / 'out'}", "--cameras=0", f"--action_dim={A}",
                            "--action_norm=none", "--frame_size=(16, 16)", "--num_frames=5", "--num_workers=0",
                            "--model_channels=32", "--num_blocks=1", "--num_heads=2", "--max_iters=2", *extra],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert p.stderr.strip().splitlines()[-1].startswith(says), p.stderr
        assert "step 1:" not in p.stdout
