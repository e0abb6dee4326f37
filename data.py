"""
Robot video data for nanocosmos: datasets, actions, frame decoding, the synthetic world, and three commands.

Two on-disk layouts are read (the layout is detected from the folder):
  IRASim / Bridge   root/annotation/<split>/<id>.json; camera k is root / json["videos"][k]["video_path"]
  camera folders    root/annotations/[<split>/]<name>.json; camera k is root/videos/cam<k>/<name>.mp4
                    (without split folders a deterministic hash of <name> holds out `val_fraction` as "val")
An item is {"video": uint8 [V,3,T,H,W], "action": float32 [T-1,7], "key": "<episode>/<start>"}, on the CPU.
Actions are recomputed from `state` and `continuous_gripper_state` exactly as Cosmos does (compute_actions).

    python data.py synth --out datasets/synth --episodes 100 --cameras 4   # the built-in robot world
    python data.py check ROOT [--cameras 0,1,2,3] [--split train,val]      # validate a dataset, list problems
    python data.py bench ROOT [--cameras 0,1] [--size 256x320]              # loader clips/s vs raw decode
"""

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from av.video.reformatter import VideoReformatter
import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# errors: every message starts with the offending file, so a user can go and look at it


class DataError(ValueError):
    """A dataset file is unreadable or inconsistent. str(e) is '<file>: <problem>'."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


class MissingFileError(DataError, FileNotFoundError):
    """A file the dataset refers to does not exist (catchable as FileNotFoundError too)."""

# -----------------------------------------------------------------------------
# the action convention (Cosmos `_get_actions`, dataset_utils.py), float64 throughout


def euler_to_rotm(rpy):
    """[..., 3] (roll, pitch, yaw) -> [..., 3, 3] = Rz(yaw) @ Ry(pitch) @ Rx(roll), i.e. scipy from_euler('xyz')."""
    rpy = np.asarray(rpy, dtype=np.float64)
    ca, sa = np.cos(rpy[..., 0]), np.sin(rpy[..., 0])
    cb, sb = np.cos(rpy[..., 1]), np.sin(rpy[..., 1])
    cc, sc = np.cos(rpy[..., 2]), np.sin(rpy[..., 2])
    return np.stack([
        np.stack([cb * cc, cc * sb * sa - sc * ca, cc * sb * ca + sc * sa], -1),
        np.stack([cb * sc, sc * sb * sa + cc * ca, sc * sb * ca - cc * sa], -1),
        np.stack([-sb, cb * sa, cb * ca], -1),
    ], -2)


def rotm_to_euler(R):
    """[..., 3, 3] -> [..., 3] (roll, pitch, yaw), each in (-pi, pi]; inverse of euler_to_rotm for |pitch| < pi/2."""
    R = np.asarray(R, dtype=np.float64)
    sy = np.hypot(R[..., 0, 0], R[..., 1, 0])
    singular = sy < 1e-6  # pitch = +-pi/2: roll and yaw are one angle, Cosmos puts it all in roll
    x = np.where(singular, np.arctan2(-R[..., 1, 2], R[..., 1, 1]), np.arctan2(R[..., 2, 1], R[..., 2, 2]))
    y = np.arctan2(-R[..., 2, 0], sy)
    z = np.where(singular, 0.0, np.arctan2(R[..., 1, 0], R[..., 0, 0]))
    rpy = np.stack([x, y, z], -1)
    return np.where(rpy <= -np.pi, rpy + 2 * np.pi, rpy)  # atan2 can return -pi; Cosmos wraps to (-pi, pi]


def relative_actions(state_T_S, gripper_T):
    """Unscaled float64 [T-1, 7] actions; see compute_actions."""
    state = np.asarray(state_T_S, dtype=np.float64)
    gripper = np.asarray(gripper_T, dtype=np.float64)
    assert state.ndim == 2 and state.shape[1] >= 6 and gripper.shape == state.shape[:1], (state.shape, gripper.shape)
    p, R = state[:, :3], euler_to_rotm(state[:, 3:6])
    R_prev_T = np.swapaxes(R[:-1], -1, -2)
    actions = np.empty((len(state) - 1, 7), dtype=np.float64)
    actions[:, 0:3] = np.einsum("tij,tj->ti", R_prev_T, p[1:] - p[:-1])
    actions[:, 3:6] = rotm_to_euler(R_prev_T @ R[1:])
    actions[:, 6] = gripper[1:]
    return actions


def compute_actions(state_T_S, gripper_T, action_scale=20.0, gripper_scale=1.0):
    """
    The Cosmos robot action between consecutive rows of an end-effector trajectory, float32 [T-1, 7]:
      a[k-1, 0:3] = R_{k-1}^T (p_k - p_{k-1})       translation in the previous end-effector frame
      a[k-1, 3:6] = rotm_to_euler(R_{k-1}^T R_k)    relative rotation, same Euler convention
      a[k-1, 6]   = gripper_k                       the target frame's continuous gripper value (not a delta)
    computed in float64, then scaled by [action_scale]*6 + [gripper_scale]. state_T_S is [T, >=6]
    (x, y, z, roll, pitch, yaw, anything else is ignored). For a frame stride s pass state[::s], gripper[::s], as Cosmos.
    """
    scale = np.array([action_scale] * 6 + [gripper_scale], dtype=np.float64)
    return (relative_actions(state_T_S, gripper_T) * scale).astype(np.float32)

# -----------------------------------------------------------------------------
# video: one reader, one writer, resize; all on the CPU


def resize_frames(x_N_3_H_W, size):
    """uint8 frames -> uint8 frames of exactly `size` = (H, W): bilinear with antialias (torchvision's resize), no crop."""
    if size is None or tuple(x_N_3_H_W.shape[-2:]) == tuple(size):
        return x_N_3_H_W
    x = F.interpolate(x_N_3_H_W.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def read_frames(path, indices_or_count, size=None):
    """
    Frames `indices_or_count` (a list of frame indices, or an int n for frames 0..n-1) of a video, uint8 [N,3,H,W].
    Decodes from the start only as far as the last index asked for, and converts to RGB only the frames returned.
    """
    if isinstance(indices_or_count, (int, np.integer)):
        indices_or_count = range(int(indices_or_count))
    indices = [int(i) for i in indices_or_count]
    if not indices or min(indices) < 0:
        raise ValueError(f"{path}: frame indices must be a non-empty list of non-negative ints, got {indices_or_count}")
    wanted, last, frames, decoded = set(indices), max(indices), {}, 0
    rgb = VideoReformatter()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(path, "has no video stream")
            for frame in container.decode(container.streams.video[0]):
                if decoded in wanted:
                    # one reformatter per video: frame.to_ndarray(format="rgb24") builds a new swscale context for
                    # every frame, which costs more than decoding it (2.5 ms vs 0.13 ms for 64x80; same pixels)
                    frames[decoded] = rgb.reformat(frame, format="rgb24").to_ndarray()
                decoded += 1
                if decoded > last:
                    break
    except FileNotFoundError as e:
        raise MissingFileError(path, "video file not found") from e
    except av.error.FFmpegError as e:
        raise DataError(path, f"cannot decode video ({e})") from e
    if decoded <= last:
        raise DataError(path, f"has only {decoded} decodable frames, frame {last} was asked for")
    x = torch.from_numpy(np.stack([frames[i] for i in indices])).permute(0, 3, 1, 2)
    return resize_frames(x, size).contiguous()


def probe_video(path):
    """(frame count, height, width) from the container header, without decoding (about 0.3 ms a file)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(path, "has no video stream")
            stream = container.streams.video[0]
            n, h, w = stream.frames, stream.codec_context.height, stream.codec_context.width
            if n <= 0:  # some containers do not record a frame count: count packets instead (still no decode)
                n = sum(1 for p in container.demux(stream) if p.size > 0)
    except FileNotFoundError as e:
        raise MissingFileError(path, "video file not found") from e
    except av.error.FFmpegError as e:
        raise DataError(path, f"cannot open video ({e})") from e
    if n <= 0 or h <= 0 or w <= 0:
        raise DataError(path, f"video has {n} frames of {h}x{w}")
    return n, h, w


def count_frames(path):
    """(decoded frame count, height, width): the slow, certain count that `check` uses."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(path, "has no video stream")
            n, h, w = 0, 0, 0
            for frame in container.decode(container.streams.video[0]):
                n, h, w = n + 1, frame.height, frame.width
    except FileNotFoundError as e:
        raise MissingFileError(path, "video file not found") from e
    except av.error.FFmpegError as e:
        raise DataError(path, f"cannot decode video ({e})") from e
    if n == 0:
        raise DataError(path, "video has no decodable frames")
    return n, h, w


def write_mp4(path, frames, fps=4, codec="libx264", crf=18, preset="medium"):
    """
    The one mp4 writer of the project. frames: uint8 [T,H,W,3] (numpy or tensor), H and W even (yuv420p).
    libx264 at `crf` (18 = visually lossless); falls back to mpeg4 at a high bit rate when this ffmpeg has no x264.
    Written to a temporary name and renamed, so a crash never leaves a half-written video behind.
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"{path}: write_mp4 wants uint8 [T,H,W,3] frames, got {frames.dtype} {list(frames.shape)}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"{path}: frame size {H}x{W} must be even for yuv420p")
    if codec not in av.codecs_available:
        codec = "mpeg4"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": preset}
        else:
            stream.bit_rate = max(1_000_000, 8 * H * W * int(math.ceil(fps)))
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# layouts and annotations: parsed once, validated, every problem named with its file


def detect_layout(root):
    root = Path(root)
    if (root / "annotation").is_dir():
        return "irasim"
    if (root / "annotations").is_dir():
        return "camera_folders"
    if not root.is_dir():
        raise MissingFileError(root, "dataset folder not found")
    raise DataError(root, "neither annotation/<split>/*.json (IRASim) nor annotations/*.json (camera folders) found")


def available_splits(root):
    root, layout = Path(root), detect_layout(root)
    if layout == "irasim":
        return sorted(p.name for p in (root / "annotation").iterdir() if p.is_dir())
    folders = sorted(p.name for p in (root / "annotations").iterdir() if p.is_dir())
    return folders or ["train", "val"]


def is_held_out(name, val_fraction):
    """Deterministic and stable: an episode's split depends only on its own name, so adding episodes moves none."""
    return zlib.crc32(name.encode()) % 1_000_000 < val_fraction * 1_000_000


def list_annotations(root, split, val_fraction=0.1):
    """Sorted annotation paths of a split (sorted by path, like Cosmos)."""
    root, layout = Path(root), detect_layout(root)
    folder = root / ("annotation" if layout == "irasim" else "annotations")
    if (folder / split).is_dir():
        return sorted((folder / split).glob("*.json"))
    if layout == "irasim" or any(p.is_dir() for p in folder.iterdir()):
        raise DataError(folder / split, f"split folder not found; splits here: {available_splits(root)}")
    if split not in ("train", "val"):
        raise DataError(folder, f"has no split folders, so only 'train' and 'val' (held out by name) exist, not {split!r}")
    paths = sorted(folder.glob("*.json"))
    held = [is_held_out(p.stem, val_fraction) for p in paths]
    if val_fraction > 0 and len(paths) > 1 and not any(held):  # tiny datasets: still hold out one, chosen by hash
        held[min(range(len(paths)), key=lambda i: zlib.crc32(paths[i].stem.encode()))] = True
    return [p for p, h in zip(paths, held) if h == (split == "val")]


def _array(d, key, path):
    try:
        return np.asarray(d[key], dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise DataError(path, f"{key!r} is not a rectangular array of numbers ({e})") from e


def parse_annotation(path):
    """One annotation JSON -> dict(state [T,S] f64, gripper [T] f64, action [T-1,>=6] f64 or None, videos, json)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MissingFileError(path, "annotation file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read annotation ({e})") from e
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; truncated?)") from e
    if not isinstance(d, dict):
        raise DataError(path, f"annotation must be a JSON object, got {type(d).__name__}")
    for key in ("state", "continuous_gripper_state"):
        if key not in d:
            raise DataError(path, f"missing key {key!r}")
    state, gripper = _array(d, "state", path), _array(d, "continuous_gripper_state", path)
    if state.ndim != 2 or state.shape[1] < 6 or state.shape[0] < 2:
        raise DataError(path, f"'state' must be T x >=6 (x, y, z, roll, pitch, yaw, ...) with T >= 2, got {list(state.shape)}")
    T = len(state)
    if gripper.shape != (T,):
        raise DataError(path, f"'continuous_gripper_state' must have shape [{T}] like 'state', got {list(gripper.shape)}")
    for key, x in (("state", state), ("continuous_gripper_state", gripper)):
        bad = np.argwhere(~np.isfinite(x))
        if len(bad):
            raise DataError(path, f"{key!r} has {len(bad)} NaN/inf values, first at index {bad[0].tolist()}")
    action = None
    if "action" in d:
        action = _array(d, "action", path)
        if action.ndim != 2 or action.shape[0] != T - 1 or action.shape[1] < 6:
            raise DataError(path, f"'action' must be [{T - 1}, 7] (one row per state transition), got {list(action.shape)}")
    return dict(state=state, gripper=gripper, action=action, videos=d.get("videos"), json=d)


def camera_paths(root, layout, ann_path, ann, cameras):
    """The video file of each requested camera for one annotation."""
    root = Path(root)
    if layout == "camera_folders":
        return [root / "videos" / f"cam{k}" / f"{Path(ann_path).stem}.mp4" for k in cameras]
    videos = ann["videos"]
    if not isinstance(videos, list) or not videos:
        raise DataError(ann_path, "missing key 'videos' (a list of {'video_path': ...}, one per camera)")
    paths = []
    for k in cameras:
        if not 0 <= k < len(videos):
            raise DataError(ann_path, f"lists {len(videos)} camera(s) in 'videos', camera {k} was asked for")
        entry = videos[k]
        rel = entry.get("video_path") if isinstance(entry, dict) else entry  # P2.5 also accepts a bare string
        if not isinstance(rel, str):
            raise DataError(ann_path, f"videos[{k}] has no 'video_path' string")
        paths.append(root / rel)
    return paths


def check_frame_counts(ann_path, T, videos, counts):
    """Every camera must have the same number of frames, and at least one per state."""
    if len(set(counts)) > 1:
        listing = ", ".join(f"{v} has {n}" for v, n in zip(videos, counts))
        raise DataError(ann_path, f"cameras have different frame counts: {listing}")
    if counts[0] < T:
        raise DataError(videos[0], f"has {counts[0]} frames but {ann_path} has {T} states")


@dataclass
class Episode:
    name: str            # annotation file stem; keys are "<name>/<start frame>"
    annotation: Path
    videos: list         # one Path per requested camera
    num_frames: int      # = len(state); every video has at least this many frames
    actions: np.ndarray  # float32 [num_frames - frame_stride, 7]: row j is the scaled action from frame j to j + frame_stride


def load_episode(root, layout, ann_path, cameras, frame_stride=1, action_scale=20.0, gripper_scale=1.0):
    ann = parse_annotation(ann_path)
    videos = camera_paths(root, layout, ann_path, ann, cameras)
    T = len(ann["state"])
    check_frame_counts(ann_path, T, videos, [probe_video(v)[0] for v in videos])
    # row j = action between states j and j+s, i.e. compute_actions on state[::s] of every phase at once
    s = frame_stride
    actions = np.zeros((max(T - s, 0), 7), dtype=np.float32)
    for phase in range(min(s, T)):
        actions[phase::s] = compute_actions(ann["state"][phase::s], ann["gripper"][phase::s], action_scale, gripper_scale)
    return Episode(Path(ann_path).stem, Path(ann_path), videos, T, actions)

# -----------------------------------------------------------------------------
# the dataset


class RobotVideoDataset(torch.utils.data.Dataset):
    """
    Windows of `num_frames` frames, `frame_stride` apart, starting every `start_stride` frames (full windows only),
    sorted by (annotation path, start). No randomness at all: shuffling is the sampler's job, so
    DistributedSampler and DataLoader workers see the same dataset everywhere.
    """

    def __init__(self, root, split="train", num_frames=13, cameras=(0,), size=(256, 320), frame_stride=1, start_stride=1,
                 action_scale=20.0, gripper_scale=1.0, val_fraction=0.1, skip_bad=False):
        assert num_frames >= 2 and frame_stride >= 1 and start_stride >= 1, (num_frames, frame_stride, start_stride)
        self.root, self.split, self.layout = Path(root), split, detect_layout(root)
        self.num_frames, self.frame_stride, self.start_stride = num_frames, frame_stride, start_stride
        self.cameras = tuple(int(k) for k in cameras)
        self.size = None if size is None else tuple(size)
        self.episodes, skipped = [], 0
        for ann_path in list_annotations(self.root, split, val_fraction):
            try:
                self.episodes.append(load_episode(self.root, self.layout, ann_path, self.cameras, frame_stride,
                                                  action_scale, gripper_scale))
            except DataError as e:
                if not skip_bad:
                    raise
                print(f"skipping bad episode: {e}")
                skipped += 1
        if skipped:
            print(f"skipped {skipped} bad episode(s) of {skipped + len(self.episodes)} in {self.root} split {split!r}")
        if not self.episodes:
            raise DataError(self.root, f"split {split!r} has no usable episodes")
        span = (num_frames - 1) * frame_stride
        windows = [(e, i) for e, ep in enumerate(self.episodes) for i in range(0, ep.num_frames - span, start_stride)]
        self.window_episode = np.array([e for e, _ in windows], dtype=np.int64)
        self.window_start = np.array([i for _, i in windows], dtype=np.int64)

    def __len__(self):
        return len(self.window_start)

    def __repr__(self):
        return (f"RobotVideoDataset({str(self.root)!r}, split={self.split!r}, {self.layout}: {len(self.episodes)} episodes, "
                f"{len(self)} windows of {self.num_frames} frames at stride {self.frame_stride}, cameras {list(self.cameras)}, "
                f"size {self.size})")

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        e, start = int(self.window_episode[i]), int(self.window_start[i])
        return {
            "video": self.episode_frames(e, start, self.num_frames),
            "action": self.episode_actions(e, start, self.num_frames),
            "key": f"{self.episodes[e].name}/{start}",
        }

    def _count(self, episode_index, start, count):
        n, s = self.episodes[episode_index].num_frames, self.frame_stride
        count = 1 + (n - 1 - start) // s if count is None else count
        if start < 0 or count < 1 or start + (count - 1) * s >= n:
            raise IndexError(f"episode {self.episodes[episode_index].name} has {n} frames: "
                             f"{count} frames from {start} at stride {s} do not fit")
        return count

    def episode_frames(self, episode_index, start=0, count=None):
        """uint8 [V,3,count,H,W]: frames start, start+s, ... of every camera (count=None: as many as fit)."""
        ep = self.episodes[episode_index]
        count = self._count(episode_index, start, count)
        indices = range(start, start + count * self.frame_stride, self.frame_stride)
        views = [read_frames(v, indices, self.size) for v in ep.videos]  # each [count,3,H,W]
        return torch.stack(views).transpose(1, 2).contiguous()

    def episode_actions(self, episode_index, start=0, count=None):
        """float32 [count-1,7]: the actions between the frames that episode_frames(episode_index, start, count) returns."""
        count = self._count(episode_index, start, count)
        s = self.frame_stride
        return torch.from_numpy(self.episodes[episode_index].actions[start:start + (count - 1) * s:s].copy())

# -----------------------------------------------------------------------------
# the synthetic multi-camera robot world: a table, a big gripper with a red fin, cubes it pushes and carries.
# Geometry is oriented boxes, ray cast per pixel (only inside each box group's projected rectangle),
# Lambert shading and soft contact shadows. World frame: z up, table top at z = 0, metres.
# Built to make actions matter to a tiny model at 64x80: the cameras frame only the workspace, the end effector
# covers about a tenth of every view (a third of its width), its yaw stays within +-0.6 rad so an action in its own
# frame moves it the same way on screen every time, and the commanded motion is random (not inferable from the
# first frame). Measured with the default `python train.py`: validation action gain +0.044 (0.115 vs 0.159 with
# shuffled actions) after 1200 steps; +0.001 with the same world but any yaw, ~0 with the first (planner) world.

TABLE_HALF = 0.45                                 # the table top is |x|, |y| < TABLE_HALF
WORK_LO, WORK_HI = np.array([-0.13, -0.13, 0.045]), np.array([0.13, 0.13, 0.17])  # where the tool centre may go
LIGHT = np.array([0.35, 0.25, 1.0]) / np.linalg.norm([0.35, 0.25, 1.0])
AMBIENT, DIFFUSE = 0.38, 0.62
OPEN_GAP, CLOSED_GAP = 0.10, 0.02                 # distance between the fingers' inner faces
FINGER_HALF = np.array([0.02, 0.012, 0.036])
# End-effector parts in its own frame: x forward (the red fin), y across the fingers, z up (the fingers hang down
# at roll = pitch = 0). The pose in `state` is the tool centre point, between the fingers' centres.
EE_PARTS = [  # (centre, half extents, colour); the two fingers are added per frame because they move
    ((0.0, 0.0, 0.05), (0.045, 0.075, 0.016), (0.16, 0.22, 0.55)),    # palm
    ((0.0, 0.0, 0.105), (0.026, 0.026, 0.04), (0.55, 0.58, 0.66)),     # wrist
    ((0.08, 0.0, 0.05), (0.04, 0.012, 0.014), (0.92, 0.12, 0.08)),     # fin
]
FINGER_COLOUR = (0.08, 0.08, 0.1)
OBJECT_COLOURS = {"green": (0.15, 0.72, 0.22), "yellow": (0.96, 0.8, 0.1), "white": (0.95, 0.95, 0.95),
                  "magenta": (0.82, 0.2, 0.72), "cyan": (0.1, 0.78, 0.82), "orange": (1.0, 0.52, 0.1)}
CAMERA_FOV = 40.0                                 # horizontal field of view, degrees
# the motion: piecewise random velocity goals (segments of SEGMENT frames), eased into so the path is smooth
SPEED = (0.01, 0.045)                             # m per frame: 0.2 .. 0.9 after the x20 action scale
YAW_RATE = 0.12                                   # rad per frame, at most
YAW_LIMIT = 0.6                                   # |yaw| stays below this (soft), as a real arm's wrist mostly does:
# the actions are in the end effector's frame, so with any yaw at all a model would first have to read the yaw off
# the image (hard at 8x8-pooled 64x80) to know which way an action moves the gripper
SEGMENT = (3, 8)                                  # frames per velocity goal
EASE = 0.4                                        # velocity moves this fraction of the way to its goal each frame
TOGGLE = 0.08                                     # chance per frame of flipping the gripper command (after 4 frames)


def make_camera(k, size, target=(0.0, 0.0, 0.11)):
    """Camera k of a fixed rig around the workspace: front, left, right, top, then oblique views."""
    presets = [(0.0, 55, 0.7), (90.0, 52, 0.7), (-90.0, 52, 0.7), (180.0, 80.0, 0.72)]
    azimuth, elevation, distance = presets[k] if k < len(presets) else (45.0 + 90.0 * (k - len(presets)), 50.0, 0.7)
    az, el = math.radians(azimuth), math.radians(elevation)
    target = np.array(target)
    origin = target + distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    forward = (target - origin) / np.linalg.norm(target - origin)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)  # no camera looks straight down, so `right` is well defined
    down = np.cross(forward, right)
    H, W = size
    focal = 0.5 * W / math.tan(math.radians(CAMERA_FOV) / 2)
    u = (np.arange(W) + 0.5 - W / 2) / focal
    v = (np.arange(H) + 0.5 - H / 2) / focal
    rays = forward + u[None, :, None] * right + v[:, None, None] * down
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    cam = dict(origin=origin, forward=forward, right=right, down=down, focal=focal, size=(H, W),
               rays=np.ascontiguousarray(rays.transpose(2, 0, 1)))  # channel-first planes keep numpy's inner loops long
    # the static part of the picture (table, floor, wall) and its depth, rendered once per camera
    dz = rays[..., 2]
    t_table = np.where(dz < 0, -origin[2] / np.minimum(dz, -1e-9), np.inf)
    xy = origin[:2] + t_table[..., None] * rays[..., :2]
    on_table = np.isfinite(t_table) & (np.abs(xy) < TABLE_HALF).all(-1)
    checker = (np.floor(xy[..., 0] / 0.1) + np.floor(xy[..., 1] / 0.1)) % 2
    wood = np.where(checker[..., None] > 0, [0.80, 0.71, 0.58], [0.71, 0.62, 0.50])
    wood = np.where((np.abs(xy) > TABLE_HALF - 0.02).any(-1)[..., None], [0.45, 0.36, 0.28], wood)  # table rim
    t_floor = np.where(dz < 0, (-0.75 - origin[2]) / np.minimum(dz, -1e-9), np.inf)
    floor_xy = origin[:2] + t_floor[..., None] * rays[..., :2]
    on_floor = np.isfinite(t_floor) & (np.abs(floor_xy) < 3.0).all(-1)
    wall = (0.55 + 0.25 * np.clip(dz, -1, 1))[..., None] * np.array([0.8, 0.88, 1.0])
    image = np.where(on_table[..., None], wood * (AMBIENT + DIFFUSE * LIGHT[2]),
                     np.where(on_floor[..., None], [0.33, 0.33, 0.36], wall))
    xy = np.where(on_table[..., None], xy, 1e3)  # off the table: too far from anything to be shadowed
    cam.update(background=np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32),
               depth=np.where(on_table, t_table, np.inf).astype(np.float32),
               table_x=xy[..., 0].astype(np.float32), table_y=xy[..., 1].astype(np.float32))
    return cam


def project(cam, points_N_3):
    """World points -> (row, col) pixel coordinates and depth along the view axis."""
    q = points_N_3 - cam["origin"]
    z = np.maximum(q @ cam["forward"], 1e-6)
    H, W = cam["size"]
    col = cam["focal"] * (q @ cam["right"]) / z + W / 2 - 0.5
    row = cam["focal"] * (q @ cam["down"]) / z + H / 2 - 0.5
    return row, col, z


def screen_rect(cam, points_N_3, margin=1):
    """The pixel rectangle (r0, r1, c0, c1) covering some world points, clipped to the image (may be empty)."""
    row, col, _ = project(cam, points_N_3)
    H, W = cam["size"]
    return (max(int(row.min()) - margin, 0), min(int(row.max()) + 2 + margin, H),
            max(int(col.min()) - margin, 0), min(int(col.max()) + 2 + margin, W))


BOX_CORNERS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)


def draw_boxes(cam, image, depth, centre, R, offsets_B_3, halves_B_3, colours_B_3):
    """Ray-cast boxes that are axis-aligned in one rigid frame (centre, R) into image [3,H,W] and depth, in place."""
    corners = (offsets_B_3[:, None] + BOX_CORNERS[None] * halves_B_3[:, None]).reshape(-1, 3)
    r0, r1, c0, c1 = screen_rect(cam, centre + corners @ R.T)
    if r0 >= r1 or c0 >= c1:
        return
    d_3_P = (R.T @ cam["rays"][:, r0:r1, c0:c1].reshape(3, -1)).astype(np.float32)  # rays in the boxes' frame
    inv_3_P = 1.0 / np.where(np.abs(d_3_P) < 1e-9, np.float32(1e-9), d_3_P)
    o_B_3 = ((cam["origin"] - centre) @ R - offsets_B_3).astype(np.float32)  # the camera in each box's frame
    h_B_3 = halves_B_3.astype(np.float32)
    # slab test one axis at a time on [B,P] arrays: the entry distance is the largest per-axis entry
    t_near = t_far = axis = None
    for k in range(3):
        t1 = (-h_B_3[:, k:k + 1] - o_B_3[:, k:k + 1]) * inv_3_P[k]
        t2 = (h_B_3[:, k:k + 1] - o_B_3[:, k:k + 1]) * inv_3_P[k]
        t_in, t_out = np.minimum(t1, t2), np.maximum(t1, t2)
        if k == 0:
            t_near, t_far, axis = t_in, t_out, np.zeros(t_in.shape, dtype=np.int64)
        else:
            axis = np.where(t_in > t_near, k, axis)
            t_near, t_far = np.maximum(t_near, t_in), np.minimum(t_far, t_out)
    t_B_P = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    b = t_B_P.argmin(0)
    P = np.arange(len(b))
    t = t_B_P[b, P]
    rows, cols = np.divmod(P, c1 - c0)
    rows, cols = rows + r0, cols + c0
    visible = t < depth[rows, cols]
    if not visible.any():
        return
    p, b, rows, cols = P[visible], b[visible], rows[visible], cols[visible]
    ax = axis[b, p]
    facing = -np.sign(d_3_P[ax, p]) * (LIGHT @ R)[ax]  # the hit face's outward normal . light
    image[:, rows, cols] = colours_B_3[b].T * (AMBIENT + DIFFUSE * np.maximum(facing, 0.0))
    depth[rows, cols] = t[visible]


def finger_offsets(gap):
    y = 0.5 * gap + FINGER_HALF[1]
    return np.array([[0.0, y, 0.0], [0.0, -y, 0.0]])


def render(cam, ee_pose, gap, objects):
    """One frame, uint8 [H,W,3]. ee_pose = (p, R); objects = list of dicts with centre, R, half, colour."""
    p, R = ee_pose
    image, depth = cam["background"].copy(), cam["depth"].copy()
    # soft contact shadows: the light is nearly overhead, so a blob under each thing that fades with height
    casters = [(p[:2], 0.06 + 0.25 * p[2], 0.55 * math.exp(-p[2] / 0.25))]
    casters += [(o["centre"][:2], 1.5 * o["half"][0] + 0.25 * (o["centre"][2] - o["half"][2]),
                 0.55 * math.exp(-(o["centre"][2] - o["half"][2]) / 0.25)) for o in objects]
    for xy, radius, strength in casters:
        reach = 2.5 * radius  # exp(-6) is invisible
        r0, r1, c0, c1 = screen_rect(cam, np.array([[xy[0] + sx * reach, xy[1] + sy * reach, 0.0]
                                                    for sx in (-1, 1) for sy in (-1, 1)]))
        if r0 < r1 and c0 < c1:
            dx, dy = cam["table_x"][r0:r1, c0:c1] - np.float32(xy[0]), cam["table_y"][r0:r1, c0:c1] - np.float32(xy[1])
            image[:, r0:r1, c0:c1] *= 1.0 - np.float32(strength) * np.exp((dx * dx + dy * dy) * np.float32(-1 / radius ** 2))
    for o in objects:
        draw_boxes(cam, image, depth, o["centre"], o["R"], np.zeros((1, 3)), o["half"][None], np.array([o["colour"]]))
    offsets = np.array([c for c, _, _ in EE_PARTS] + list(finger_offsets(gap)))
    halves = np.array([h for _, h, _ in EE_PARTS] + [FINGER_HALF, FINGER_HALF])
    colours = np.array([c for _, _, c in EE_PARTS] + [FINGER_COLOUR, FINGER_COLOUR])
    draw_boxes(cam, image, depth, p, R, offsets, halves, colours)
    image = (image * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(image.transpose(1, 2, 0))


def rot_z(yaw):
    return euler_to_rotm([0.0, 0.0, yaw])


def wrap(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


def yaw_of(R):
    return math.atan2(R[1, 0], R[0, 0])


def random_direction(rng, z_weight=0.6):
    d = rng.normal(size=3) * [1.0, 1.0, z_weight]
    return d / max(np.linalg.norm(d), 1e-9)


def simulate_episode(rng, frames, num_objects):
    """
    Roll the world forward under a random, smooth 6-DoF motion: the end effector eases toward a new random velocity
    goal (any direction, speed in SPEED, sometimes a pause, sometimes a dive at a cube) every 3-8 frames, turns
    and tilts the same way, bounces off the workspace walls, and flips its gripper at random times (always closing
    when a dive reaches its cube). Cubes it touches are shoved; a cube between closing fingers is carried until they
    open. So where the gripper goes is NOT predictable from the first frame: only the actions tell.
    Returns state [T,7] (x, y, z, roll, pitch, yaw, 1 = gripper commanded open, as Bridge), continuous gripper [T]
    (0 open .. 1 closed; it stops on a held cube, like Bridge's 0.3-0.95), the scene of every frame, and texts.
    """
    objects = []
    for name in rng.choice(list(OBJECT_COLOURS), size=num_objects, replace=False):
        half = rng.uniform(0.024, 0.034)
        for _ in range(50):
            xy = rng.uniform(WORK_LO[:2], WORK_HI[:2])
            if all(np.linalg.norm(xy - q["centre"][:2]) > 0.1 for q in objects):
                break
        objects.append(dict(name=str(name), colour=OBJECT_COLOURS[name], half=np.full(3, half),
                            centre=np.array([xy[0], xy[1], half]), R=rot_z(rng.uniform(-np.pi, np.pi))))
    p = rng.uniform([WORK_LO[0], WORK_LO[1], 0.08], [WORK_HI[0], WORK_HI[1], WORK_HI[2] - 0.02])
    rpy = np.array([rng.normal(0, 0.1), rng.normal(0, 0.1), rng.uniform(-YAW_LIMIT, YAW_LIMIT)])
    v, v_goal, yaw_rate, yaw_goal, tilt_goal = np.zeros(3), np.zeros(3), 0.0, 0.0, rpy[:2].copy()
    g, command, dwell, held, dive, segment_left = 0.0, 0, 0, None, None, 0
    texts, states, grippers, scenes = [], [], [], []
    for t in range(frames):
        if t > 0:
            if segment_left <= 0:  # a new random goal for the next few frames
                segment_left, dive = int(rng.integers(SEGMENT[0], SEGMENT[1] + 1)), None
                kind = rng.random()
                if kind < 0.12:
                    v_goal, yaw_goal = np.zeros(3), 0.0
                elif kind < 0.35 and held is None and objects:
                    dive = (int(rng.integers(len(objects))), rng.uniform(0.6, 1.0) * SPEED[1])
                    segment_left = 12  # at most; reaching the cube ends it earlier
                    if command == 1:
                        command, dwell = 0, 0  # open to grasp
                else:
                    v_goal = random_direction(rng) * rng.uniform(*SPEED)
                    yaw_goal = rng.uniform(-YAW_RATE, YAW_RATE) * (rng.random() < 0.7)
                tilt_goal = np.clip(rng.normal(0, 0.15, 2), -0.3, 0.3)
            segment_left -= 1
            if dive is not None:  # head for the cube at grasp height and turn the fingers square to its faces
                o, speed = objects[dive[0]], dive[1]
                target = np.array([o["centre"][0], o["centre"][1], max(o["half"][2], WORK_LO[2])])
                v_goal = (target - p) * min(1.0, speed / max(np.linalg.norm(target - p), 1e-9))
                grip_yaw = yaw_of(o["R"]) + np.pi / 2 * np.round(wrap(rpy[2] - yaw_of(o["R"])) / (np.pi / 2))
                grip_yaw = np.clip(grip_yaw, -YAW_LIMIT, YAW_LIMIT)
                yaw_goal = float(np.clip(wrap(grip_yaw - rpy[2]), -YAW_RATE, YAW_RATE))
            for a in range(3):  # soft walls: a goal that would leave the workspace within 3 frames turns around
                ahead = p[a] + 3 * v[a]
                if (ahead < WORK_LO[a] and v_goal[a] < 0) or (ahead > WORK_HI[a] and v_goal[a] > 0):
                    v_goal[a] = -v_goal[a]
            v += EASE * (v_goal - v)
            p = p + v
            for a in range(3):  # rarely needed: the wall stops it
                if not WORK_LO[a] <= p[a] <= WORK_HI[a]:
                    p[a], v[a] = np.clip(p[a], WORK_LO[a], WORK_HI[a]), 0.0
            if abs(rpy[2] + 3 * yaw_rate) > YAW_LIMIT and yaw_goal * rpy[2] > 0:  # a soft wall for the wrist too
                yaw_goal = -yaw_goal
            yaw_rate += EASE * (yaw_goal - yaw_rate)
            rpy[2] = wrap(rpy[2] + yaw_rate)
            rpy[:2] += 0.3 * (tilt_goal - rpy[:2])
            dwell += 1
            if dive is not None and np.linalg.norm(target - p) < 0.012:
                command, dwell, segment_left, dive = 1, 0, 0, None  # there: close on it
            elif dwell >= 4 and rng.random() < TOGGLE:
                command, dwell = 1 - command, 0
            g += float(np.clip(command - g, -0.34, 0.34))
            R = euler_to_rotm(rpy)
            if command == 1 and held is None and g < 0.7:  # closing on a cube that sits between the fingers grasps it
                for i, o in enumerate(objects):
                    c = R.T @ (o["centre"] - p)
                    if (abs(c[0]) < FINGER_HALF[0] + 0.01 and abs(c[1]) < 0.5 * OPEN_GAP - 0.8 * o["half"][1]
                            and abs(c[2]) < 0.035):
                        held, o["grip"] = i, (c, R.T @ o["R"])
                        texts.append(f"pick up the {o['name']} cube")
                        break
            if command == 0 and held is not None:  # opening drops it; it lands upright
                objects[held]["R"] = rot_z(yaw_of(objects[held]["R"]))
                held = None
        R = euler_to_rotm(rpy)
        if held is not None:  # the fingers stop on the cube
            g = min(g, (OPEN_GAP - 2 * objects[held]["half"][1]) / (OPEN_GAP - CLOSED_GAP))
        gap = OPEN_GAP - g * (OPEN_GAP - CLOSED_GAP)
        for i, o in enumerate(objects):
            if i == held:
                c, R_rel = o["grip"]
                o["centre"], o["R"] = p + R @ c, R @ R_rel
                continue
            o["centre"][2] = max(o["half"][2], o["centre"][2] - 0.04)  # falling
            if p[2] - FINGER_HALF[2] < 2 * o["half"][2]:  # fingers low enough to shove the cube
                for f in finger_offsets(gap):
                    f_xy = (p + R @ f)[:2]
                    d = o["centre"][:2] - f_xy
                    reach = FINGER_HALF[0] + 1.2 * o["half"][0]
                    if np.linalg.norm(d) < reach:
                        o["centre"][:2] = f_xy + d / max(np.linalg.norm(d), 1e-9) * reach
                        if not texts or texts[-1] != f"push the {o['name']} cube":
                            texts.append(f"push the {o['name']} cube")
        for i, o in enumerate(objects):  # cubes on the table shove each other apart and stay on it
            for j in range(i + 1, len(objects)):
                q = objects[j]
                d = q["centre"][:2] - o["centre"][:2]
                reach = 1.2 * (o["half"][0] + q["half"][0])
                if held not in (i, j) and np.linalg.norm(d) < reach:
                    shift = 0.5 * (reach - np.linalg.norm(d)) * d / max(np.linalg.norm(d), 1e-9)
                    o["centre"][:2] -= shift
                    q["centre"][:2] += shift
            if i != held:
                o["centre"][:2] = np.clip(o["centre"][:2], -TABLE_HALF + o["half"][0], TABLE_HALF - o["half"][0])
        states.append([*p, *rpy, 1.0 - command])
        grippers.append(g)
        scenes.append(((p.copy(), R), gap, [dict(centre=o["centre"].copy(), R=o["R"].copy(), half=o["half"],
                                                 colour=o["colour"]) for o in objects]))
    return np.array(states), np.array(grippers), scenes, texts or ["move the gripper around"]


_CAMERAS = {}  # per process: the rig of each (camera, size), built once


def synth_episode(job):
    """Simulate, render and write one episode (a worker's unit of work). Deterministic in (seed, index)."""
    out, index, name, split, cameras, frames, size, seed, objects, fps = job
    rng = np.random.default_rng([seed, index])
    state, gripper, scenes, texts = simulate_episode(rng, frames, int(rng.integers(objects[0], objects[1] + 1)))
    for k in range(cameras):
        if (k, size) not in _CAMERAS:
            _CAMERAS[(k, size)] = make_camera(k, size)
        cam = _CAMERAS[(k, size)]
        frames_T_H_W_3 = np.stack([render(cam, *s) for s in scenes])
        # veryfast: 4x quicker than medium at the same size and quality for these small, simple frames
        write_mp4(Path(out) / "videos" / f"cam{k}" / f"{name}.mp4", frames_T_H_W_3, fps=fps, preset="veryfast")
    action = relative_actions(state, gripper)
    action[:, 6] = state[1:, 6]  # stored like Bridge: unscaled, column 6 = the binary open command of the target frame
    ann = dict(episode_id=name, task="robot_trajectory_prediction", texts=texts, state=state.tolist(),
               continuous_gripper_state=gripper.tolist(), action=action.tolist())
    path = Path(out) / "annotations" / split / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ann))
    os.replace(tmp, path)  # written last, so an interrupted run leaves no annotation without its videos
    return name


def make_synthetic(out, episodes=100, cameras=4, frames=40, size=(128, 160), seed=0, val_episodes=10,
                   objects=(1, 3), fps=4, workers=None):
    """
    Write the synthetic robot world in the camera-folder layout: annotations/{train,val}/epNNNNN.json and
    videos/cam<k>/epNNNNN.mp4. The last `val_episodes` of the `episodes` are the val split.
    Episode i depends only on (seed, i), so any worker count gives the same files.
    """
    assert 0 <= val_episodes < episodes and cameras >= 1 and frames >= 2, (episodes, val_episodes, cameras, frames)
    size = tuple(size)
    jobs = [(str(out), i, f"ep{i:05d}", "val" if i >= episodes - val_episodes else "train", cameras, frames, size,
             seed, tuple(objects), fps) for i in range(episodes)]
    workers = min(workers or os.cpu_count() or 1, episodes)
    if workers > 1:
        # fork: the workers need no torch, and spawning would re-import it in each (seconds)
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            names = list(pool.imap(synth_episode, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        names = [synth_episode(job) for job in jobs]
    meta = dict(generator="nanocosmos data.py synth", episodes=episodes, val_episodes=val_episodes, cameras=cameras,
                frames=frames, size=list(size), seed=seed, objects=list(objects), fps=fps,
                camera_names=[["front", "left", "right", "top"][k] if k < 4 else f"oblique{k - 4}" for k in range(cameras)])
    (Path(out) / "synth.json").write_text(json.dumps(meta, indent=1))
    return names

# -----------------------------------------------------------------------------
# the three commands: check (before a week of training), synth, bench


def all_annotations(root, splits=None):
    """(split, path) of every annotation under root, sorted; loose camera-folder files get the split the dataset
    gives them (train / val by a hash of the name). splits: only these."""
    root, layout = Path(root), detect_layout(root)
    folder = root / ("annotation" if layout == "irasim" else "annotations")
    found = [(p.parent.name, p) for p in sorted(folder.glob("*/*.json"))]
    if layout == "camera_folders" and not any(p.is_dir() for p in folder.iterdir()):
        found = [(split, p) for split in ("train", "val") for p in list_annotations(root, split)]
    return [(s, p) for s, p in found if splits is None or s in splits]


def camera_folder_cameras(root):
    return sorted(int(p.name[3:]) for p in (Path(root) / "videos").glob("cam*") if p.is_dir() and p.name[3:].isdigit())


def check_episode(job):
    """
    Check one annotation and all its videos (a worker's unit of work). Returns (problems, notes, record): problems
    and notes are '<file>: ...' strings; record (frames, sizes per camera, max |scaled action|, stored gripper
    column source) is None when the episode is unusable.
    """
    root, layout, ann_path, cameras, fast = job
    try:
        ann = parse_annotation(ann_path)
        if cameras is None:  # IRASim: every camera the annotation lists (camera_paths names a missing 'videos')
            cameras = range(len(ann["videos"])) if isinstance(ann["videos"], list) and ann["videos"] else [0]
        videos = camera_paths(root, layout, ann_path, ann, cameras)
    except DataError as e:
        return [str(e)], [], None
    problems, notes, counts, sizes = [], [], [], {}
    for k, v in zip(cameras, videos):
        try:
            n, h, w = probe_video(v) if fast else count_frames(v)
            counts.append(n)
            sizes[k] = (h, w)
        except DataError as e:  # every video is checked: the user wants the whole list at once
            problems.append(str(e))
    state, gripper, action = ann["state"], ann["gripper"], ann["action"]
    T = len(state)
    if len(counts) == len(videos):
        try:
            check_frame_counts(ann_path, T, videos, counts)
            if counts[0] > T:
                notes.append(f"{videos[0]}: {counts[0]} frames for {T} states; the last {counts[0] - T} are never used")
        except DataError as e:
            problems.append(str(e))
    source = None
    if action is not None:
        err = np.abs(relative_actions(state, gripper)[:, :6] - action[:, :6]).max(1)
        if err.max() > 1e-5:
            problems.append(f"{ann_path}: stored 'action' columns 0-5 differ from the relative pose recomputed from "
                            f"'state' by up to {err.max():.3g} (first at row {int(np.argmax(err > 1e-5))}); is the state "
                            f"x, y, z, roll, pitch, yaw in the Cosmos convention?")
        if action.shape[1] > 6:
            col, flag = action[:, 6], state[1:, 6] if state.shape[1] > 6 else None
            source = ("state[1:,6]" if flag is not None and np.abs(col - flag).max() <= 1e-6 else
                      "continuous_gripper_state[1:]" if np.abs(col - gripper[1:]).max() <= 1e-6 else None)
            if source is None:  # Bridge stores state[1:, 6] (1 = open); P2's inference uses the continuous one
                ref = flag if flag is not None else gripper[1:]
                problems.append(f"{ann_path}: stored 'action' column 6 (gripper) is neither state[1:, 6] (the open "
                                f"flag, as Bridge) nor continuous_gripper_state[1:]; first difference at row "
                                f"{int(np.argmax(np.abs(col - ref) > 1e-6))}")
    if gripper.min() < -1e-6 or gripper.max() > 1 + 1e-6:
        notes.append(f"{ann_path}: continuous_gripper_state spans {gripper.min():.3g}..{gripper.max():.3g}, not 0 (open)..1")
    if problems:
        return problems, notes, None
    act = np.abs(compute_actions(state, gripper)).max(0)
    return problems, notes, dict(frames=T, sizes=sizes, act=act, source=source)


def check_dataset(root, cameras=None, num_frames=13, fast=False, splits=None, workers=None):
    """
    Validate every annotation and video of a dataset (or of some splits); print a summary table, then every problem
    with its file. Returns the list of problems (empty: the dataset loads). cameras=None checks every camera an
    episode has; fast=True trusts the container's frame count instead of decoding every frame; workers: processes.
    """
    root, layout = Path(root), detect_layout(root)
    entries = all_annotations(root, splits)
    if cameras is None and layout == "camera_folders":
        cameras = camera_folder_cameras(root)
    print(f"check {root} ({layout} layout): {len(entries)} annotations"
          f"{'' if splits is None else ' in ' + ','.join(splits)}, cameras "
          f"{'all listed' if cameras is None else ','.join(map(str, cameras))}, "
          f"{'container frame counts' if fast else 'decoding every frame'}")
    if not entries:
        print(f"FAILED: {root}: no annotation JSON files found" + (f" in split(s) {','.join(splits)}" if splits else ""))
        return [f"{root}: no annotation JSON files found"]
    jobs = [(root, layout, p, None if cameras is None else tuple(cameras), fast) for _, p in entries]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) // 8))  # small datasets: not worth a pool
    from tqdm import tqdm
    bar = dict(total=len(jobs), desc="check", disable=len(jobs) < 100, file=sys.stderr)
    if workers > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            results = list(tqdm(pool.imap(check_episode, jobs, chunksize=4), **bar))
    else:
        results = [check_episode(job) for job in tqdm(jobs, **bar)]
    problems, notes, stats = [], [], {}
    for (split, _), (p, n, record) in zip(entries, results):
        s = stats.setdefault(split, dict(episodes=0, bad=0, frames=[], sizes={}, act=[], sources={}))
        problems += p
        notes += n
        s["episodes"] += 1
        if record is None:
            s["bad"] += 1
            continue
        s["frames"].append(record["frames"])
        for k, hw in record["sizes"].items():
            s["sizes"].setdefault(k, set()).add(hw)
        s["act"].append(record["act"])
        key = record["source"] or "not stored"
        s["sources"][key] = s["sources"].get(key, 0) + 1
    print(f"{'split':<8}{'episodes':>9}{'bad':>6}{'frames min/mean/max':>22}{f'{num_frames}-frame clips':>16}  video sizes")
    for split, s in stats.items():
        f = s["frames"]
        frames = f"{min(f)}/{np.mean(f):.1f}/{max(f)}" if f else "-"
        clips = sum(max(0, n - num_frames + 1) for n in f)
        sizes = ", ".join(f"cam{k} " + "|".join(f"{h}x{w}" for h, w in sorted(hw)) for k, hw in sorted(s["sizes"].items()))
        print(f"{split:<8}{s['episodes']:>9}{s['bad']:>6}{frames:>22}{clips:>16}  {sizes}")
        if s["act"]:
            m = np.max(s["act"], 0)
            print(f"{'':<8}max |action| (x20): xyz {m[:3].max():.3f}, rpy {m[3:6].max():.3f}, gripper {m[6]:.3f}; "
                  f"stored action column 6 = " + ", ".join(f"{k} ({v})" for k, v in s["sources"].items()))
        if f and min(f) < num_frames:
            notes.append(f"{split}: {sum(n < num_frames for n in f)} episode(s) shorter than {num_frames} frames give no clips")
        if any(len(hw) > 1 for hw in s["sizes"].values()):
            notes.append(f"{split}: a camera has videos of several sizes; all are stretched to the training size")
    if layout == "camera_folders":
        names = {p.stem for _, p in entries}
        orphans = [v for k in (cameras or []) for v in sorted((root / "videos" / f"cam{k}").glob("*.mp4"))
                   if v.stem not in names and splits is None]
        if orphans:
            notes.append(f"{len(orphans)} video(s) without an annotation, e.g. {orphans[0]}")
    for note in notes:
        print(f"note: {note}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {sum(s['bad'] for s in stats.values())} of {len(entries)} episodes:")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"OK: {len(entries)} episodes, no problems found")
    return problems


def _single_threaded(_):
    torch.set_num_threads(1)  # a worker decodes whole clips on its own: intra-op threads would oversubscribe the cores


def bench(root, split=None, cameras=(0,), size=(256, 320), num_frames=13, workers=2, batch_size=4, batches=20,
          frame_stride=1):
    """
    Clips per second through a DataLoader with `workers` processes, beside the raw decode speed of the same files
    and one process calling the dataset directly. Returns the figures as a dict.
    """
    split = split or ("train" if "train" in available_splits(root) else available_splits(root)[0])
    ds = RobotVideoDataset(root, split, num_frames=num_frames, cameras=cameras, size=size, frame_stride=frame_stride)
    if len(ds) == 0:
        raise DataError(root, f"split {split!r} has no clips of {num_frames} frames")
    V, n_clips = len(ds.cameras), batches * batch_size
    print(f"bench {ds}")
    # a clip decodes each camera from frame 0 up to its last frame (mp4 has no cheap random access)
    per_clip = V * float(np.mean(ds.window_start + (num_frames - 1) * frame_stride + 1))
    files = [(v, ep.num_frames) for ep in ds.episodes for v in ep.videos]
    t0, frames, i = time.perf_counter(), 0, 0
    while i == 0 or (time.perf_counter() - t0 < 2.0 and i < 4 * len(files)):  # decode only: every frame to RGB
        v, n = files[i % len(files)]
        frames += len(read_frames(v, n))
        i += 1
    raw_fps = frames / (time.perf_counter() - t0)
    print(f"raw decode      {raw_fps:8.0f} frames/s  (1 process, native size, no resize, {i} videos); a clip decodes "
          f"{per_clip:.0f} frames ({V} camera(s) x frames 0..last) -> at most {raw_fps / per_clip:.1f} clips/s per process")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0, n = time.perf_counter(), 0
    while n == 0 or (time.perf_counter() - t0 < 2.0 and n < n_clips):
        ds[order[n % len(order)]]
        n += 1
    direct = n / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    print(f"dataset[i]      {direct:8.1f} clips/s   (1 process, 1 thread, decode + resize to {size[0]}x{size[1]})")
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=n_clips,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         worker_init_fn=_single_threaded if workers else None,
                                         prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    rest = sum(1 for _ in it)
    loader_cps = rest * batch_size / max(time.perf_counter() - t1, 1e-9)
    print(f"DataLoader      {loader_cps:8.1f} clips/s   ({workers} workers, batch {batch_size}, {rest} batches timed after "
          f"the first, which took {t1 - t0:.2f} s) = {loader_cps * num_frames * V:.0f} frames/s delivered")
    print(f"a training step on B clips must take longer than B / {loader_cps:.1f} s for the loader to keep up "
          f"({os.cpu_count()} cores here)")
    return dict(raw_decode_frames_per_s=raw_fps, decoded_frames_per_clip=per_clip, dataset_clips_per_s=direct,
                loader_clips_per_s=loader_cps)


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x.strip())


def _size(text):
    h, w = text.lower().split("x")
    return int(h), int(w)


def main(argv):
    if argv[:1] in (["check"], ["bench"]) and any((Path(a) / "meta" / "info.json").is_file() for a in argv[1:]):
        import lerobot  # a LeRobot folder: its own options (camera names, --fps); pyarrow is needed only there
        return lerobot.main(argv)
    parser = argparse.ArgumentParser(prog="data.py", description="nanocosmos robot video data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate every annotation and video of a dataset; non-zero exit on problems")
    p.add_argument("root")
    p.add_argument("--cameras", type=_ints, default=None, help="e.g. 0,1,2,3 (default: every camera an episode has)")
    p.add_argument("--num-frames", type=int, default=13, help="clip length for the clip count")
    p.add_argument("--split", type=lambda t: tuple(x for x in t.split(",") if x), default=None,
                   help="e.g. train,val (default: every split)")
    p.add_argument("--fast", action="store_true", help="trust container frame counts instead of decoding every frame")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p = sub.add_parser("synth", help="write the synthetic multi-camera robot world (camera-folder layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=100, help="in all, val included")
    p.add_argument("--val-episodes", type=int, default=10, help="the last ones go to annotations/val")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--size", type=_size, default=(128, 160), help="HxW")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=4)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p = sub.add_parser("bench", help="DataLoader clips/s beside the raw decode speed of the same files")
    p.add_argument("root")
    p.add_argument("--split", default=None, help="default: train if present, else the first split")
    p.add_argument("--cameras", type=_ints, default=(0,))
    p.add_argument("--size", type=_size, default=(256, 320), help="HxW")
    p.add_argument("--num-frames", type=int, default=13)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--frame-stride", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "check":
        return 1 if check_dataset(args.root, args.cameras, args.num_frames, args.fast, args.split, args.workers) else 0
    if args.command == "synth":
        t0 = time.perf_counter()
        make_synthetic(args.out, args.episodes, args.cameras, args.frames, args.size, args.seed, args.val_episodes,
                       fps=args.fps, workers=args.workers)
        print(f"wrote {args.episodes} episodes x {args.cameras} cameras x {args.frames} frames at "
              f"{args.size[0]}x{args.size[1]} to {args.out} in {time.perf_counter() - t0:.1f} s")
        return 0
    bench(args.root, args.split, args.cameras, args.size, args.num_frames, args.workers, args.batch_size, args.batches,
          args.frame_stride)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
