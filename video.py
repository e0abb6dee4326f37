"""
Video I/O for nanocosmos, all on the CPU with PyAV: read frames by index (seeking to the keyframe before a window),
probe and count frames, the frame times and rate of a stream, resize, and the one mp4 writer. Also the few helpers
every dataset reader shares (progress lines, the loader worker init, the held-out hash), so that the readers
(data.py, lerobot.py) and the latent cache (cache.py) need no other project file.

Must not: know a dataset layout or an action convention (data.py, lerobot.py), import a project file other than
configurator (for UserError). Every error names the video: `UserError(path, problem)`.
"""

import math
import os
import sys
import time
import zlib
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
from av.video.reformatter import VideoReformatter
import numpy as np
import torch
import torch.nn.functional as F

from configurator import UserError

# -----------------------------------------------------------------------------
# helpers the readers share


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


def single_threaded_worker(_):
    """worker_init_fn of every loader: a worker decodes whole clips on its own, so intra-op threads would only
    oversubscribe the cores."""
    torch.set_num_threads(1)


def is_held_out(name, val_fraction):
    """Deterministic and stable: an episode's split depends only on its own name, so adding episodes moves none."""
    return zlib.crc32(name.encode()) % 1_000_000 < val_fraction * 1_000_000

# -----------------------------------------------------------------------------
# reading


@contextmanager
def open_video(path, doing="decode"):
    """(container, first video stream) of a file; a missing, unreadable or stream-less file is one UserError."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(path, "has no video stream")
            yield container, container.streams.video[0]
    except FileNotFoundError as e:
        raise UserError(path, "video file not found") from e
    except av.error.FFmpegError as e:
        raise UserError(path, f"cannot {doing} video ({e})") from e


def resize_frames(x_N_3_H_W, size):
    """uint8 frames -> uint8 frames of exactly `size` = (H, W): bilinear with antialias, no crop. torch's uint8
    kernel (what torchvision's resize does to a uint8 tensor), within 1 of the float path's rounding."""
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
    for seek in ([True, False] if min(indices) > 0 else [False]):
        with open_video(path) as (container, stream):
            frames, decoded = decode_frames(container, stream, indices, seek)
        # unsure where a seek landed, or an error to report with the exact frame count: decode from the start
        if frames is not None and max(indices) in frames:
            break
    if max(indices) not in frames:
        raise UserError(path, f"has only {decoded} decodable frames, frame {max(indices)} was asked for")
    rgb_N_H_W_3 = [frames[i] for i in indices]
    if size is None or tuple(rgb_N_H_W_3[0].shape[:2]) == tuple(size):
        return torch.from_numpy(np.stack(rgb_N_H_W_3)).permute(0, 3, 1, 2).contiguous()
    # resized frame by frame straight from the decoder's channels-last arrays: no native-size copy of the clip
    # (for 480x640 -> 256x320 that copy and transpose cost more than the resize itself)
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
    # which costs more than decoding it
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
    with open_video(path, "open") as (container, stream):
        n, h, w = stream.frames, stream.codec_context.height, stream.codec_context.width
        if n <= 0:  # some containers do not record a frame count: count packets instead (still no decode)
            n = sum(1 for p in container.demux(stream) if p.size > 0)
    if n <= 0 or h <= 0 or w <= 0:
        raise UserError(path, f"video has {n} frames of {h}x{w}")
    return n, h, w


def count_frames(path):
    """(decoded frame count, height, width): the slow, certain count that `check` uses."""
    n, h, w = 0, 0, 0
    with open_video(path) as (container, stream):
        for frame in container.decode(stream):
            n, h, w = n + 1, frame.height, frame.width
    if n == 0:
        raise UserError(path, "video has no decodable frames")
    return n, h, w


def frame_rate(path):
    """The stream's own frame rate (frames per second) from the container header, 0.0 when it records none."""
    with open_video(path, "open") as (_, stream):
        return float(stream.average_rate or stream.base_rate or 0)


def video_timeline(path, decode=True):
    """(sorted frame times in seconds, (codec, fps, height, width)): every frame decoded (certain) or, with
    decode=False, the packet timestamps (no decoding)."""
    with open_video(path) as (container, s):
        meta = (s.codec.canonical_name, float(s.average_rate or s.base_rate or 0), s.codec_context.height,
                s.codec_context.width)
        times = ([f.time for f in container.decode(s) if f.pts is not None] if decode else
                 [float(p.pts * p.time_base) for p in container.demux(s) if p.pts is not None and p.size])
    return np.sort(np.asarray(times, dtype=np.float64)), meta

# -----------------------------------------------------------------------------
# writing


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
