"""
The data commands: `check` (validate a dataset the way training will read it, before a week of training), `bench`
(loader clips/s beside raw decoding) and `encode` (write the latent cache), for every format data.make_dataset
reads. `python data.py ...` and `python lerobot.py ...` run this file's main.

    python data.py check ROOT [--cameras 0,1,2,3] [--split train,val] [--fast]  # Bridge / IRASim / camera folders
    python data.py check ROOT [--cameras top,wrist] [--fps 4] [--action-norm mean_std] ...        # a LeRobot folder
    python data.py bench ROOT [--cameras 0,1] [--size 256x320] [--cache CACHE]
    python data.py encode ROOT --out CACHE --tokenizer pixel|wan2.1 [--tokenizer_path P] --cameras 0,1
                   --num_frames 13 --size 256x320 [--start_stride S] [--split train]   # torchrun: each rank a share
Known errors print one line `error: <file>: <problem>` and exit 1; bad arguments exit 2; problems found exit 1.
"""

import argparse
import math
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import configurator
import vae
from cache import LatentCacheDataset, cache_settings, encode_dataset, human_bytes
from configurator import UserError
from data import (RobotVideoDataset, _array, available_splits, camera_folder_cameras, camera_paths, check_frame_counts,
                  compute_actions, detect_layout, list_annotations, parse_annotation, relative_actions)
from lerobot import (LeRobotDataset, clips_that_fit, load_episodes, load_info, load_rows, load_stats, select_cameras,
                     split_episodes)
from video import (count_frames, decode_frames, open_video, progress, probe_video, resize_frames,
                   single_threaded_worker, video_timeline)


# -----------------------------------------------------------------------------
# check: Bridge / IRASim and camera folders

def all_annotations(root, splits=None):
    """(split, path) of every annotation of the dataset (of `splits` only), split as data.list_annotations splits."""
    return [(split, p) for split in available_splits(root) if splits is None or split in splits
            for p in list_annotations(root, split)]


def non_finite(obj, where=""):
    """JSON paths (e.g. "action[3][2]") of every NaN / Infinity number in a parsed JSON value (json.loads accepts them)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in non_finite(v, f"{where}[{i}]")]
    return []


def stored_action(path, ann):
    """The annotation's own 'action' field as float64 [T-1, >=6], or None when it has none (only `check` reads it)."""
    if "action" not in ann["json"]:
        return None
    T, action = len(ann["state"]), _array(ann["json"], "action", path)
    if action.ndim != 2 or action.shape[0] != T - 1 or action.shape[1] < 6:
        raise UserError(path, f"'action' must be [{T - 1}, 7] (one row per state transition), got {list(action.shape)}")
    return action


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
    """Check one annotation and its videos (a worker's job) -> (problems, notes: '<file>: ...', record: frames, sizes,
    max |scaled action|, stored gripper column source, missing cameras; None or just those if unusable)."""
    root, layout, ann_path, cameras, fast = job
    problems = []
    try:
        ann = parse_annotation(ann_path)
        if bad := non_finite(ann["json"]):  # parse_annotation already refuses NaN in what training reads
            problems.append(f"{ann_path}: {len(bad)} NaN/Infinity value(s) in the JSON, first at {bad[0]}")
        if cameras is None:  # IRASim: every camera the annotation lists (camera_paths names a missing 'videos')
            cameras = range(len(ann["videos"])) if isinstance(ann["videos"], list) and ann["videos"] else [0]
        videos = camera_paths(root, layout, ann_path, ann, cameras)
        p, source = check_stored_action(ann_path, ann)
    except UserError as e:
        return problems + [str(e)], [], None
    problems += p
    notes, counts, sizes, missing = [], [], {}, []
    for k, v in zip(cameras, videos):
        try:
            n, h, w = probe_video(v) if fast else count_frames(v)
            counts.append(n)
            sizes[k] = (h, w)
        except UserError as e:  # every video is checked (a missing one: "video file not found"), the list at once
            problems.append(str(e))
            missing += [] if v.exists() else [k]
    state, gripper, T = ann["state"], ann["gripper"], len(ann["state"])
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
    """Validate (and print, with a summary table) every annotation and video as training reads them; returns the
    problems. cameras: the run's (None: every one found); fast=True trusts container frame counts (no decoding)."""
    root, layout = Path(root), detect_layout(root)
    entries = all_annotations(root, splits)
    problems, what = [], ",".join(map(str, cameras or ()))
    if layout == "camera_folders":
        have = camera_folder_cameras(root)
        if cameras is None:
            cameras, what = have, f"{','.join(map(str, have))} (default: the camera folders found; pass --cameras " \
                                  f"to check what training will use)"
        problems += [f"{root / 'videos' / f'cam{k}'}: camera folder not found; the dataset has "  # not per episode
                     f"{', '.join(f'cam{j}' for j in have) or 'no camera folders'}" for k in cameras if k not in have]
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
        s = stats.setdefault(split, dict(episodes=0, bad=0, frames=[], sizes={}, act=[], sources=Counter()))
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
        s["sources"][record["source"] or "not stored"] += 1
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
    return report(problems, f"{len(entries)} episodes", f" in {sum(s['bad'] for s in stats.values())} of {len(entries)} "
                                                        f"episodes")


# -----------------------------------------------------------------------------
# check and bench of a LeRobot folder

def _check_videos(info_path, eps, keys, fps, decode, problems):
    """Per camera: codecs, fps, sizes, frames, files; per file, its own rate against info.json's fps; per episode,
    video frames against parquet rows and rows without a frame at their timestamp."""
    summary, half = [], 0.5 / fps
    for k, key in enumerate(keys):
        timelines, metas = {}, set()
        for path in dict.fromkeys(e["videos"][k][0] for e in eps):
            try:
                timelines[path], meta = video_timeline(path, decode)
                metas.add(meta)
                if meta[1] and abs(meta[1] - fps) > 0.01 * fps:
                    problems.append(f"{path}: the video runs at {meta[1]:.4g} fps but {info_path} says fps {fps:g}")
            except UserError as err:
                problems.append(str(err))
        for e in eps:
            path, t0, t1 = e["videos"][k]
            if path not in timelines:
                continue
            times = timelines[path]
            mine = times[(times >= t0 - half) & (times < (times[-1] + half if t1 is None else t1 - half))]
            if len(mine) != e["length"]:
                problems.append(f"{path}: episode {e['index']} has {len(mine)} video frames ({len(mine) / fps:.3f} s) "
                                f"but {e['length']} parquet rows ({e['length'] / fps:.3f} s)")
            elif "rows" in e and len(mine):
                want = t0 + e["rows"]["timestamp"].astype(np.float64)
                j = np.clip(np.searchsorted(mine, want), 1, len(mine) - 1) if len(mine) > 1 else np.zeros(len(want), int)
                gap = np.minimum(np.abs(mine[j] - want), np.abs(mine[np.maximum(j - 1, 0)] - want))
                if (gap > half).any():
                    problems.append(f"{path}: episode {e['index']}: no frame within half a frame of row "
                                    f"{int(np.argmax(gap > half))}'s timestamp {want[np.argmax(gap > half)]:.4f} s")
        summary.append((key, metas, sum(len(t) for t in timelines.values()), len(timelines)))
    return summary


def check_columns(root, info, eps, s, problems):
    """What training will ask of the parquet columns and the stats with settings s: the columns exist, hold no
    NaN / inf, the timestamps run at info.json's fps, and the stats action_norm needs are there."""
    info_path, fps = Path(root) / "meta" / "info.json", float(info["fps"])
    columns = [s["action_key"]] + ([s["state_key"]] if s["action_type"] == "delta_state" else [])
    absent = [c for c in columns if c not in info["features"]]
    problems += [f"{info_path}: has no feature {c!r} (action_type={s['action_type']!r} reads it); features: "
                 f"{sorted(info['features'])}" for c in absent]
    columns = [c for c in [*columns, s["state_key"]] if c in info["features"]]
    load_rows(eps, ["timestamp", *dict.fromkeys(columns)], problems)
    for e in eps:
        for c in dict.fromkeys(columns) if "rows" in e else ():
            bad = np.argwhere(~np.isfinite(e["rows"][c].astype(np.float64)))
            if len(bad):
                problems.append(f"{e['data']}: episode {e['index']}: {len(bad)} NaN/inf in {c!r}, first at row {bad[0][0]}")
        ts = e["rows"]["timestamp"].astype(np.float64) if "rows" in e else []
        rate = 1.0 / float(np.median(np.diff(ts))) if len(ts) > 2 else fps
        if abs(rate - fps) > 0.01 * fps:
            problems.append(f"{e['data']}: episode {e['index']}: the timestamps run at {rate:.4g} per second but "
                            f"{info_path} says fps {fps:g}")
    if s["action_norm"] != "none" and s["action_key"] not in absent:
        try:
            load_stats(root, s["action_key"])
        except UserError as err:
            problems.append(f"{err} (action_norm={s['action_norm']!r}; with action_norm='none' none are needed)")


def check_lerobot(root, cameras=None, num_frames=13, fast=False, val_fraction=0.1, **settings):
    """Validate a LeRobot folder with training's settings (LEROBOT_SETTINGS unless given), printing the cameras and the
    clips per split; returns the problems. fast=True reads packet timestamps instead of decoding every frame."""
    s = {**LEROBOT_SETTINGS, **{k: v for k, v in settings.items() if v is not None}}
    root, info = Path(root), load_info(root)
    keys, source_fps = select_cameras(root, info, cameras), float(info["fps"])
    eps, problems = load_episodes(root, info, keys), []
    print(f"check {root} (LeRobot {info['codebase_version']}, {source_fps:g} fps, robot {info.get('robot_type')}): "
          f"{len(eps)} episodes, {sum(e['length'] for e in eps)} frames, {len(keys)} camera(s), "
          f"{'packet timestamps' if fast else 'decoding every frame'}")
    print("settings (as training: train.py's defaults unless given): " + ", ".join(f"{k}={v!r}" for k, v in s.items()))
    check_columns(root, info, eps, s, problems)
    print(f"{'camera':<34}{'codec':>8}{'fps':>6}{'size':>11}{'frames':>9}{'files':>7}")
    for key, metas, frames, files in _check_videos(root / "meta" / "info.json", eps, keys, source_fps, not fast, problems):
        codec, vfps, size = ("|".join(sorted({str(m[i]) if i < 2 else f"{m[2]}x{m[3]}" for m in metas})) for i in (0, 1, 2))
        print(f"{key:<34}{codec:>8}{vfps:>6}{size:>11}{frames:>9}{files:>7}")
    rate = min(float(s["fps"] or source_fps), source_fps)
    for split in ("train", "val"):
        chosen = set(split_episodes(root, info, [e["index"] for e in eps], split, val_fraction))
        clips = sum(int(clips_that_fit(e["rows"]["timestamp"].astype(np.float64), np.arange(e["length"]), num_frames,
                                       rate, source_fps).sum()) for e in eps if e["index"] in chosen and "rows" in e)
        print(f"{split:<6}{len(chosen):>6} episodes {clips:>8} clips of {num_frames} frames at {rate:g} fps")
    return report(problems, f"{len(eps)} episodes")


def report(problems, what, where=""):
    """The last lines of a check: every problem with its file, or OK. Returns the problems."""
    print(f"FAILED: {len(problems)} problem(s){where}:" if problems else f"OK: {what}, no problems found")
    for p in problems:
        print(f"  {p}")
    return problems


def bench_lerobot(root, split="train", cameras=None, size=(256, 320), num_frames=13, fps=None, workers=2,
                  batch_size=4, batches=20, **dataset_kw):
    """Clips/s of dataset[i] in one process (and frames decoded per clip, which shows what seeking saves) and
    through a DataLoader with `workers` processes. Returns the figures as a dict."""
    ds = LeRobotDataset(root, split, num_frames=num_frames, cameras=cameras, size=size, fps=fps, **dataset_kw)
    print(f"bench {ds}")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    threads, n, decoded = torch.get_num_threads(), 0, ds.decoded_frames
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    while n == 0 or (time.perf_counter() - t0 < 2.0 and n < batches * batch_size):
        ds[order[n % len(order)]]
        n += 1
    direct, per_clip = n / (time.perf_counter() - t0), (ds.decoded_frames - decoded) / n
    torch.set_num_threads(threads)
    print(f"dataset[i]  {direct:8.1f} clips/s  (1 process, 1 thread; {per_clip:.0f} frames decoded per clip for "
          f"{len(ds.cameras) * num_frames} delivered, {len(ds.cameras)} camera(s) x {num_frames})")
    windows = torch.randint(len(ds), (batches * batch_size,), generator=torch.Generator().manual_seed(0)).tolist()
    loader_cps = loader_rate(ds, windows, workers, batch_size)
    print(f"DataLoader  {loader_cps:8.1f} clips/s  ({workers} workers, batch {batch_size}, {batches - 1} batches timed)")
    return dict(dataset_clips_per_s=direct, decoded_frames_per_clip=per_clip, loader_clips_per_s=loader_cps)


# -----------------------------------------------------------------------------
# bench and encode

def raw_decode(ds, i, size=None):
    """bench's reference: window i of ds through video.decode_frames alone (seek, decode, RGB); size: also resize."""
    start = int(ds.window_start[i])
    indices = list(range(start, start + ds.num_frames * ds.frame_stride, ds.frame_stride))
    for path in ds.episodes[int(ds.window_episode[i])].videos:
        with open_video(path) as (container, stream):
            frames, _ = decode_frames(container, stream, indices, seek=True)
        for x in (frames or {}).values() if size is not None else ():
            resize_frames(torch.from_numpy(x).permute(2, 0, 1)[None], size)


def bench(root, split=None, cameras=(0,), size=(256, 320), num_frames=13, workers=2, batch_size=4, batches=20,
          frame_stride=1, cache=None):
    """Clips/s over the same random windows of raw decoding (native size, then resized) and dataset[i] in one process,
    of a DataLoader with `workers` processes and (cache) of the latent cache through it. Returns the figures."""
    split = split or ("train" if "train" in available_splits(root) else available_splits(root)[0])
    ds = RobotVideoDataset(root, split, num_frames=num_frames, cameras=cameras, size=size, frame_stride=frame_stride)
    if len(ds) == 0:
        raise UserError(root, f"split {split!r} has no clips of {num_frames} frames")
    n_clips = batches * batch_size
    order = torch.randint(len(ds), (n_clips,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"bench {ds}\n{n_clips} random windows; episodes of {min(e.num_frames for e in ds.episodes)}.."
          f"{max(e.num_frames for e in ds.episodes)} frames; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")

    def rate(fetch):  # clips/s of fetch(i) over the windows, in this process
        t0 = time.perf_counter()
        for i in order:
            fetch(i)
        return n_clips / (time.perf_counter() - t0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    figures = {"raw_decode_clips_per_s": rate(lambda i: raw_decode(ds, i)),
               "raw_resize_clips_per_s": rate(lambda i: raw_decode(ds, i, size)),
               "dataset_clips_per_s": rate(ds.__getitem__)}
    torch.set_num_threads(threads)
    raw, raw_resize, direct = figures.values()
    print(f"raw PyAV decode {raw:8.1f} clips/s  (1 process, seek + decode + RGB, native size, no resize)")
    print(f"  + resize      {raw_resize:8.1f} clips/s  (the same, each frame resized to {size[0]}x{size[1]})")
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
    return sum(1 for _ in it) * batch_size / max(time.perf_counter() - t0, 1e-9)  # the batches after the first


def encode_command(args, parser):
    """`data.py encode`: build the dataset and tokenizer, then encode_dataset (this rank's share under torchrun)."""
    factor = args.pixel_factor if args.tokenizer == "pixel" else vae.WanVAE.spatial_factor
    if (args.num_frames - 1) % 4 or args.num_frames < 1:
        parser.error(f"--num_frames must be 1 + 4k (5, 9, 13, ...) for the tokenizer, got {args.num_frames}")
    if args.size[0] % factor or args.size[1] % factor:
        parser.error(f"--size must be a multiple of {factor} for the {args.tokenizer} tokenizer, got {args.size}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    auto_bf16 = device.startswith("cuda") and args.tokenizer != "pixel"   # as train.py: the VAE in bf16 on CUDA
    dtype = torch.bfloat16 if args.dtype == "bf16" or args.dtype == "auto" and auto_bf16 else torch.float32
    kw = dict(spatial_factor=args.pixel_factor) if args.tokenizer == "pixel" else {}
    tok = vae.load_tokenizer(args.tokenizer, args.tokenizer_path, device=device, dtype=dtype, **kw)
    ds = RobotVideoDataset(args.root, args.split, num_frames=args.num_frames, cameras=args.cameras, size=args.size,
                           frame_stride=args.frame_stride, start_stride=args.start_stride)
    t0 = time.perf_counter()
    meta, encoded = encode_dataset(ds, tok, args.out, cache_settings(ds, tok, args.tokenizer), rank, world,
                                   args.batch_windows, workers=args.workers)
    if meta is None:
        print(f"rank {rank}: encoded {encoded} shard(s) in {time.perf_counter() - t0:.1f} s")
    elif encoded == 0:
        print(f"{args.out} is complete ({len(ds)} windows, {human_bytes(meta['bytes'])}): nothing to encode")
    else:
        print(f"wrote {args.out}: {len(ds)} windows, {human_bytes(meta['bytes'])} ({encoded} shard(s) encoded now), "
              f"in {time.perf_counter() - t0:.1f} s")
    return 0


# -----------------------------------------------------------------------------
# the command line

def _ints(text):
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def _cameras(text):
    """Indices, or for a LeRobot folder camera names: 0,1 or observation.images.top,wrist."""
    return tuple(int(x) if x.strip().isdigit() else x.strip() for x in text.split(",") if x.strip())


def _size(text):
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 256x320, got {text!r}") from None


def train_defaults():
    """train.py's defaults of the settings a LeRobot check needs to agree with training (read from its text)."""
    path = Path(__file__).with_name("train.py")
    c = configurator.script_defaults(str(path)) if path.is_file() else {}
    return {k: c.get(k, d) for k, d in dict(fps=4, action_key="action", state_key="observation.state",
                                            action_type="absolute", action_norm="mean_std").items()}


LEROBOT_SETTINGS = train_defaults()


def add(p, *names, **kw):
    """An option under its dashed and underscored spellings (--num-frames and --num_frames)."""
    spellings = [f"--{n}" for name in names for n in dict.fromkeys([name, name.replace("_", "-")])]
    p.add_argument(*spellings, **kw)


def parser():
    parser = argparse.ArgumentParser(prog="data.py", description="nanocosmos robot video data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate every annotation and video of a dataset; non-zero exit on problems")
    p.add_argument("root")
    add(p, "cameras", type=_cameras, default=None, help="e.g. 0,1,2,3 (LeRobot: names or indices): what training "
        "will use (default: every camera folder, every camera an IRASim episode lists, every LeRobot video feature)")
    add(p, "num_frames", type=int, default=13, help="clip length for the clip count")
    add(p, "split", type=lambda t: tuple(x for x in t.split(",") if x), default=None, help="e.g. train,val")
    add(p, "fast", action="store_true", help="trust container frame counts / packet timestamps instead of decoding")
    add(p, "workers", type=int, default=None, help="processes (default: all cores)")
    for key, value in LEROBOT_SETTINGS.items():
        add(p, key, type=type(value), default=None, help=f"LeRobot: as training (default {value!r}, train.py's)")
    p = sub.add_parser("bench", help="loader clips/s beside raw PyAV decode of the same windows")
    p.add_argument("root")
    add(p, "split", default=None, help="default: train if present, else the first split")
    add(p, "cameras", type=_cameras, default=None, help="default: 0 (LeRobot: every video feature)")
    add(p, "size", type=_size, default=(256, 320), help="HxW")
    for name, default in dict(num_frames=13, workers=2, batch_size=4, batches=20, frame_stride=1).items():
        add(p, name, type=int, default=default)
    add(p, "fps", type=float, default=None, help="LeRobot: the clip rate (default: the dataset's)")
    add(p, "action_key", default="action", help="LeRobot: the action column")
    add(p, "cache", default=None, help="a latent cache folder to time through the same loader")
    p = sub.add_parser("encode", help="write the latent cache: the tokenizer latents of every training window")
    p.add_argument("root")
    add(p, "out", required=True, help="cache folder (an interrupted encode resumes here)")
    add(p, "tokenizer", required=True, choices=["wan2.1", "pixel"])
    add(p, "tokenizer_path", default=None, help="tokenizer.pth (wan2.1)")
    add(p, "pixel_factor", type=int, default=8, help="pixel tokenizer pooling")
    add(p, "cameras", type=_ints, default=(0,))
    add(p, "size", type=_size, default=(256, 320), help="HxW")
    for name, default in dict(num_frames=13, frame_stride=1, start_stride=1).items():
        add(p, name, type=int, default=default)
    add(p, "split", default="train")
    add(p, "device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    add(p, "dtype", default="auto", choices=["auto", "fp32", "bf16"],
        help="tokenizer dtype; auto = as train.py: bf16 for wan2.1 on CUDA, else fp32")
    add(p, "batch_windows", type=int, default=8, help="windows per loader batch")
    add(p, "workers", type=int, default=2, help="decoding processes")
    return parser


def main(argv):
    """Returns the exit code; a known error is raised (UserError) for the one handler to print as one line."""
    args = (p := parser()).parse_args(argv)
    is_lerobot = (Path(args.root) / "meta" / "info.json").is_file()
    if args.command == "encode":
        return encode_command(args, p)
    if args.command == "check" and is_lerobot:
        settings = {k: getattr(args, k) for k in LEROBOT_SETTINGS}
        return 1 if check_lerobot(args.root, args.cameras, args.num_frames, args.fast, **settings) else 0
    if args.command == "check":
        if args.cameras is not None and not all(isinstance(k, int) for k in args.cameras):
            p.error(f"--cameras must be indices like 0,1 for {args.root} (camera names are for LeRobot folders)")
        return 1 if check_dataset(args.root, args.cameras, args.num_frames, args.fast, args.split, args.workers) else 0
    if is_lerobot:
        if args.frame_stride != 1:
            raise UserError(f"--frame_stride={args.frame_stride}", f"a LeRobot folder ({args.root}) takes its clip "
                                                                   f"rate from --fps (frames chosen by timestamp)")
        bench_lerobot(args.root, args.split or "train", args.cameras, args.size, args.num_frames, args.fps,
                      args.workers, args.batch_size, args.batches, action_key=args.action_key, action_norm="none")
    else:
        bench(args.root, args.split, args.cameras or (0,), args.size, args.num_frames, args.workers, args.batch_size,
              args.batches, args.frame_stride, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(configurator.exit_on_known_errors(main, sys.argv[1:]))
