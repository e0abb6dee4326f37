"""
LeRobot datasets read directly: a LeRobot folder (v2.0, v2.1 or v3.0) is a nanocosmos data_root, with no conversion
and without the `lerobot` package; pyarrow (parquet) is imported only here. The format as huggingface/lerobot writes
it (src/lerobot/datasets/utils.py, dataset_metadata.py, dataset_reader.py, video_utils.py; v2.x at f55c6e89):
meta/info.json (fps, features: every "video" feature is a camera; data_path / video_path templates, chunks_size,
splits), the episodes (v2.x meta/episodes.jsonl, one parquet and one mp4 per episode; v3.0 meta/episodes/*.parquet,
many episodes per file with per-camera from_timestamp), tasks and stats (v2.0 stats.json, v2.1 pooled
episodes_stats.jsonl). Parquet columns: timestamp, episode_index, task_index, `action_key`, `state_key`.
Parquet row r of an episode is the video frame at from_timestamp + timestamp[r], as LeRobot queries it.

Frames by timestamp: a clip of T frames at the training `fps` from row s takes, for k < T, the row nearest to
timestamp[s] + k / fps (ties to the earlier row); each camera seeks to the keyframe before the first wanted frame
and decodes forward, seeking again past gaps (a 13-frame 4 fps clip decodes ~19 frames, not its 91-frame span);
a wanted time without a video frame within half a period is an error.
Actions between clip frames k and k+1 (rows i_k < i_{k+1}; row j's command holds until frame j+1, as LeRobot pairs):
  action_type="absolute"     action[i_{k+1} - 1]                the last command before the later frame
  action_type="delta"        action[i_{k+1}] - action[i_k]      the sum of the per-row changes in between
  action_type="delta_state"  action[i_{k+1} - 1] - state[i_k]   the last command relative to the earlier state
normalised by action_norm ("mean_std", "min_max" to [-1, 1], "none"; a delta by the scale only; zero-spread
dimensions unscaled). Refused at open, one line naming the file: an fps the timestamps or videos contradict, NaN /
inf actions or states, a frame_stride. `python lerobot.py check|bench` = `python data.py check|bench` (checks.py).
Imports only leaf helpers (video.py, configurator.py): data.py finds this file, never the reverse.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from av.video.reformatter import VideoReformatter
import numpy as np
import torch

from configurator import UserError
from video import frame_rate, is_held_out, open_video, resize_frames

VERSIONS = ("v2.0", "v2.1", "v3.0")
ACTION_TYPES = ("absolute", "delta", "delta_state")
ACTION_NORMS = ("mean_std", "min_max", "none")


def _pyarrow():
    # pyarrow's bundled jemalloc starts a background thread at import; a process forked after that (DataLoader
    # workers, subprocess) can deadlock on its lock before exec (seen: a child hung in futex_wait in CI). Off,
    # before the first import (the setting is read once, when jemalloc starts).
    os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError("reading LeRobot datasets needs pyarrow (pip install pyarrow): it reads their parquet "
                          "files, and nothing else in nanocosmos needs it") from e
    return pyarrow

# -----------------------------------------------------------------------------
# metadata: info.json, episodes, tasks, stats; every problem names its file


def read_json(path, lines=False):
    """A JSON file, or with lines=True a JSON-lines file as a list."""
    try:
        text = Path(path).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except FileNotFoundError as e:
        raise UserError(path, "not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(path, f"cannot read JSON ({e})") from e


def read_parquet(path, columns):
    """{column: numpy array} of a parquet file; list columns (vectors) become [rows, dim] arrays."""
    pa, path = _pyarrow(), Path(path)
    try:
        names = pa.parquet.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise UserError(path, f"has no column(s) {missing}; its columns: {names}")
        table = pa.parquet.read_table(path, columns=list(columns))
    except FileNotFoundError as e:
        raise UserError(path, "parquet file not found") from e
    except (OSError, pa.ArrowException) as e:
        raise UserError(path, f"cannot read parquet ({e})") from e
    out = {}
    for name in columns:
        col = table.column(name).combine_chunks()
        if col.null_count:
            raise UserError(path, f"column {name!r} has {col.null_count} null rows")
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
            lengths = np.asarray(col.value_lengths())
            if len(lengths) and (lengths != lengths[0]).any():
                raise UserError(path, f"column {name!r} has rows of different lengths")
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def load_info(root):
    """meta/info.json, checked for what the reader relies on (a version it knows, fps, features, path templates)."""
    path = Path(root) / "meta" / "info.json"
    info = read_json(path)
    if not isinstance(info, dict):
        raise UserError(path, f"must be a JSON object, got {type(info).__name__}")
    if info.get("codebase_version") not in VERSIONS:
        raise UserError(path, f"codebase_version {info.get('codebase_version')!r}; nanocosmos reads {', '.join(VERSIONS)}")
    for key in ("fps", "features", "data_path", "video_path"):
        if not info.get(key):
            raise UserError(path, f"missing {key!r}" + (" (a dataset without videos)" if key == "video_path" else ""))
    for key, ok, want in (("fps", isinstance(info["fps"], (int, float)) and info["fps"] > 0, "a positive number"),
                          ("features", isinstance(info["features"], dict), "an object {name: {dtype, shape, ...}}"),
                          ("data_path", isinstance(info["data_path"], str), "a path template string"),
                          ("video_path", isinstance(info["video_path"], str), "a path template string")):
        if not ok:
            raise UserError(path, f"{key!r} must be {want}, got {str(info[key])[:60]!r}")
    return info


def video_keys(info):
    return [k for k, f in info["features"].items() if isinstance(f, dict) and f.get("dtype") == "video"]


def select_cameras(root, info, cameras):
    """Camera keys from names ("observation.images.top", or just "top") or indices into the video features."""
    path, keys = Path(root) / "meta" / "info.json", video_keys(info)
    listing = ", ".join(f"{i} = {k}" for i, k in enumerate(keys))
    if not keys:
        raise UserError(path, "has no video features (dtype 'video'); nanocosmos needs camera videos")
    chosen = []
    for c in keys if cameras is None else cameras:
        if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.isdigit()):
            if not 0 <= int(c) < len(keys):
                raise UserError(path, f"camera index {c} out of range; the cameras are {listing}")
            chosen.append(keys[int(c)])
        elif c in keys or f"observation.images.{c}" in keys:
            chosen.append(c if c in keys else f"observation.images.{c}")
        else:
            raise UserError(path, f"no camera {c!r}; the cameras are {listing}")
    return chosen


def load_episodes(root, info, cameras):
    """Per episode: index, length, its data file, and per camera (video file, from_timestamp, to_timestamp or None
    for the whole file), sorted by index."""
    root = Path(root)
    if info["codebase_version"] != "v3.0":
        path, chunk = root / "meta" / "episodes.jsonl", int(info.get("chunks_size", 1000))
        eps = []
        for r in read_json(path, lines=True):
            if not {"episode_index", "length"} <= set(r):
                raise UserError(path, f"an entry lacks 'episode_index' or 'length': {str(r)[:120]}")
            f = dict(episode_chunk=int(r["episode_index"]) // chunk, episode_index=int(r["episode_index"]))
            eps.append(dict(index=f["episode_index"], length=int(r["length"]), data=root / info["data_path"].format(**f),
                            videos=[(root / info["video_path"].format(video_key=k, **f), 0.0, None) for k in cameras]))
        return sorted(eps, key=lambda e: e["index"])
    files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if not files:
        raise UserError(root / "meta" / "episodes", "no episode metadata (meta/episodes/chunk-*/file-*.parquet)")
    per_cam = ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
    columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    columns += [f"videos/{k}/{c}" for k in cameras for c in per_cam]
    eps = []
    for path in files:
        t = read_parquet(path, columns)
        for i, e in enumerate(t["episode_index"]):
            videos = [(root / info["video_path"].format(video_key=k, chunk_index=int(t[f"videos/{k}/chunk_index"][i]),
                                                         file_index=int(t[f"videos/{k}/file_index"][i])),
                       float(t[f"videos/{k}/from_timestamp"][i]), float(t[f"videos/{k}/to_timestamp"][i])) for k in cameras]
            data = info["data_path"].format(chunk_index=int(t["data/chunk_index"][i]), file_index=int(t["data/file_index"][i]))
            eps.append(dict(index=int(e), length=int(t["length"][i]), data=root / data, videos=videos))
    return sorted(eps, key=lambda e: e["index"])


def load_tasks(root):
    """{task_index: task string}."""
    meta = Path(root) / "meta"
    if (meta / "tasks.parquet").is_file():  # written from a pandas frame indexed by the task string
        names = _pyarrow().parquet.read_schema(meta / "tasks.parquet").names
        col = "task" if "task" in names else "__index_level_0__"  # an unnamed pandas index
        t = read_parquet(meta / "tasks.parquet", ["task_index", col])
        return {int(i): str(task) for i, task in zip(t["task_index"], t[col])}
    return {int(r["task_index"]): str(r["task"]) for r in read_json(meta / "tasks.jsonl", lines=True)}


def load_stats(root, key):
    """{mean, std, min, max} float64 [dim] of one feature: meta/stats.json, else (v2.1) meta/episodes_stats.jsonl
    pooled as LeRobot's aggregate_stats does (count-weighted mean, the parallel variance formula)."""
    meta = Path(root) / "meta"
    path = meta / "stats.json" if (meta / "stats.json").is_file() else meta / "episodes_stats.jsonl"
    if not path.is_file():
        raise UserError(meta / "stats.json", "not found (nor episodes_stats.jsonl): set action_norm='none'")
    try:
        if path.name == "stats.json":
            s = read_json(path)[key]
            return {k: np.asarray(s[k], dtype=np.float64).reshape(-1) for k in ("mean", "std", "min", "max")}
        per = [r["stats"][key] for r in read_json(path, lines=True)]
        n = np.array([np.asarray(s["count"], dtype=np.float64).reshape(-1)[0] for s in per])[:, None]
        get = {k: np.stack([np.asarray(s[k], dtype=np.float64).reshape(-1) for s in per]) for k in ("mean", "std", "min", "max")}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(path, f"no usable mean/std/min/max{'/count' if path.suffix == '.jsonl' else ''} for {key!r} ({e!r})") from e
    mean = (n * get["mean"]).sum(0) / n.sum()
    var = (n * (get["std"] ** 2 + (get["mean"] - mean) ** 2)).sum(0) / n.sum()
    return dict(mean=mean, std=np.sqrt(var), min=get["min"].min(0), max=get["max"].max(0))


def split_episodes(root, info, indices, split, val_fraction):
    """Episode indices of a split: info.json's "splits" ranges ("0:40"); a "val" split that is not there is held out
    of "train" by a hash of the episode name (video.is_held_out; at least the last episode when none is)."""
    ranges = {s: range(*(int(x) for x in r.split(":"))) for s, r in (info.get("splits") or {}).items()}
    if split in ranges and (split != "train" or "val" in ranges):
        return [i for i in indices if i in ranges[split]]
    if split not in ("train", "val"):
        raise UserError(Path(root) / "meta" / "info.json", f"has no split {split!r}; splits: {sorted(ranges)}")
    pool = [i for i in indices if "train" not in ranges or i in ranges["train"]]
    held = [is_held_out(f"episode_{i:06d}", val_fraction) for i in pool]
    if val_fraction > 0 and len(pool) > 1 and not any(held):
        held[-1] = True
    return [i for i, h in zip(pool, held) if h == (split == "val")]


def load_rows(eps, columns, problems=None):
    """Adds e["rows"] = {column: array} to every episode, reading each data file once (v3 files hold many episodes).
    With a `problems` list, a bad file or episode is recorded there and gets no "rows" instead of raising."""
    def fail(err):
        if problems is None:
            raise err
        problems.append(str(err))
    by_file = {}
    for e in eps:
        by_file.setdefault(e["data"], []).append(e)
    for path, group in by_file.items():
        try:
            t = read_parquet(path, ["episode_index", *columns])
        except UserError as err:
            fail(err)
            continue
        order = np.argsort(t["episode_index"], kind="stable")  # rows of an episode keep their order
        ids = t["episode_index"][order]
        for e in group:
            rows = order[np.searchsorted(ids, e["index"]):np.searchsorted(ids, e["index"], "right")]
            if len(rows) != e["length"]:
                fail(UserError(path, f"episode {e['index']} has {len(rows)} rows, the episode metadata says length "
                                     f"{e['length']}"))
            else:
                e["rows"] = {c: t[c][rows] for c in columns}

# -----------------------------------------------------------------------------
# time: which rows a clip uses, and decoding the frames shown at given times


def clip_rows(ts, start, count, fps):
    """Rows whose timestamps are nearest to ts[start] + k / fps for k < count (a tie goes to the earlier row)."""
    target = ts[start] + np.arange(count) / fps
    j = np.clip(np.searchsorted(ts, target), 1, max(len(ts) - 1, 1))
    earlier = target - ts[j - 1] <= ts[np.minimum(j, len(ts) - 1)] - target + 1e-6  # 1 us: float32 timestamps
    return np.where(earlier, j - 1, np.minimum(j, len(ts) - 1))


def clips_that_fit(ts, starts, count, fps, source_fps):
    """Which start rows have room for `count` frames: the last wanted time within half a frame of the last row."""
    return ts[starts] + (count - 1) / fps <= ts[-1] + 0.5 / source_fps + 1e-6


def keyframe_times(container, stream, t0, t1):
    """Times (s) of the keyframes from the one at or before t0 through t1, from packet headers (no decoding)."""
    container.seek(round(t0 / stream.time_base), stream=stream, backward=True, any_frame=False)
    keys = []
    for packet in container.demux(stream):
        if packet.dts is not None and packet.dts * packet.time_base > t1:
            break  # decode order: every later packet is shown after t1
        if packet.is_keyframe and packet.pts is not None:
            keys.append(float(packet.pts * packet.time_base))
    return sorted(keys)


def _key_before(keys, t):
    i = np.searchsorted(keys, t + 1e-6, side="right")  # 1 us: float32 timestamps
    return keys[i - 1] if i else 0.0


def _decode_run(path, frames, times, keys, tol):
    """
    One forward run of decoded frames: for each wanted time in turn, the nearer of the frames around it. Stops early
    when the keyframe before the next wanted time lies beyond the frames decoded so far (seeking there is cheaper
    than decoding the gap). Returns (picked [(frame, time)], frames decoded), or (None, n) when the run started
    after the first wanted time (a seek that landed late).
    """
    picked, prev, n = [], None, 0
    for frame in frames:
        if frame.pts is None:
            continue
        n, t = n + 1, frame.time
        if prev is None and t > times[0] + tol:
            return None, n
        while len(picked) < len(times) and t >= times[len(picked)] - 1e-6:  # a frame at the time (float32): no need
            q = times[len(picked)]                                             # to decode the one after it
            picked.append(prev if prev is not None and q - prev[1] <= t - q else (frame, t))
        if len(picked) == len(times) or _key_before(keys, times[len(picked)]) > t:
            break
        prev = (frame, t)
    if not picked and prev is not None:  # the wanted time is past the last frame: the last frame, if near
        picked.append(prev)
    for q, (_, t) in zip(times, picked):
        if abs(t - q) > tol:
            raise UserError(path, f"no frame within {tol * 1e3:.1f} ms of {q:.4f} s (nearest at {t:.4f} s)")
    return picked, n


def decode_at(path, times, tol):
    """
    The frames shown at `times` (seconds, ascending) of a video as uint8 [N,3,H,W], and how many frames were decoded.
    Finds the keyframes in the clip's span from packet headers, seeks to the one at or before the first time and
    decodes forward, seeking ahead again whenever the keyframe before the next wanted time is past what is decoded
    (LeRobot encodes a keyframe every 2 frames: a 4 fps clip of 30 fps video then decodes ~1.5 frames per frame).
    """
    rgb = VideoReformatter()  # one per call: frame.to_ndarray would build a swscale context per frame
    with open_video(path) as (container, stream):
        keys, picked, decoded = keyframe_times(container, stream, times[0], times[-1]), [], 0
        while len(picked) < len(times):
            start = _key_before(keys, times[len(picked)])
            container.seek(round(start / stream.time_base), stream=stream, backward=True, any_frame=False)
            got, n = _decode_run(path, container.decode(stream), times[len(picked):], keys, tol)
            decoded += n
            if got is None and keys:  # the container's seek landed late: find keyframes from the file's start
                keys = []
                continue
            if not got:
                raise UserError(path, f"no frame near {times[len(picked)]:.4f} s ({stream.frames} frames in the file)")
            picked += got
        converted = {}
        for frame, t in picked:
            if t not in converted:
                converted[t] = rgb.reformat(frame, format="rgb24").to_ndarray()
        x = np.stack([converted[t] for _, t in picked])
    return torch.from_numpy(x).permute(0, 3, 1, 2), decoded

# -----------------------------------------------------------------------------
# actions


def clip_actions(action, state, rows, mode):
    """float64 [len(rows)-1, A]: the actions between consecutive clip rows (module docstring)."""
    last = np.maximum(rows[1:] - 1, rows[:-1])  # the last command before the later frame
    if mode == "absolute":
        return action[last]
    if mode == "delta":
        return action[rows[1:]] - action[rows[:-1]]
    return action[last] - state[rows[:-1]]


def normalise(x, stats, mode, norm):
    if norm == "none":
        return x
    offset, scale = ((stats["mean"], stats["std"]) if norm == "mean_std" else
                     ((stats["max"] + stats["min"]) / 2, (stats["max"] - stats["min"]) / 2))
    scale = np.where(scale > 1e-8, scale, 1.0)  # a constant dimension: dividing by ~0 would blow up any change
    return (x - offset) / scale if mode == "absolute" else x / scale

# -----------------------------------------------------------------------------
# the dataset


@dataclass
class LeRobotEpisode:
    name: str                # "episode_000012"; item keys are "<name>/<start row>"
    index: int               # episode_index
    num_frames: int          # parquet rows (frames at the dataset's fps)
    timestamps: np.ndarray   # float64 [num_frames] seconds, the parquet's `timestamp`
    action: np.ndarray       # float64 [num_frames, A], the action column as stored
    state: np.ndarray        # float64 [num_frames, A] (action_type "delta_state"), else None
    task_index: np.ndarray   # int64 [num_frames]
    videos: list             # per camera (mp4 path, from_timestamp, to_timestamp or None)
    data: Path = None        # the parquet file of its rows

class LeRobotDataset(torch.utils.data.Dataset):
    """
    Clips of `num_frames` frames at `fps` (None: the dataset's own) from a LeRobot folder; items are
    {"video": uint8 [V,3,T,H,W], "cond": {"action": float32 [T-1,A]}, "task": str, "key": "<episode>/<start row>"},
    and the methods of data.make_dataset's protocol. No randomness. Refused before any training step: an fps in
    info.json that the parquet timestamps or the videos contradict, NaN / inf in the columns it reads.
    """

    def __init__(self, root, split="train", num_frames=13, cameras=None, size=(256, 320), fps=None, start_stride=1,
                 action_key="action", action_type="absolute", action_norm="mean_std", state_key="observation.state",
                 val_fraction=0.1):
        for key, value, allowed in (("action_type", action_type, ACTION_TYPES), ("action_norm", action_norm, ACTION_NORMS)):
            if value not in allowed:
                raise UserError(f"--{key}={value!r}", f"must be one of {', '.join(allowed)}")
        assert num_frames >= 2 and start_stride >= 1, (num_frames, start_stride)
        self.root, self.split, self.info = Path(root), split, load_info(root)
        info_path = self.root / "meta" / "info.json"
        self.version, self.source_fps = self.info["codebase_version"], float(self.info["fps"])
        self.fps = float(fps or self.source_fps)
        if self.fps > self.source_fps + 1e-9:
            raise UserError(info_path, f"the dataset has {self.source_fps:g} fps; fps={self.fps:g} would repeat frames")
        self.num_frames, self.size = num_frames, None if size is None else tuple(size)
        self.action_type, self.action_norm, self.action_key = action_type, action_norm, action_key
        self.cameras = select_cameras(root, self.info, cameras)
        keys = [action_key] + ([state_key] if action_type == "delta_state" else [])
        for k in keys:
            if k not in self.info["features"]:
                raise UserError(info_path, f"has no feature {k!r}; features: {sorted(self.info['features'])}")
        self.tasks = load_tasks(root)
        metas = load_episodes(root, self.info, self.cameras)
        chosen = set(split_episodes(root, self.info, [e["index"] for e in metas], split, val_fraction))
        metas = [e for e in metas if e["index"] in chosen and e["length"] > 0]
        if not metas:
            raise UserError(self.root, f"split {split!r} has no episodes")
        load_rows(metas, ["timestamp", "task_index", *keys])
        self.episodes = [self._episode(e, keys) for e in metas]
        self.episode_names = [ep.name for ep in self.episodes]
        check_rates(info_path, self.source_fps, self.episodes)
        dims = sorted({ep.action.shape[1] for ep in self.episodes})
        if len(dims) > 1:
            raise UserError(self.root / "data", f"{action_key!r} has {dims} dimensions in different episodes")
        self.action_dim = dims[0]
        self.stats = None if action_norm == "none" else load_stats(root, action_key)
        if self.stats is not None and any(len(v) != self.action_dim for v in self.stats.values()):
            raise UserError(self.root / "meta", f"the stats of {action_key!r} are not {self.action_dim}-D")
        starts = [np.arange(0, ep.num_frames, start_stride) for ep in self.episodes]
        starts = [s[clips_that_fit(ep.timestamps, s, num_frames, self.fps, self.source_fps)]
                  for s, ep in zip(starts, self.episodes)]
        self.window_episode = np.concatenate([np.full(len(s), i) for i, s in enumerate(starts)]).astype(np.int64)
        self.window_start = np.concatenate(starts).astype(np.int64)
        self.decoded_frames = 0  # frames this process decoded (bench: decoded per clip vs delivered)

    def _episode(self, meta, keys):
        rows, path, i = meta["rows"], meta["data"], meta["index"]
        ts = rows["timestamp"].astype(np.float64)
        action = rows[keys[0]].astype(np.float64).reshape(len(ts), -1)
        state = rows[keys[1]].astype(np.float64).reshape(len(ts), -1) if len(keys) > 1 else None
        if state is not None and state.shape != action.shape:
            raise UserError(path, f"delta_state needs {keys[0]!r} and {keys[1]!r} of one size: {action.shape[1]} vs {state.shape[1]}")
        for k, x in zip(keys, (action, state)):  # what `check` checks, before the first step rather than at step 5
            bad = np.argwhere(~np.isfinite(x))
            if len(bad):
                raise UserError(path, f"episode {i}: {len(bad)} NaN/inf in {k!r}, first at row {bad[0][0]}")
        if len(ts) > 1 and not (np.diff(ts) > 0).all():
            raise UserError(path, f"episode {i}: timestamps are not increasing")
        unknown = set(rows["task_index"].tolist()) - set(self.tasks)
        if unknown:
            raise UserError(path, f"episode {i}: task_index {sorted(unknown)} not in meta/tasks")
        return LeRobotEpisode(f"episode_{i:06d}", i, len(ts), ts, action, state, rows["task_index"].astype(np.int64),
                              meta["videos"], meta["data"])

    def __len__(self):
        return len(self.window_start)

    def __repr__(self):
        return (f"LeRobotDataset({str(self.root)!r}, split={self.split!r}, {self.version}: {len(self.episodes)} episodes, "
                f"{len(self)} clips of {self.num_frames} frames at {self.fps:g} fps (data {self.source_fps:g} fps), "
                f"cameras {self.cameras}, size {self.size}, {self.action_key!r} {self.action_dim}-D {self.action_type} "
                f"norm {self.action_norm})")

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"clip {i} out of range for {len(self)} clips")
        e, start = int(self.window_episode[i]), int(self.window_start[i])
        ep = self.episodes[e]
        return {"video": self.episode_frames(e, start, self.num_frames), "cond": self.episode_cond(e, start, self.num_frames),
                "task": self.tasks[int(ep.task_index[start])], "key": f"{ep.name}/{start}"}

    def _rows(self, e, start, count):
        ep = self.episodes[e]
        if count is None:  # as many frames as fit
            count = 1 + int((ep.timestamps[-1] + 0.5 / self.source_fps + 1e-6 - ep.timestamps[start]) * self.fps)
        if not (0 <= start < ep.num_frames and count >= 1 and
                clips_that_fit(ep.timestamps, np.array([start]), count, self.fps, self.source_fps)[0]):
            raise IndexError(f"{ep.name} has {ep.num_frames} rows at {self.source_fps:g} fps: {count} frames at "
                             f"{self.fps:g} fps from row {start} do not fit")
        return clip_rows(ep.timestamps, start, count, self.fps)

    def episode_frames(self, episode_index, start=0, count=None):
        """uint8 [V,3,count,H,W] (count=None: as many as fit), decoded by timestamp."""
        ep = self.episodes[episode_index]
        rows = self._rows(episode_index, start, count)
        views = []
        for path, from_ts, _ in ep.videos:
            x, n = decode_at(path, from_ts + ep.timestamps[rows], 0.5 / self.source_fps)
            self.decoded_frames += n
            views.append(resize_frames(x, self.size))
        return torch.stack(views).transpose(1, 2).contiguous()

    def episode_actions(self, episode_index, start=0, count=None):
        """float32 [count-1, A]: the normalised actions between the frames episode_frames returns."""
        ep = self.episodes[episode_index]
        rows = self._rows(episode_index, start, count)
        a = normalise(clip_actions(ep.action, ep.state, rows, self.action_type), self.stats, self.action_type, self.action_norm)
        return torch.from_numpy(a.astype(np.float32))

    def episode_cond(self, episode_index, start=0, count=None):
        return {"action": self.episode_actions(episode_index, start, count)}


def check_rates(info_path, fps, episodes):
    """The fps of info.json must be the rate of the parquet timestamps and of every camera's video (checked on the
    first episode's files: a header read each): a disagreement would sample clips spanning another time than meant."""
    for ep in episodes:
        if ep.num_frames > 2:
            rate = 1.0 / float(np.median(np.diff(ep.timestamps)))
            if abs(rate - fps) > 0.01 * fps:
                raise UserError(ep.data, f"episode {ep.index}: the timestamps run at {rate:.4g} per second but "
                                         f"{info_path} says fps {fps:g}")
    for path in dict.fromkeys(v[0] for v in episodes[0].videos):
        rate = frame_rate(path)
        if rate and abs(rate - fps) > 0.01 * fps:
            raise UserError(path, f"the video runs at {rate:.4g} fps but {info_path} says fps {fps:g}")


def config_kwargs(c):
    """LeRobotDataset keyword arguments from a train.py / sample.py settings dict (keys of the same names)."""
    if c.get("frame_stride", 1) != 1:
        raise UserError(f"--frame_stride={c['frame_stride']!r}", f"a LeRobot folder ({c.get('data_root')}) takes its clip "
                        f"rate from fps (frames chosen by timestamp): set fps (now {c['fps']}) instead of frame_stride")
    return dict(num_frames=c["num_frames"], cameras=tuple(c["cameras"]), size=tuple(c["frame_size"]), fps=c["fps"],
                action_key=c["action_key"], action_type=c["action_type"], action_norm=c["action_norm"],
                state_key=c["state_key"])


if __name__ == "__main__":  # the commands live in checks.py, which imports this file (never the reverse)
    import runpy
    runpy.run_module("checks", run_name="__main__", alter_sys=True)   # (pool workers find __main__.check_episode)
