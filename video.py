"""
Owns video I/O with PyAV (frames by index, probing and counting, frame times and rate, resizing, the one mp4 writer)
and the helpers the readers and the latent cache share (progress lines, loader worker init, the held-out hash).
Must not: know a dataset layout or an action convention, import a project file but configurator. Errors name the video.
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
import numpy as np
import torch
import torch.nn.functional as F

from configurator import UserError


# -----------------------------------------------------------------------------
# helpers the readers share
def progress(iterable, total, desc, min_total=0):
    """A tqdm bar on a terminal, else one line per ~10% (logs stay short); nothing for under min_total items."""
    if total < min_total:
        yield from iterable
    elif sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr)
    else:
        t0, step = time.perf_counter(), max(1, math.ceil(total / 10))
        for i, x in enumerate(iterable, 1):
            yield x
            if i % step == 0 or i == total:
                print(f"{desc}: {i}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


def single_threaded_worker(_):
    """worker_init_fn of every loader: a worker decodes whole clips alone, so intra-op threads would oversubscribe."""
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
    """uint8 frames -> uint8 frames of exactly `size` = (H, W): torch's uint8 bilinear with antialias, no crop."""
    if size is None or tuple(x_N_3_H_W.shape[-2:]) == tuple(size):
        return x_N_3_H_W
    return F.interpolate(x_N_3_H_W, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


def read_frames(path, indices_or_count, size=None):
    """Frames `indices_or_count` (indices, or an int n for 0..n-1) of a video, uint8 [N,3,H,W]: seeks to the keyframe
    at or before the first (frame indices read back from timestamps, else decoded from frame 0), stops at the last."""
    if isinstance(indices_or_count, (int, np.integer)):
        indices_or_count = range(int(indices_or_count))
    indices = [int(i) for i in indices_or_count]
    if not indices or min(indices) < 0:
        raise ValueError(f"{path}: frame indices must be a non-empty list of non-negative ints, got {indices_or_count}")
    for seek in ([True, False] if min(indices) > 0 else [False]):
        with open_video(path) as (container, stream):
            frames, decoded = decode_frames(container, stream, indices, seek)
        if frames is not None and max(indices) in frames:
            break
    if max(indices) not in frames:
        raise UserError(path, f"has only {decoded} decodable frames, frame {max(indices)} was asked for")
    # straight from the decoder's channels-last arrays: no native-size copy of the clip
    return torch.cat([resize_frames(torch.from_numpy(frames[i]).permute(2, 0, 1)[None], size) for i in indices])


def decode_frames(container, stream, indices, seek):
    """({index: RGB [H,W,3]} of the wanted frames, index of the last frame decoded + 1), decoding from frame 0 or
    (seek=True) from the keyframe before the first; (None, 0) when a seek's landing cannot be told from timestamps."""
    wanted, first, last, frames = set(indices), min(indices), max(indices), {}
    rate, tb, start = stream.average_rate, stream.time_base, stream.start_time or 0
    seek = seek and rate is not None and tb is not None and rate > 0
    if seek:  # a constant-rate stream: frame i is shown at start + i / rate
        container.seek(start + int(first / (rate * tb)), stream=stream, backward=True, any_frame=False)
    rgb, index = av.video.reformatter.VideoReformatter(), -1  # to_ndarray would make a swscale context per frame
    for frame in container.decode(stream):
        if seek and frame.pts is None:
            return None, 0
        exact = float((frame.pts - start) * tb * rate) if seek else index + 1
        if abs(exact - round(exact)) > 0.01 or (seek and index == -1 and round(exact) > first):
            return None, 0  # a variable rate, or the seek overshot: not safe
        index = round(exact)
        if index in wanted:
            frames[index] = rgb.reformat(frame, format="rgb24").to_ndarray()
        if index >= last:
            break
    return frames, index + 1


def probe_video(path):
    """(frame count, height, width) from the container header (else by counting packets), without decoding."""
    with open_video(path, "open") as (container, stream):
        h, w = stream.codec_context.height, stream.codec_context.width
        n = stream.frames if stream.frames > 0 else sum(1 for p in container.demux(stream) if p.size > 0)
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
    """(sorted frame times in s, (codec, fps, height, width)): of every decoded frame, or (decode=False) packet."""
    with open_video(path) as (container, s):
        meta = (s.codec.canonical_name, float(s.average_rate or s.base_rate or 0), s.codec_context.height,
                s.codec_context.width)
        times = ([f.time for f in container.decode(s) if f.pts is not None] if decode else
                 [float(p.pts * p.time_base) for p in container.demux(s) if p.pts is not None and p.size])
    return np.sort(np.asarray(times, dtype=np.float64)), meta


# -----------------------------------------------------------------------------
# writing
def write_mp4(path, frames, fps=4, codec="libx264", crf=18, preset="medium", keyframe_interval=12, threads=0):
    """The one mp4 writer: uint8 [T,H,W,3] (numpy or tensor, H, W even) as libx264 at `crf` (18 = visually lossless)
    or else mpeg4, a keyframe every `keyframe_interval` frames; threads 0 = ffmpeg's choice, 1 = byte-identical
    files. Written to a temporary name, then renamed."""
    frames = np.asarray(frames.detach().cpu() if isinstance(frames, torch.Tensor) else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"{path}: write_mp4 wants uint8 [T,H,W,3] frames, got {frames.dtype} {list(frames.shape)}")
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"{path}: frame size {H}x{W} must be even for yuv420p")
    codec = codec if codec in av.codecs_available else "mpeg4"
    path, tmp = Path(path), Path(f"{path}.tmp.mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
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
