"""
Robot video data for nanocosmos: dataset readers, the action convention, frame decoding, the latent cache, and
the check / bench / encode commands.

Owns: the two on-disk layouts (detected from the folder),
  IRASim / Bridge   root/annotation/<split>/<id>.json; camera k is root / json["videos"][k]["video_path"]
  camera folders    root/annotations/[<split>/]<name>.json; camera k is root/videos/cam<k>/<name>.mp4
                    (without split folders a deterministic hash of <name> holds out `val_fraction` as "val")
RobotVideoDataset items {"video": uint8 [V,3,T,H,W], "action": float32 [T-1,7], "key": "<episode>/<start>"} on the
CPU, with actions recomputed from `state` and `continuous_gripper_state` exactly as Cosmos does (compute_actions);
a stored `action` field is never read by training, only by `check`. LatentCacheDataset items are the same with
"latent" [V,C,t,h,w] (the tokenizer's output) in place of "video"; encode_dataset writes them.
Must not: render or simulate anything (synth.py does, importing this file), import a script (train/sample/convert),
or do GPU work inside a Dataset (encode is a command). Imports vae.py only for the cache.

    python data.py check ROOT [--cameras 0,1,2,3] [--split train,val]       # validate what training will read
    python data.py bench ROOT [--cameras 0,1] [--size 256x320]               # loader clips/s vs raw decode
    python data.py encode ROOT --out CACHE --tokenizer pixel|wan2.1 [--tokenizer_path P] --cameras 0,1
                   --num_frames 13 --size 256x320 [--start_stride S] [--split train]   # the latent cache
Known errors print one line `error: <file>: <problem>` and exit 1; bad arguments exit 2.
The synthetic world is synth.py: `python synth.py --out datasets/synth`.

check reads what training reads: --cameras defaults to every camera folder found (and says so: pass the cameras the
run will use); a camera with no folder at all is one problem, a folder lacking some episodes is counted; NaN or
Infinity anywhere in an annotation is a problem; the stored 'action' is compared with the recomputed one.
encode writes CACHE/shard_NNNNN.safetensors (latent [n,V,C,t,h,w] in the tokenizer dtype, action [n,T-1,7],
window [n]; keys in the header) and CACHE/metadata.json last: settings (tokenizer, sha256 of its weights, dtype,
pixel factor and scale, cameras, size, num_frames, frame_stride, start_stride, split, action scales, val_fraction,
window count, every dataset file with its size), latent shape, shards. It prints the size first (bytes per window x
windows). Rerun the same command to resume; under `torchrun --nproc_per_node N data.py encode ...` each rank
encodes every N-th shard. A run whose settings differ from the cache's gets one error naming the field.
"""

import argparse
import hashlib
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
from safetensors import safe_open
from safetensors.torch import save_file

import vae
from configurator import MissingError, UserError

# -----------------------------------------------------------------------------
# errors: every message starts with the offending file, so a user can go and look at it



def progress(iterable, total, desc, min_total=0):
    """A tqdm bar on a terminal; otherwise (a log file, a job scheduler) one line per ~10%, so logs stay short.
    Nothing below min_total items (work that is over before anyone would look)."""
    if total < min_total:
        yield from iterable
        return
    if sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr)
        return
    t0, step, next_report = time.perf_counter(), max(1, math.ceil(total / 10)), 0
    for i, x in enumerate(iterable, 1):
        yield x
        if i >= next_report + step or i == total:
            next_report = i - i % step
            print(f"{desc}: {i}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

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
    """
    uint8 frames -> uint8 frames of exactly `size` = (H, W): bilinear with antialias, no crop. torch's uint8 kernel,
    which is what torchvision's resize does to a uint8 tensor: 6x faster than going through float (7 vs 47 ms for
    13 Bridge frames 480x640 -> 256x320, 1 thread), and within 1 of the float path's rounding.
    """
    if size is None or tuple(x_N_3_H_W.shape[-2:]) == tuple(size):
        return x_N_3_H_W
    return F.interpolate(x_N_3_H_W, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


def read_frames(path, indices_or_count, size=None):
    """
    Frames `indices_or_count` (a list of frame indices, or an int n for frames 0..n-1) of a video, uint8 [N,3,H,W].
    Seeks to the last keyframe at or before the first index asked for (exact: each frame's index is read back from
    its timestamp, and anything unexpected falls back to decoding from frame 0), decodes only as far as the last
    index, and converts to RGB only the frames returned.
    """
    if isinstance(indices_or_count, (int, np.integer)):
        indices_or_count = range(int(indices_or_count))
    indices = [int(i) for i in indices_or_count]
    if not indices or min(indices) < 0:
        raise ValueError(f"{path}: frame indices must be a non-empty list of non-negative ints, got {indices_or_count}")
    try:
        for seek in ([True, False] if min(indices) > 0 else [False]):
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise UserError(path, "has no video stream")
                frames, decoded = decode_frames(container, container.streams.video[0], indices, seek)
            # unsure where a seek landed, or an error to report with the exact frame count: decode from the start
            if frames is not None and max(indices) in frames:
                break
    except FileNotFoundError as e:
        raise MissingError(path, "video file not found") from e
    except av.error.FFmpegError as e:
        raise UserError(path, f"cannot decode video ({e})") from e
    if max(indices) not in frames:
        raise UserError(path, f"has only {decoded} decodable frames, frame {max(indices)} was asked for")
    rgb_N_H_W_3 = [frames[i] for i in indices]
    if size is None or tuple(rgb_N_H_W_3[0].shape[:2]) == tuple(size):
        return torch.from_numpy(np.stack(rgb_N_H_W_3)).permute(0, 3, 1, 2).contiguous()
    # resized frame by frame straight from the decoder's channels-last arrays: no native-size copy of the clip
    # (for 13 Bridge frames 480x640 -> 256x320 that copy and transpose cost more than the resize itself)
    small = [resize_frames(torch.from_numpy(f).permute(2, 0, 1)[None], size) for f in rgb_N_H_W_3]
    return torch.cat(small).contiguous()


def decode_frames(container, stream, indices, seek):
    """({index: RGB [H,W,3]} of the wanted frames, index of the last frame decoded + 1), decoding from frame 0 or
    (seek=True) from the keyframe before the first; (None, 0) when a seek's landing cannot be told from timestamps."""
    wanted, first, last, frames = set(indices), min(indices), max(indices), {}
    rate, tb, start = stream.average_rate, stream.time_base, stream.start_time or 0
    seek = seek and rate is not None and tb is not None and rate > 0
    if seek:  # a constant-rate stream: frame i is shown at start + i / rate
        container.seek(start + int(first / (rate * tb)), stream=stream, backward=True, any_frame=False)
    # one reformatter per video: frame.to_ndarray(format="rgb24") builds a new swscale context for every frame,
    # which costs more than decoding it (2.5 ms vs 0.13 ms for 64x80; same pixels)
    rgb, index = VideoReformatter(), -1
    for frame in container.decode(stream):
        if seek:
            if frame.pts is None:
                return None, 0
            exact = float((frame.pts - start) * tb * rate)
            if abs(exact - round(exact)) > 0.01 or (index == -1 and round(exact) > first):
                return None, 0  # a variable rate, or the seek overshot: not safe
            index = round(exact)
        else:
            index += 1
        if index in wanted:
            frames[index] = rgb.reformat(frame, format="rgb24").to_ndarray()
        if index >= last:
            break
    return frames, index + 1


def probe_video(path):
    """(frame count, height, width) from the container header, without decoding (about 0.3 ms a file)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(path, "has no video stream")
            stream = container.streams.video[0]
            n, h, w = stream.frames, stream.codec_context.height, stream.codec_context.width
            if n <= 0:  # some containers do not record a frame count: count packets instead (still no decode)
                n = sum(1 for p in container.demux(stream) if p.size > 0)
    except FileNotFoundError as e:
        raise MissingError(path, "video file not found") from e
    except av.error.FFmpegError as e:
        raise UserError(path, f"cannot open video ({e})") from e
    if n <= 0 or h <= 0 or w <= 0:
        raise UserError(path, f"video has {n} frames of {h}x{w}")
    return n, h, w


def count_frames(path):
    """(decoded frame count, height, width): the slow, certain count that `check` uses."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(path, "has no video stream")
            n, h, w = 0, 0, 0
            for frame in container.decode(container.streams.video[0]):
                n, h, w = n + 1, frame.height, frame.width
    except FileNotFoundError as e:
        raise MissingError(path, "video file not found") from e
    except av.error.FFmpegError as e:
        raise UserError(path, f"cannot decode video ({e})") from e
    if n == 0:
        raise UserError(path, "video has no decodable frames")
    return n, h, w


def write_mp4(path, frames, fps=4, codec="libx264", crf=18, preset="medium", keyframe_interval=12, threads=0):
    """
    The one mp4 writer of the project. frames: uint8 [T,H,W,3] (numpy or tensor), H and W even (yuv420p).
    libx264 at `crf` (18 = visually lossless); falls back to mpeg4 at a high bit rate when this ffmpeg has no x264.
    A keyframe every `keyframe_interval` frames (12, as the Bridge videos) bounds what a window decodes beyond itself.
    threads: encoder threads (0 = ffmpeg's choice; 1 = byte-identical files however busy the machine is).
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
        stream.codec_context.gop_size = keyframe_interval  # read_frames seeks to the keyframe before a window
        stream.codec_context.thread_count = threads
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
        raise MissingError(root, "dataset folder not found")
    raise UserError(root, "neither annotation/<split>/*.json (IRASim) nor annotations/*.json (camera folders) found")


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
        raise UserError(folder / split, f"split folder not found; splits here: {available_splits(root)}")
    if split not in ("train", "val"):
        raise UserError(folder, f"has no split folders, so only 'train' and 'val' (held out by name) exist, not {split!r}")
    paths = sorted(folder.glob("*.json"))
    held = [is_held_out(p.stem, val_fraction) for p in paths]
    if val_fraction > 0 and len(paths) > 1 and not any(held):  # tiny datasets: still hold out one, chosen by hash
        held[min(range(len(paths)), key=lambda i: zlib.crc32(paths[i].stem.encode()))] = True
    return [p for p, h in zip(paths, held) if h == (split == "val")]


def _array(d, key, path):
    try:
        return np.asarray(d[key], dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise UserError(path, f"{key!r} is not a rectangular array of numbers ({e})") from e


def parse_annotation(path):
    """One annotation JSON -> dict(state [T,S] f64, gripper [T] f64, videos, json)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MissingError(path, "annotation file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(path, f"cannot read annotation ({e})") from e
    except json.JSONDecodeError as e:
        raise UserError(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; truncated?)") from e
    if not isinstance(d, dict):
        raise UserError(path, f"annotation must be a JSON object, got {type(d).__name__}")
    for key in ("state", "continuous_gripper_state"):
        if key not in d:
            raise UserError(path, f"missing key {key!r}")
    state, gripper = _array(d, "state", path), _array(d, "continuous_gripper_state", path)
    if state.ndim != 2 or state.shape[1] < 6 or state.shape[0] < 2:
        raise UserError(path, f"'state' must be T x >=6 (x, y, z, roll, pitch, yaw, ...) with T >= 2, got {list(state.shape)}")
    T = len(state)
    if gripper.shape != (T,):
        raise UserError(path, f"'continuous_gripper_state' must have shape [{T}] like 'state', got {list(gripper.shape)}")
    for key, x in (("state", state), ("continuous_gripper_state", gripper)):
        bad = np.argwhere(~np.isfinite(x))
        if len(bad):
            raise UserError(path, f"{key!r} has {len(bad)} NaN/inf values, first at index {bad[0].tolist()}")
    # a stored 'action' is not parsed here: training recomputes actions from the state, only `check` reads it
    return dict(state=state, gripper=gripper, videos=d.get("videos"), json=d)


def stored_action(path, ann):
    """The annotation's own 'action' field as float64 [T-1, >=6], or None when it has none (only `check` reads it)."""
    if "action" not in ann["json"]:
        return None
    T, action = len(ann["state"]), _array(ann["json"], "action", path)
    if action.ndim != 2 or action.shape[0] != T - 1 or action.shape[1] < 6:
        raise UserError(path, f"'action' must be [{T - 1}, 7] (one row per state transition), got {list(action.shape)}")
    return action


def camera_paths(root, layout, ann_path, ann, cameras):
    """The video file of each requested camera for one annotation."""
    root = Path(root)
    if layout == "camera_folders":
        return [root / "videos" / f"cam{k}" / f"{Path(ann_path).stem}.mp4" for k in cameras]
    videos = ann["videos"]
    if not isinstance(videos, list) or not videos:
        raise UserError(ann_path, "missing key 'videos' (a list of {'video_path': ...}, one per camera)")
    paths = []
    for k in cameras:
        if not 0 <= k < len(videos):
            raise UserError(ann_path, f"the config asks for {len(cameras)} camera(s) {list(cameras)} and this episode "
                                      f"lists {len(videos)} camera(s) in 'videos' (0..{len(videos) - 1}); camera {k} "
                                      f"was asked for")
        entry = videos[k]
        rel = entry.get("video_path") if isinstance(entry, dict) else entry  # P2.5 also accepts a bare string
        if not isinstance(rel, str):
            raise UserError(ann_path, f"videos[{k}] has no 'video_path' string")
        paths.append(root / rel)
    return paths


def check_frame_counts(ann_path, T, videos, counts):
    """Every camera must have the same number of frames, and at least one per state."""
    if len(set(counts)) > 1:
        listing = ", ".join(f"{v} has {n}" for v, n in zip(videos, counts))
        raise UserError(ann_path, f"cameras have different frame counts: {listing}")
    if counts[0] < T:
        raise UserError(videos[0], f"has {counts[0]} frames but {ann_path} has {T} states")


def camera_folder_cameras(root):
    """The k of every videos/cam<k>/ folder of a camera-folder dataset, sorted."""
    return sorted(int(p.name[3:]) for p in (Path(root) / "videos").glob("cam*") if p.is_dir() and p.name[3:].isdigit())


def check_camera_folders(root, cameras):
    """A camera asked for that has no videos/cam<k>/ folder at all is one error for the dataset, not one per video."""
    have = camera_folder_cameras(root)
    missing = [k for k in cameras if k not in have]
    if missing:
        raise UserError(Path(root) / "videos" / f"cam{missing[0]}", f"camera folder not found: the config asks for "
                        f"{len(cameras)} camera(s) {list(cameras)} and the dataset has {len(have)} "
                        f"({', '.join(f'cam{k}' for k in have) or 'none'})")


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
    phases = [compute_actions(ann["state"][p::s], ann["gripper"][p::s], action_scale, gripper_scale) for p in range(min(s, T))]
    actions = np.zeros((max(T - s, 0), phases[0].shape[1]), dtype=np.float32)   # the width the actions have
    for phase, a in enumerate(phases):
        actions[phase::s] = a
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
        if num_frames < 2 or frame_stride < 1 or start_stride < 1:
            raise ValueError(f"num_frames must be >= 2 and frame_stride, start_stride >= 1, got {num_frames}, "
                             f"{frame_stride}, {start_stride}")
        self.root, self.split, self.layout = Path(root), split, detect_layout(root)
        self.action_scale, self.gripper_scale, self.val_fraction = action_scale, gripper_scale, val_fraction
        self.num_frames, self.frame_stride, self.start_stride = num_frames, frame_stride, start_stride
        self.cameras = tuple(int(k) for k in cameras)
        self.size = None if size is None else tuple(size)
        if self.layout == "camera_folders":
            check_camera_folders(self.root, self.cameras)
        self.episodes, skipped = [], 0
        for ann_path in list_annotations(self.root, split, val_fraction):
            try:
                self.episodes.append(load_episode(self.root, self.layout, ann_path, self.cameras, frame_stride,
                                                  action_scale, gripper_scale))
            except UserError as e:
                if not skip_bad:
                    raise
                print(f"skipping bad episode: {e}")
                skipped += 1
        if skipped:
            print(f"skipped {skipped} bad episode(s) of {skipped + len(self.episodes)} in {self.root} split {split!r}")
        if not self.episodes:
            raise UserError(self.root, f"split {split!r} has no usable episodes")
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
            "cond": self.episode_cond(e, start, self.num_frames),
            "key": f"{self.episodes[e].name}/{start}",
        }

    @property
    def episode_names(self):
        return [ep.name for ep in self.episodes]

    @property
    def action_dim(self):
        return self.episodes[0].actions.shape[1]

    def episode_cond(self, episode_index, start=0, num_frames=None):
        """The conditioning of the frames episode_frames(episode_index, start, num_frames) returns: {"action": [n-1, A]}."""
        return {"action": self.episode_actions(episode_index, start, num_frames)}

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
# the one dataset factory of every command

def make_dataset(c, split, tok=None, rank=0, world=1, say=print, barrier=None):
    """The dataset of c["data_root"] for split (c: train.py's config dict, or sample.py's settings with the same
    keys). The format is read from the folder: meta/info.json is a LeRobot folder (lerobot.LeRobotDataset), else an
    IRASim / Bridge or camera-folder layout (RobotVideoDataset). A missing root is a UserError naming the nearest folder (train.py
    generates the default synthetic root first: synth.ensure). With c["latent_cache"] and
    split == c["train_split"], the training set is the cache, built here when missing (every rank its share; tok:
    the run's tokenizer; barrier: the run's process barrier).

    The protocol every returned dataset keeps (training, validation, evaluation and rollout rely on it):
      len(ds), ds[i] -> {"video": uint8 [V,3,T,H,W] (or "latent": [V,C,t,h,w] from a cache),
                         "cond": {"action": float32 [T-1, A]}, "key": "<episode>/<start>"}
      ds.num_frames, ds.cameras, ds.action_dim; ds.window_episode, ds.window_start (one int per item)
      and, except for a latent cache: ds.episode_names, ds.episode_frames(e, start=0, count=None) -> uint8
      [V,3,n,H,W], ds.episode_cond(e, start=0, num_frames=None) -> {"action": [n-1, A]} (None: the whole episode).
    A new conditioning signal is one more key of "cond" (and of episode_cond); a new format is one branch here."""
    root, T = c["data_root"], c["num_frames"]
    if not os.path.exists(root):     # (the default synthetic root is generated before: synth.ensure)
        near = nearest_folder(root)
        raise MissingError(root, "data_root not found" + (f" (did you mean {near}?)" if near else ""))
    if os.path.isfile(os.path.join(root, "meta", "info.json")):
        import lerobot   # here, not at the top: lerobot.py imports data.py's leaf helpers
        if c.get("latent_cache"):
            raise UserError(f"--latent_cache={c['latent_cache']!r}", f"latent caches are built from Bridge/IRASim-layout "
                                                                      f"folders; {root} is a LeRobot folder")
        ds = lerobot.LeRobotDataset(root, split, start_stride=c["start_stride"] if split == c["train_split"] else
                                    max(1, T - 1), **lerobot.config_kwargs(c))
    else:
        ds = RobotVideoDataset(root, split, num_frames=T, cameras=tuple(c["cameras"]), size=tuple(c["frame_size"]),
                               frame_stride=c["frame_stride"], action_scale=c["action_scale"],
                               gripper_scale=c["gripper_scale"], skip_bad=c["skip_bad"],
                               start_stride=c["start_stride"] if split == c["train_split"] else max(1, T - 1))
    say(f"dataset {root} {split}: {len(ds)} clips of {T} frames, {len(ds.episode_names)} episodes")
    if len(ds) == 0 and split == c["train_split"]:
        raise UserError(root, f"no training clips of {T} frames ({split})")
    if c.get("latent_cache") and split == c["train_split"]:
        settings = cache_settings(ds, tok, c["tokenizer"])
        encode_dataset(ds, tok, c["latent_cache"], settings, rank, world, workers=max(0, c["num_workers"]), log=say)
        if barrier:
            barrier()
        ds = LatentCacheDataset(c["latent_cache"], expect=settings)
        say(f"training on {ds!r}")
    return ds


def nearest_folder(path):
    import difflib
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    names = [d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))] if parent else []
    close = difflib.get_close_matches(os.path.basename(os.path.normpath(path)), names, n=1, cutoff=0.6)
    return os.path.join(parent, close[0]) if close else None


# -----------------------------------------------------------------------------
# the latent cache: the tokenizer's latents of every training window, encoded once. The encoder mean is deterministic
# and the pipeline has no augmentation, so reading a window's latent is exactly encoding it again.
# Layout: CACHE/shard_NNNNN.safetensors ("latent" [n,V,C,t,h,w] in the tokenizer's dtype, "action" [n,T-1,7] float32,
# "window" int64 [n]; the keys and the settings hash in the header), then CACHE/metadata.json, written last.


def tokenizer_fingerprint(tok):
    """sha256 of every weight and buffer (name, dtype, shape, bytes): what the latents depend on, however stored."""
    h = hashlib.sha256()
    for name, t in sorted({**dict(tok.named_parameters()), **dict(tok.named_buffers())}.items()):
        t = t.detach().cpu().contiguous()  # (bytes, so bf16 hashes too)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_settings(ds, tok, tokenizer_name):
    """Everything a cached latent depends on, as a JSON-able dict: what encode writes and what a run expects."""
    files = sorted({p for ep in ds.episodes for p in [ep.annotation, *ep.videos]})
    # annotations by content (an edit in place keeps the size), videos by size and modification time (hashing every
    # video would cost a read of the dataset)
    sign = lambda p: (f"sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}" if p.suffix == ".json"  # noqa: E731
                      else f"{p.stat().st_size} bytes, mtime {p.stat().st_mtime_ns}")
    # the dtype before the weights' hash: a bf16 cache read by an fp32 run is reported as a dtype difference
    return dict(tokenizer=tokenizer_name, tokenizer_dtype=str(vae.tokenizer_dtype(tok)).replace("torch.", ""),
                tokenizer_sha256=tokenizer_fingerprint(tok),
                pixel_factor=tok.spatial_factor if isinstance(tok, vae.PixelTokenizer) else None,
                pixel_scale=float(tok.scale) if isinstance(tok, vae.PixelTokenizer) else None,
                cameras=list(ds.cameras), size=list(ds.size), num_frames=ds.num_frames, frame_stride=ds.frame_stride,
                start_stride=ds.start_stride, split=ds.split, action_scale=ds.action_scale,
                gripper_scale=ds.gripper_scale, val_fraction=ds.val_fraction, windows=len(ds),
                files=[[str(p.relative_to(ds.root)), sign(p)] for p in files])


def human_bytes(n):
    unit = next(u for u in range(4) if n < 1024 ** (u + 1) or u == 3)
    return f"{n / 1024 ** unit:.1f} {['bytes', 'KiB', 'MiB', 'GiB'][unit]}"


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def shard_path(out, j):
    return Path(out) / f"shard_{j:05d}.safetensors"


def shard_problem(path, digest, n):
    """What is wrong with a shard file (None: complete). Its header names every tensor's byte range, so a truncated
    file is found by its size alone, without reading the data."""
    if not path.exists():
        return "missing"
    try:
        with open(path, "rb") as fh:
            head = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(head))
        end = 8 + head + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        meta = header.get("__metadata__") or {}
    except Exception:  # noqa: BLE001 (any unreadable header is a damaged shard)
        return "not a readable safetensors shard"
    if path.stat().st_size < end:
        return f"truncated ({path.stat().st_size} of {end} bytes)"
    if digest is not None and meta.get("settings") != digest:
        return "encoded with other settings"
    if header["window"]["shape"][0] != n:
        return f"holds {header['window']['shape'][0]} windows, the cache lists {n}"
    return None


def shard_is_done(path, digest, n):
    """A renamed shard of the same settings and length is complete (shards are written to .tmp, then renamed)."""
    return shard_problem(path, digest, n) is None


def encode_dataset(ds, tok, out, settings, rank=0, world=1, batch_windows=8, max_batch=None, workers=0,
                   shard_bytes=256 << 20, log=print):
    """
    Write the latents of every window of `ds` to the cache folder `out` (see the layout above); settings is
    cache_settings(ds, tok, name). Under torchrun each rank encodes shards j with j % world == rank and the same
    call on every rank is all it takes; whichever rank finishes the last shard writes metadata.json (identical on
    every rank), so call a barrier before reading. Resumes: a finished shard of the same settings is kept, a
    half-written one (.tmp) is redone. A folder holding a finished cache of other settings is an error.
    Returns the metadata dict once the cache is complete, else None.
    """
    out, digest = Path(out), settings_hash(settings)
    if (out / "metadata.json").exists():
        return LatentCacheDataset(out, expect=settings).meta  # raises, naming the field, if it is another cache
    V, C, t = len(ds.cameras), tok.latent_channels, vae.latent_frames(ds.num_frames, tok.temporal_factor)
    h, w = ds.size[0] // tok.spatial_factor, ds.size[1] // tok.spatial_factor
    latent_shape, dtype = [V, C, t, h, w], vae.tokenizer_dtype(tok)
    per_window = V * C * t * h * w * dtype.itemsize + (ds.num_frames - 1) * ds.action_dim * 4 + 8
    n_windows = len(ds)
    per_shard = max(1, min(n_windows, shard_bytes // per_window))
    shards = [(j, range(a, min(a + per_shard, n_windows))) for j, a in enumerate(range(0, n_windows, per_shard))]
    if rank == 0:
        log(f"latent cache {out}: {n_windows} windows x {human_bytes(per_window)} = {human_bytes(n_windows * per_window)}"
            f" in {len(shards)} shard(s) (latent {latent_shape} {str(dtype)[6:]}, start_stride {ds.start_stride})")
    out.mkdir(parents=True, exist_ok=True)
    mine = [(j, r) for j, r in shards if j % world == rank and not shard_is_done(shard_path(out, j), digest, len(r))]
    for j, windows in progress(mine, len(mine), f"encode rank {rank}" if world > 1 else "encode"):
        encode_shard(ds, tok, shard_path(out, j), windows, digest, batch_windows, max_batch, workers)
    if not all(shard_is_done(shard_path(out, j), digest, len(r)) for j, r in shards):
        return None  # another rank's shards are still being written; it writes the metadata
    meta = dict(format="nanocosmos latent cache 1", settings=settings, settings_sha=digest, latent_shape=latent_shape,
                latent_dtype=str(dtype).replace("torch.", ""), action_shape=[ds.num_frames - 1, ds.action_dim],
                shards=[[shard_path(out, j).name, len(r)] for j, r in shards], bytes=n_windows * per_window)
    tmp = out / f"metadata.json.tmp{rank}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "metadata.json")  # last: a cache without it is never read
    return meta


def encode_shard(ds, tok, path, windows, digest, batch_windows, max_batch, workers):
    """Encode some windows into one shard file, through a temporary name (never read half-written)."""
    device = next(iter([*tok.parameters(), *tok.buffers()])).device
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, list(windows)), batch_size=batch_windows,
                                         num_workers=workers, worker_init_fn=single_threaded_worker if workers else None)
    latents, actions, keys = [], [], []
    for batch in loader:
        video_B_V_3_T_H_W = batch["video"].to(device)
        B, V = video_B_V_3_T_H_W.shape[:2]
        lat = vae.encode_batched(tok, video_B_V_3_T_H_W.flatten(0, 1), max_batch)
        latents.append(lat.unflatten(0, (B, V)).cpu())
        actions.append(batch["cond"]["action"])
        keys += batch["key"]
    tensors = dict(latent=torch.cat(latents).contiguous(), action=torch.cat(actions).contiguous(),
                   window=torch.tensor(list(windows), dtype=torch.int64))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=dict(settings=digest, keys=json.dumps(keys)))
    os.replace(tmp, path)


class LatentCacheDataset(torch.utils.data.Dataset):
    """
    The windows of a finished latent cache, in the order of the RobotVideoDataset they were encoded from: items
    {"latent": [V,C,t,h,w] in the tokenizer's dtype, "action": float32 [T-1,7], "key": "<episode>/<start>"}.
    expect (cache_settings of the run): every field must match, else one UserError naming the first that differs.
    Shards are opened lazily in each worker (memory-mapped by safetensors), so the dataset pickles cheaply.
    """

    def __init__(self, cache_dir, expect=None):
        self.dir, path = Path(cache_dir), Path(cache_dir) / "metadata.json"
        if not path.exists():
            raise MissingError(path, "not found: not a finished latent cache (an interrupted encode? run it "
                                         "again to resume)" if self.dir.is_dir() else "latent cache folder not found")
        try:
            self.meta = json.loads(path.read_text())
            settings = self.meta["settings"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(path, f"not a latent cache metadata file ({e})") from e
        for key, want in (expect or {}).items():
            have = settings.get(key, "(absent)")
            if have != want:
                raise UserError(path, f"cache {describe_difference(key, have, want)}; encode another cache "
                                      f"(a new --out) or delete {self.dir}")
        counts = [n for _, n in self.meta["shards"]]
        self.offsets = np.cumsum([0] + counts)
        self.num_frames, self.cameras = settings["num_frames"], tuple(settings["cameras"])
        self.action_dim = self.meta["action_shape"][1]
        self._open = {}
        for j, (name, n) in enumerate(self.meta["shards"]):   # every shard now, not in a loader worker later
            problem = shard_problem(self.dir / name, self.meta.get("settings_sha"), n)
            if problem:
                raise UserError(self.dir / name, f"{problem}: this cache is damaged; run the encode again "
                                                 f"(`python data.py encode ...` redoes the bad shards) or delete {self.dir}")

    def __len__(self):
        return int(self.offsets[-1])

    def __getstate__(self):  # open shard handles stay in their process
        return {**self.__dict__, "_open": {}}

    def __repr__(self):
        s = self.meta["settings"]
        return (f"LatentCacheDataset({str(self.dir)!r}: {len(self)} windows, latent {self.meta['latent_shape']} "
                f"{self.meta['latent_dtype']}, tokenizer {s['tokenizer']}, cameras {s['cameras']}, size {s['size']})")

    def shard(self, j):
        if j not in self._open:
            name = self.meta["shards"][j][0]
            f = safe_open(str(self.dir / name), "pt")
            self._open[j] = (f, json.loads(f.metadata()["keys"]))
        return self._open[j]

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        i = i % len(self)
        j = int(np.searchsorted(self.offsets, i, side="right")) - 1
        f, keys = self.shard(j)
        r = i - int(self.offsets[j])
        return {"latent": f.get_slice("latent")[r], "cond": {"action": f.get_slice("action")[r]}, "key": keys[r]}


def describe_difference(key, have, want):
    """'<field> is A but this run has B'; for the file list, the first file that differs."""
    if key == "files" and isinstance(have, list) and isinstance(want, list):
        have_d, want_d = dict(map(tuple, have)), dict(map(tuple, want))
        name = sorted(k for k in have_d.keys() | want_d.keys() if have_d.get(k) != want_d.get(k))[0]
        return (f"was encoded from other files: {name} is {have_d.get(name, 'absent')} in the cache, "
                f"{want_d.get(name, 'absent')} now (edited or replaced since the encode)")
    return f"{key} is {have!r} but this run has {want!r}"


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


def non_finite(obj, where=""):
    """JSON paths (e.g. "action[3][2]") of every NaN / Infinity number in a parsed JSON value (json.loads accepts them)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in non_finite(v, f"{where}[{i}]")]
    return []


def check_stored_action(ann_path, ann):
    """Problems with the stored 'action' (training never reads it) and where its gripper column comes from."""
    action, state, gripper = stored_action(ann_path, ann), ann["state"], ann["gripper"]
    if action is None:
        return [], None
    problems, source = [], None
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
    return problems, source


def check_episode(job):
    """
    Check one annotation and all its videos (a worker's unit of work). Returns (problems, notes, record): problems
    and notes are '<file>: ...' strings; record (frames, sizes per camera, max |scaled action|, stored gripper
    column source, missing cameras) is None when the episode is unusable.
    """
    root, layout, ann_path, cameras, fast = job
    try:
        ann = parse_annotation(ann_path)
    except UserError as e:
        return [str(e)], [], None
    bad = non_finite(ann["json"])  # parse_annotation already refuses NaN in what training reads; this is the rest
    problems = [f"{ann_path}: {len(bad)} NaN/Infinity value(s) in the JSON, first at {bad[0]}"] if bad else []
    try:
        if cameras is None:  # IRASim: every camera the annotation lists (camera_paths names a missing 'videos')
            cameras = range(len(ann["videos"])) if isinstance(ann["videos"], list) and ann["videos"] else [0]
        videos = camera_paths(root, layout, ann_path, ann, cameras)
        p, source = check_stored_action(ann_path, ann)
        problems += p
    except UserError as e:
        return problems + [str(e)], [], None
    notes, counts, sizes, missing = [], [], {}, []
    for k, v in zip(cameras, videos):
        try:
            n, h, w = probe_video(v) if fast else count_frames(v)
            counts.append(n)
            sizes[k] = (h, w)
        except MissingError as e:
            problems.append(str(e))
            missing.append(k)
        except UserError as e:  # every video is checked: the user wants the whole list at once
            problems.append(str(e))
    state, gripper = ann["state"], ann["gripper"]
    T = len(state)
    if len(counts) == len(videos):
        try:
            check_frame_counts(ann_path, T, videos, counts)
            if counts[0] > T:
                notes.append(f"{videos[0]}: {counts[0]} frames for {T} states; the last {counts[0] - T} are never used")
        except UserError as e:
            problems.append(str(e))
    if gripper.min() < -1e-6 or gripper.max() > 1 + 1e-6:
        notes.append(f"{ann_path}: continuous_gripper_state spans {gripper.min():.3g}..{gripper.max():.3g}, not 0 (open)..1")
    if problems:
        return problems, notes, dict(missing=missing)
    act = np.abs(compute_actions(state, gripper)).max(0)
    return problems, notes, dict(frames=T, sizes=sizes, act=act, source=source, missing=missing)


def check_dataset(root, cameras=None, num_frames=13, fast=False, splits=None, workers=None):
    """
    Validate every annotation and video of a dataset (or of some splits) the way training will read them; print a
    summary table, then every problem with its file. Returns the list of problems (empty: training can load it).
    cameras: what the run will use (None: every camera folder found, or for IRASim every camera an episode lists,
    and it says so); fast=True trusts the container's frame count instead of decoding every frame.
    """
    root, layout = Path(root), detect_layout(root)
    entries = all_annotations(root, splits)
    problems, what = [], ",".join(map(str, cameras or ()))
    if layout == "camera_folders":
        have = camera_folder_cameras(root)
        if cameras is None:
            cameras, what = have, f"{','.join(map(str, have))} (default: the camera folders found; pass --cameras " \
                                  f"to check what training will use)"
        absent = [k for k in cameras if k not in have]
        if absent:  # one line for a whole missing folder, not one per episode
            problems += [f"{root / 'videos' / f'cam{k}'}: camera folder not found; the dataset has "
                         f"{', '.join(f'cam{j}' for j in have) or 'no camera folders'}" for k in absent]
            cameras = [k for k in cameras if k in have]
    elif cameras is None:
        what = "every camera each episode lists (default; pass --cameras to check what training will use)"
    print(f"check {root} ({layout} layout): {len(entries)} annotations"
          f"{'' if splits is None else ' in ' + ','.join(splits)}, cameras {what}, "
          f"{'container frame counts' if fast else 'decoding every frame'}")
    if not entries:
        print(f"FAILED: {root}: no annotation JSON files found" + (f" in split(s) {','.join(splits)}" if splits else ""))
        return [f"{root}: no annotation JSON files found"]
    jobs = [(root, layout, p, None if cameras is None else tuple(cameras), fast) for _, p in entries]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) // 8))  # small datasets: not worth a pool
    if workers > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            results = list(progress(pool.imap(check_episode, jobs, chunksize=4), len(jobs), "check", 100))
    else:
        results = list(progress(map(check_episode, jobs), len(jobs), "check", 100))
    return report_check(root, layout, entries, results, cameras, num_frames, splits, problems)


def report_check(root, layout, entries, results, cameras, num_frames, splits, problems):
    """The summary table, notes and problems of check_dataset; returns every problem."""
    notes, stats, missing = [], {}, {}
    for (split, ann_path), (p, n, record) in zip(entries, results):
        s = stats.setdefault(split, dict(episodes=0, bad=0, frames=[], sizes={}, act=[], sources={}))
        problems += p
        notes += n
        s["episodes"] += 1
        for k in (record or {}).get("missing", []):
            missing.setdefault(k, []).append(ann_path.stem)
        if record is None or "frames" not in record:
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
    for k, names in sorted(missing.items()):  # each missing video is a problem below; this says how many, once
        print(f"missing: {root / 'videos' / f'cam{k}'}: has no video for {len(names)} of {len(entries)} episodes "
              f"(e.g. {', '.join(names[:3])})" if layout == "camera_folders" else
              f"missing: camera {k}: {len(names)} of {len(entries)} episodes lack its video (e.g. {', '.join(names[:3])})")
    for note in notes:
        print(f"note: {note}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {sum(s['bad'] for s in stats.values())} of {len(entries)} episodes:")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"OK: {len(entries)} episodes, no problems found")
    return problems


def single_threaded_worker(_):
    """worker_init_fn of every loader: a worker decodes whole clips on its own, so intra-op threads would only
    oversubscribe the cores."""
    torch.set_num_threads(1)


def raw_decode(paths, indices, size=None):
    """The reference for bench: plain PyAV, seek to the keyframe before the first index, decode to the last, RGB for
    the wanted frames, no checks; size: also resize each frame (resize_frames). Returns the number of frames."""
    n = 0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(int(indices[0] / (stream.average_rate * stream.time_base)), stream=stream, backward=True)
            rgb, wanted = VideoReformatter(), set(indices)
            for frame in container.decode(stream):
                i = round(float(frame.pts * stream.time_base * stream.average_rate))
                if i in wanted:
                    x = rgb.reformat(frame, format="rgb24").to_ndarray()
                    if size is not None:
                        resize_frames(torch.from_numpy(x).permute(2, 0, 1)[None], size)
                    n += 1
                if i >= indices[-1]:
                    break
    return n


def bench(root, split=None, cameras=(0,), size=(256, 320), num_frames=13, workers=2, batch_size=4, batches=20,
          frame_stride=1, cache=None):
    """
    Clips per second of raw PyAV decoding of a random set of windows (one process, native size), of one process
    calling the dataset, and of a DataLoader with `workers` processes over the same windows; with `cache`, also of
    LatentCacheDataset through the same DataLoader. Returns the figures as a dict.
    Measured on a 2-core CPU shared with other jobs (load 6), 2 workers, 120 random 13-frame windows:
      synthetic 4 cams 128x160 -> 64x80   raw 36 clips/s, dataset[i] 31, loader 71; pixel-latent cache 1790 (25x)
      synthetic 200-frame episodes         raw 61, dataset[i] 63, loader 107 (seek: 24 vs 44 ms a window from 0)
      Bridge samples 480x640 -> 256x320    raw 44 (+ resize 37), dataset[i] 29, loader 42
    """
    split = split or ("train" if "train" in available_splits(root) else available_splits(root)[0])
    ds = RobotVideoDataset(root, split, num_frames=num_frames, cameras=cameras, size=size, frame_stride=frame_stride)
    if len(ds) == 0:
        raise UserError(root, f"split {split!r} has no clips of {num_frames} frames")
    n_clips = batches * batch_size
    order = torch.randint(len(ds), (n_clips,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"bench {ds}\n{n_clips} random windows; episodes of {min(e.num_frames for e in ds.episodes)}.."
          f"{max(e.num_frames for e in ds.episodes)} frames; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    figures = {}
    t0 = time.perf_counter()
    for i in order:
        ep, start = ds.episodes[int(ds.window_episode[i])], int(ds.window_start[i])
        raw_decode(ep.videos, list(range(start, start + num_frames * frame_stride, frame_stride)))
    figures["raw_decode_clips_per_s"] = raw = n_clips / (time.perf_counter() - t0)
    print(f"raw PyAV decode {raw:8.1f} clips/s  (1 process, seek + decode + RGB, native size, no resize)")
    t0 = time.perf_counter()
    for i in order:
        ep, start = ds.episodes[int(ds.window_episode[i])], int(ds.window_start[i])
        raw_decode(ep.videos, list(range(start, start + num_frames * frame_stride, frame_stride)), size)
    figures["raw_resize_clips_per_s"] = raw_resize = n_clips / (time.perf_counter() - t0)
    print(f"  + resize      {raw_resize:8.1f} clips/s  (the same, each frame resized to {size[0]}x{size[1]})")
    t0 = time.perf_counter()
    for i in order:
        ds[i]
    figures["dataset_clips_per_s"] = direct = n_clips / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    print(f"dataset[i]      {direct:8.1f} clips/s  (1 process, 1 thread, + checks + resize to {size[0]}x{size[1]}) "
          f"= {direct / raw:.2f}x raw, {direct / raw_resize:.2f}x raw + resize")
    figures["loader_clips_per_s"] = cps = loader_rate(ds, order, workers, batch_size)
    print(f"DataLoader      {cps:8.1f} clips/s  ({workers} workers, batch {batch_size}) = {cps / raw:.2f}x raw decode "
          f"in 1 process ({cps / raw_resize:.2f}x with the resize), {cps / (raw * max(workers, 1)):.2f}x of "
          f"{max(workers, 1)} processes")
    if cache is not None:
        lc = LatentCacheDataset(cache)
        figures["cache_clips_per_s"] = c = loader_rate(lc, [i % len(lc) for i in order], workers, batch_size)
        print(f"latent cache    {c:8.1f} clips/s  ({workers} workers, batch {batch_size}) = {c / cps:.1f}x the video loader")
    print(f"a training step on B clips must take longer than B / {cps:.1f} s for the video loader to keep up")
    return figures


def loader_rate(ds, order, workers, batch_size):
    """Clips/s through a DataLoader over the windows `order`, timed after the first batch (worker start-up)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=workers,
                                         worker_init_fn=single_threaded_worker if workers else None,
                                         prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    rest = sum(1 for _ in it)
    return rest * batch_size / max(time.perf_counter() - t0, 1e-9)


def _ints(text):
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def _size(text):
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 256x320, got {text!r}") from None


def encode_command(args, parser):
    """`data.py encode`: build the dataset and tokenizer, then encode_dataset (this rank's share under torchrun)."""
    factor = args.pixel_factor if args.tokenizer == "pixel" else vae.WanVAE.spatial_factor
    if (args.num_frames - 1) % 4 or args.num_frames < 1:
        parser.error(f"--num_frames must be 1 + 4k (5, 9, 13, ...) for the tokenizer, got {args.num_frames}")
    if args.size[0] % factor or args.size[1] % factor:
        parser.error(f"--size must be a multiple of {factor} for the {args.tokenizer} tokenizer, got {args.size}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":   # what train.py runs the tokenizer in: the VAE in bf16 on CUDA, else fp32
        args.dtype = "bf16" if device.startswith("cuda") and args.tokenizer != "pixel" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    kw = dict(spatial_factor=args.pixel_factor) if args.tokenizer == "pixel" else {}
    tok = vae.load_tokenizer(args.tokenizer, args.tokenizer_path, device=device, dtype=dtype, **kw)
    ds = RobotVideoDataset(args.root, args.split, num_frames=args.num_frames, cameras=args.cameras, size=args.size,
                           frame_stride=args.frame_stride, start_stride=args.start_stride)
    settings = cache_settings(ds, tok, args.tokenizer)
    t0 = time.perf_counter()
    meta = encode_dataset(ds, tok, args.out, settings, rank, world, args.batch_windows, workers=args.workers)
    print(f"rank {rank}: encoded in {time.perf_counter() - t0:.1f} s" if meta is None else
          f"wrote {args.out}: {len(ds)} windows, {human_bytes(meta['bytes'])}, in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv):
    if argv[:1] in (["check"], ["bench"]) and any((Path(a) / "meta" / "info.json").is_file() for a in argv[1:]):
        import lerobot  # a LeRobot folder: its own options (camera names, --fps); pyarrow is needed only there
        return lerobot.main(argv)
    parser = argparse.ArgumentParser(prog="data.py", description="nanocosmos robot video data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate every annotation and video of a dataset; non-zero exit on problems")
    p.add_argument("root")
    p.add_argument("--cameras", type=_ints, default=None, help="e.g. 0,1,2,3: what training will use (default: every "
                   "camera folder, or every camera an IRASim episode lists)")
    p.add_argument("--num-frames", "--num_frames", type=int, default=13, help="clip length for the clip count")
    p.add_argument("--split", type=lambda t: tuple(x for x in t.split(",") if x), default=None,
                   help="e.g. train,val (default: every split)")
    p.add_argument("--fast", action="store_true", help="trust container frame counts instead of decoding every frame")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p = sub.add_parser("bench", help="loader clips/s beside raw PyAV decode of the same windows")
    p.add_argument("root")
    p.add_argument("--split", default=None, help="default: train if present, else the first split")
    p.add_argument("--cameras", type=_ints, default=(0,))
    p.add_argument("--size", type=_size, default=(256, 320), help="HxW")
    p.add_argument("--num-frames", "--num_frames", type=int, default=13)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", "--batch_size", type=int, default=4)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--frame-stride", "--frame_stride", type=int, default=1)
    p.add_argument("--cache", default=None, help="a latent cache folder to time through the same loader")
    p = sub.add_parser("encode", help="write the latent cache: the tokenizer latents of every training window")
    p.add_argument("root")
    p.add_argument("--out", required=True, help="cache folder (an interrupted encode resumes here)")
    p.add_argument("--tokenizer", required=True, choices=["wan2.1", "pixel"])
    p.add_argument("--tokenizer_path", "--tokenizer-path", default=None, help="tokenizer.pth (wan2.1)")
    p.add_argument("--pixel_factor", "--pixel-factor", type=int, default=8, help="pixel tokenizer pooling")
    p.add_argument("--cameras", type=_ints, default=(0,))
    p.add_argument("--num_frames", "--num-frames", type=int, default=13)
    p.add_argument("--size", type=_size, default=(256, 320), help="HxW")
    p.add_argument("--frame_stride", "--frame-stride", type=int, default=1)
    p.add_argument("--start_stride", "--start-stride", type=int, default=1)
    p.add_argument("--split", default="train")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="tokenizer dtype; auto = as train.py: bf16 for wan2.1 on CUDA, else fp32")
    p.add_argument("--batch_windows", "--batch-windows", type=int, default=8, help="windows per loader batch")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return 1 if check_dataset(args.root, args.cameras, args.num_frames, args.fast, args.split, args.workers) else 0
        if args.command == "encode":
            return encode_command(args, parser)
        bench(args.root, args.split, args.cameras, args.size, args.num_frames, args.workers, args.batch_size,
              args.batches, args.frame_stride, args.cache)
        return 0
    except UserError as e:  # a known problem with a file: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
