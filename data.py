"""
Robot video datasets for nanocosmos: the one dataset factory (make_dataset) and its protocol, the two annotation
layouts (detected from the folder), and the Cosmos action convention.

  IRASim / Bridge   root/annotation/<split>/<id>.json; camera k is root / json["videos"][k]["video_path"]
  camera folders    root/annotations/[<split>/]<name>.json; camera k is root/videos/cam<k>/<name>.mp4
                    (without split folders a deterministic hash of <name> holds out `val_fraction` as "val")
Actions are recomputed from `state` and `continuous_gripper_state` exactly as Cosmos does (compute_actions); a
stored `action` field is never read by training, only by `check`. LeRobot folders are lerobot.py's, the latent
cache is cache.py's, video decoding is video.py's; make_dataset finds them (imported inside it, never at the top).
Must not: render or simulate anything (synth.py does, importing this file), import a script (train/sample/convert/
checks), or do GPU work inside a Dataset. Commands (checks.py, forwarded from here):

    python data.py check ROOT [--cameras 0,1,2,3] [--split train,val]       # validate what training will read
    python data.py bench ROOT [--cameras 0,1] [--size 256x320] [--cache C]   # loader clips/s vs raw decode
    python data.py encode ROOT --out CACHE --tokenizer pixel|wan2.1 ...       # the latent cache
"""

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from configurator import UserError
# video.py's helpers, re-exported: data.progress, data.read_frames, ... are what the scripts call
from video import count_frames, is_held_out, probe_video, progress, read_frames, resize_frames, write_mp4  # noqa: F401

# -----------------------------------------------------------------------------
# the one dataset factory


def make_dataset(c, split, tok=None, rank=0, world=1, say=print, barrier=None):
    """
    The dataset of c["data_root"] for one split, whatever its format; c is train.py's config dict (data_root,
    cameras, frame_size, num_frames, frame_stride, start_stride, action_scale, gripper_scale, skip_bad, action_key,
    action_type, action_norm, state_key, fps, action_dim, train_split, latent_cache, tokenizer, num_workers).
    The format is found from the folder: meta/info.json = LeRobot (lerobot.LeRobotDataset), annotation/ = IRASim /
    Bridge, annotations/ = camera folders (RobotVideoDataset). Windows start every start_stride frames in the train
    split (c["train_split"]), every num_frames - 1 in the others (validation: distinct clips). With
    c["latent_cache"] the train split is the cache (cache.LatentCacheDataset), built here when missing with `tok`
    (every rank its share; barrier() between build and read). A missing data_root is a UserError naming the nearest
    existing folder (the default synthetic root is generated before this, by synth.ensure).

    The protocol every dataset it returns keeps (training, validation, rollout and the checks ask nothing else):
      len(ds), ds[i] -> {"video": uint8 [V,3,T,H,W] (the cache: "latent" [V,C,t,h,w] in the tokenizer's dtype),
                         "cond": {"action": float32 [T-1,A]}, "key": "<episode>/<start>"} (LeRobot: also "task");
                         every conditioning signal is a key of "cond", which default_collate batches as is;
      ds.num_frames (T), ds.cameras, ds.action_dim (A, from the data: never assumed);
      ds.window_episode, ds.window_start: int64 arrays, the episode and start frame of every item;
      ds.episode_names: list of str;
      ds.episode_frames(e, start=0, num_frames=None) -> uint8 [V,3,N,H,W] (None: the whole episode);
      ds.episode_cond(e, start=0, num_frames=None) -> {"action": float32 [N-1,A]}, the cond of those frames.
    The latent cache keeps len / getitem / the window arrays / episode_names (training only uses those).
    """
    root, T = c["data_root"], c["num_frames"]
    if not os.path.exists(root):
        near = nearest_folder(root)
        raise UserError(root, "data_root not found" + (f" (did you mean {near}?)" if near else ""))
    stride = c["start_stride"] if split == c.get("train_split", "train") else max(1, T - 1)
    if os.path.isfile(os.path.join(root, "meta", "info.json")):
        import lerobot
        if c.get("latent_cache"):
            raise UserError(f"--latent_cache={c['latent_cache']!r}", f"latent caches are built from "
                            f"Bridge/IRASim-layout folders; {root} is a LeRobot folder")
        ds = lerobot.LeRobotDataset(root, split, start_stride=stride, **lerobot.config_kwargs(c))
    else:
        ds = RobotVideoDataset(root, split, num_frames=T, cameras=tuple(c["cameras"]), size=tuple(c["frame_size"]),
                               frame_stride=c["frame_stride"], start_stride=stride, action_scale=c["action_scale"],
                               gripper_scale=c["gripper_scale"], skip_bad=c["skip_bad"], say=say if rank == 0 else None)
    if c.get("action_dim") and ds.action_dim != c["action_dim"]:
        raise UserError(f"--action_dim={c['action_dim']}", f"the actions of {root} have {ds.action_dim} dimensions "
                                                           f"but the model takes {c['action_dim']}: set action_dim={ds.action_dim}")
    skipped = getattr(ds, "skipped", 0)
    say(f"dataset {root} split {split!r}: {len(ds)} clips of {T} frames from {len(ds.episode_names)} episodes"
        + (f" | skip_bad: {skipped} bad episodes skipped" if c.get("skip_bad") else ""))
    if len(ds) == 0 and split == c.get("train_split", "train"):
        raise UserError(root, f"no training clips of {T} frames ({split})")
    if c.get("latent_cache") and split == c.get("train_split", "train"):
        import cache
        return cache.build(ds, tok, c, rank, world, say, barrier)
    return ds


def nearest_folder(path):
    """The existing folder whose name is closest to a missing path's (a typo in data_root), or None."""
    import difflib
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    names = [d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))] if parent else []
    close = difflib.get_close_matches(os.path.basename(os.path.normpath(path)), names, n=1, cutoff=0.6)
    return os.path.join(parent, close[0]) if close else None

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
# layouts and annotations: parsed once, validated, every problem named with its file


def detect_layout(root):
    root = Path(root)
    if (root / "annotation").is_dir():
        return "irasim"
    if (root / "annotations").is_dir():
        return "camera_folders"
    if not root.is_dir():
        raise UserError(root, "dataset folder not found")
    raise UserError(root, "neither annotation/<split>/*.json (IRASim) nor annotations/*.json (camera folders) found")


def available_splits(root):
    root, layout = Path(root), detect_layout(root)
    if layout == "irasim":
        return sorted(p.name for p in (root / "annotation").iterdir() if p.is_dir())
    folders = sorted(p.name for p in (root / "annotations").iterdir() if p.is_dir())
    return folders or ["train", "val"]


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
        raise UserError(path, "annotation file not found") from e
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
    actions: np.ndarray  # float32 [num_frames - frame_stride, A]: row j is the scaled action from frame j to j + stride


def load_episode(root, layout, ann_path, cameras, frame_stride=1, action_scale=20.0, gripper_scale=1.0):
    ann = parse_annotation(ann_path)
    videos = camera_paths(root, layout, ann_path, ann, cameras)
    T, s = len(ann["state"]), frame_stride
    check_frame_counts(ann_path, T, videos, [probe_video(v)[0] for v in videos])
    # row j = action between states j and j+s, i.e. compute_actions on state[::s] of every phase, interleaved
    phases = [compute_actions(ann["state"][p::s], ann["gripper"][p::s], action_scale, gripper_scale)
              for p in range(min(s, T))]
    actions = np.zeros((max(T - s, 0), phases[0].shape[1]), dtype=np.float32)
    for p, a in enumerate(phases):
        actions[p::s] = a
    return Episode(Path(ann_path).stem, Path(ann_path), videos, T, actions)

# -----------------------------------------------------------------------------
# the dataset


class RobotVideoDataset(torch.utils.data.Dataset):
    """
    Windows of `num_frames` frames, `frame_stride` apart, starting every `start_stride` frames (full windows only),
    sorted by (annotation path, start); items and methods as make_dataset's protocol. No randomness at all:
    shuffling is the sampler's job, so every process and DataLoader worker sees the same dataset.
    skip_bad: an unreadable episode is said (say) and counted (self.skipped) instead of stopping.
    """

    def __init__(self, root, split="train", num_frames=13, cameras=(0,), size=(256, 320), frame_stride=1, start_stride=1,
                 action_scale=20.0, gripper_scale=1.0, val_fraction=0.1, skip_bad=False, say=print):
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
        self.episodes, self.skipped, say = [], 0, say or (lambda *a: None)
        for ann_path in list_annotations(self.root, split, val_fraction):
            try:
                self.episodes.append(load_episode(self.root, self.layout, ann_path, self.cameras, frame_stride,
                                                  action_scale, gripper_scale))
            except UserError as e:
                if not skip_bad:
                    raise
                say(f"skipping bad episode: {e}")
                self.skipped += 1
        if self.skipped:
            say(f"skipped {self.skipped} bad episode(s) of {self.skipped + len(self.episodes)} in {self.root} "
                f"split {split!r}")
        if not self.episodes:
            raise UserError(self.root, f"split {split!r} has no usable episodes")
        self.episode_names = [ep.name for ep in self.episodes]
        self.action_dim = self.episodes[0].actions.shape[1]
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
        return {"video": self.episode_frames(e, start, self.num_frames),
                "cond": self.episode_cond(e, start, self.num_frames), "key": f"{self.episodes[e].name}/{start}"}

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
        """float32 [count-1,A]: the actions between the frames that episode_frames(episode_index, start, count) returns."""
        count = self._count(episode_index, start, count)
        s = self.frame_stride
        return torch.from_numpy(self.episodes[episode_index].actions[start:start + (count - 1) * s:s].copy())

    def episode_cond(self, episode_index, start=0, count=None):
        return {"action": self.episode_actions(episode_index, start, count)}


if __name__ == "__main__":  # the commands live in checks.py (this file imports no script); same argv, same exits
    import runpy
    runpy.run_module("checks", run_name="__main__", alter_sys=True)   # (pool workers find __main__.check_episode)
