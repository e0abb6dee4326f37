"""
Owns the latent cache: the tokenizer's latents of every training window, encoded once (exact: the encoder mean is
deterministic, nothing is augmented). CACHE/shard_NNNNN.safetensors ("latent" [n,V,C,t,h,w], "cond.<key>" such as
[n,T-1,A], "window" [n]; keys and settings hash in the header), then CACHE/metadata.json, last: other settings are
refused naming the field. Must not: import data.py or a script (data.py imports this file); it takes any dataset.
"""

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

import vae
from configurator import UserError
from video import progress, single_threaded_worker

FORMAT = "nanocosmos latent cache 2"


def cache_settings(ds, tok, tokenizer_name):
    """Everything a cached latent depends on, as a JSON-able dict: the sha256 of the tokenizer's weights and buffers,
    each dataset file's [relative path, size, sha256 (annotations) or mtime in ns (videos: hashing costs a decode)]."""
    h = hashlib.sha256()
    for name, t in sorted({**dict(tok.named_parameters()), **dict(tok.named_buffers())}.items()):
        t = t.detach().cpu().contiguous()  # (bytes, so bf16 hashes too)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    paths = sorted({p for ep in ds.episodes for p in [ep.annotation, *ep.videos]})
    files = [[str(p.relative_to(ds.root)), p.stat().st_size,
              hashlib.sha256(p.read_bytes()).hexdigest() if p.suffix == ".json" else p.stat().st_mtime_ns]
             for p in paths]
    # the dtype before the weights' hash: a bf16 cache read by an fp32 run is reported as a dtype difference
    pixel = isinstance(tok, vae.PixelTokenizer)
    return dict(tokenizer=tokenizer_name, tokenizer_dtype=str(vae.tokenizer_dtype(tok)).replace("torch.", ""),
                tokenizer_sha256=h.hexdigest(), pixel_factor=tok.spatial_factor if pixel else None,
                pixel_scale=float(tok.scale) if pixel else None, cameras=list(ds.cameras), size=list(ds.size),
                num_frames=ds.num_frames, frame_stride=ds.frame_stride, start_stride=ds.start_stride, split=ds.split,
                action_scale=ds.action_scale, gripper_scale=ds.gripper_scale, val_fraction=ds.val_fraction,
                windows=len(ds), files=files)


def human_bytes(n):
    unit = next(u for u in range(4) if n < 1024 ** (u + 1) or u == 3)
    return f"{n / 1024 ** unit:.1f} {['bytes', 'KiB', 'MiB', 'GiB'][unit]}"


def shard_path(out, j):
    return Path(out) / f"shard_{j:05d}.safetensors"


def shard_header(path, digest, n):
    """The safetensors header of a whole shard (its size what the header says) of settings `digest` and n windows."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                raise UserError(path, f"truncated or not a cache shard ({size} bytes): delete it and run the same "
                                      f"encode again to write it anew")
            header = json.loads(f.read(length))
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    except FileNotFoundError as e:
        raise UserError(path, "cache shard not found (deleted?): run the same encode again to write it") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(path, f"not a cache shard (unreadable header: {e})") from e
    if size != 8 + length + end:
        raise UserError(path, f"truncated cache shard: {size} bytes, its header says {8 + length + end}: run the "
                              f"same encode again to write it anew")
    if (header.get("__metadata__") or {}).get("settings") != digest:
        raise UserError(path, "a shard of other settings than this cache's")
    if header.get("window", {}).get("shape", [None])[0] != n:
        raise UserError(path, f"holds {header.get('window', {}).get('shape')} windows, the cache metadata says {n}")
    return header


def write_atomic(path, data, tmp_suffix=".tmp"):
    """bytes -> path through a temporary name. Disk full is one UserError; the partial file is removed."""
    tmp = path.with_name(path.name + tmp_suffix)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise UserError(path, f"no space left on device writing it ({e.strerror}); the shards written before "
                                  f"it are kept: free some space and run the same command again to resume") from e
        raise


def encode_dataset(ds, tok, out, settings, rank=0, world=1, batch_windows=8, max_batch=None, workers=0,
                   shard_bytes=256 << 20, log=print):
    """Write the latents of every window of `ds` to the folder `out` (settings: cache_settings(ds, tok, name)); under
    torchrun rank r encodes the shards j % world == r and whoever finishes the last writes metadata.json (barrier
    before reading). Whole shards of the same settings are kept, others redone; another finished cache is an error
    naming the field. Returns (metadata once the cache is complete else None, shards this call encoded)."""
    out, digest = Path(out), hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if (out / "metadata.json").exists():
        read_metadata(out, expect=settings)  # raises, naming the field, if it is another cache
    latent_shape = [len(ds.cameras), tok.latent_channels, vae.latent_frames(ds.num_frames, tok.temporal_factor),
                    ds.size[0] // tok.spatial_factor, ds.size[1] // tok.spatial_factor]
    dtype, N = vae.tokenizer_dtype(tok), len(ds)

    def done(j, r, say=lambda _: None):   # shard j finished and whole? a damaged one is said and encoded again
        try:
            return shard_path(out, j).exists() and bool(shard_header(shard_path(out, j), digest, len(r)))
        except UserError as e:
            say(f"{e}; encoding it again")
            return False

    per_window = int(np.prod(latent_shape)) * dtype.itemsize + (ds.num_frames - 1) * ds.action_dim * 4 + 8
    per_shard = max(1, min(N, shard_bytes // per_window))
    shards = [(j, range(a, min(a + per_shard, N))) for j, a in enumerate(range(0, N, per_shard))]
    if rank == 0:
        log(f"latent cache {out}: {N} windows x {human_bytes(per_window)} = {human_bytes(N * per_window)} in "
            f"{len(shards)} shard(s) (latent {latent_shape} {str(dtype)[6:]}, start_stride {ds.start_stride})")
    out.mkdir(parents=True, exist_ok=True)
    mine = [(j, r) for j, r in shards if j % world == rank and not done(j, r, log)]
    for j, windows in progress(mine, len(mine), f"encode rank {rank}" if world > 1 else "encode"):
        encode_shard(ds, tok, shard_path(out, j), windows, digest, batch_windows, max_batch, workers)
    if not all(done(j, r) for j, r in shards):
        return None, len(mine)  # another rank's shards are still being written; it writes the metadata
    if not mine and (out / "metadata.json").exists():
        return read_metadata(out), 0
    meta = dict(format=FORMAT, settings=settings, settings_sha=digest, latent_shape=latent_shape,
                latent_dtype=str(dtype)[6:], cond_shapes={"action": [ds.num_frames - 1, ds.action_dim]},
                shards=[[shard_path(out, j).name, len(r)] for j, r in shards], bytes=N * per_window)
    write_atomic(out / "metadata.json", json.dumps(meta, indent=1).encode(), f".tmp{rank}")  # last: never read early
    return meta, len(mine)


def encode_shard(ds, tok, path, windows, digest, batch_windows, max_batch, workers):
    """Encode some windows into one shard file, through a temporary name (never read half-written)."""
    device = next(iter([*tok.parameters(), *tok.buffers()])).device
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, list(windows)), batch_size=batch_windows,
                                         num_workers=workers, worker_init_fn=single_threaded_worker)
    latents, cond, keys = [], {}, []
    for batch in loader:
        video_B_V_3_T_H_W = batch["video"].to(device)
        lat = vae.encode_batched(tok, video_B_V_3_T_H_W.flatten(0, 1), max_batch)
        latents.append(lat.unflatten(0, video_B_V_3_T_H_W.shape[:2]).cpu())
        for k, v in batch["cond"].items():
            cond.setdefault(f"cond.{k}", []).append(v)
        keys += batch["key"]
    tensors = dict(latent=torch.cat(latents).contiguous(), window=torch.tensor(list(windows), dtype=torch.int64),
                   **{k: torch.cat(v).contiguous() for k, v in cond.items()})
    write_atomic(path, safetensors_bytes(tensors, metadata=dict(settings=digest, keys=json.dumps(keys))))


def describe_difference(key, have, want):
    """'<field> is A but this run has B' (shortened); for the file list, the first file that differs and how."""
    def short(x, limit=80):
        text = repr(x)
        return text if len(text) <= limit else text[:limit - 5] + " ...]"
    if key == "files" and isinstance(have, list) and isinstance(want, list):
        have_d, want_d = ({f[0]: list(f[1:]) for f in x if isinstance(f, list) and f} for x in (have, want))
        name = sorted(k for k in have_d.keys() | want_d.keys() if have_d.get(k) != want_d.get(k))[0]
        if name not in want_d or name not in have_d:
            return f"files differ from the dataset's: {name} is {'no longer' if name not in want_d else 'not'} in " \
                   f"the {'dataset' if name not in want_d else 'cache'}"
        (n0, *m0), (n1, *m1) = have_d[name], want_d[name]
        how = (f"{n0} bytes in the cache, {n1} now" if n0 != n1 else
               "its content changed" if name.endswith(".json") else "modified since the encode (mtime)")
        return f"files differ from the dataset's: {name} changed since the encode ({how})"
    return f"{key} is {short(have)} but this run has {short(want)}"


def read_metadata(cache_dir, expect=None):
    """metadata.json of a finished cache; every field of expect (the run's cache_settings) must match it."""
    cache_dir, path = Path(cache_dir), Path(cache_dir) / "metadata.json"
    if not path.exists():
        raise UserError(path, "not found: not a finished latent cache (an interrupted encode? run it again to "
                              "resume)" if cache_dir.is_dir() else "latent cache folder not found")
    try:
        meta = json.loads(path.read_text())
        settings, _ = meta["settings"], meta["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(path, f"not a latent cache metadata file ({e})") from e
    if meta.get("format") != FORMAT:
        raise UserError(path, f"a cache of another format ({meta.get('format')!r}, this is {FORMAT!r}): encode it "
                              f"again (a new --out, or delete {cache_dir})")
    for key, want in (expect or {}).items():
        have = settings.get(key, "(absent)")
        if have != want:
            raise UserError(path, f"cache {describe_difference(key, have, want)}; encode another cache "
                                  f"(a new --out) or delete {cache_dir}")
    return meta


class LatentCacheDataset(torch.utils.data.Dataset):
    """A finished cache's windows in their dataset's order: items {"latent": [V,C,t,h,w], "cond": {"action": [T-1,A]},
    "key": "<episode>/<start>"}, data.make_dataset's window arrays; shards checked, then opened lazily per worker."""

    def __init__(self, cache_dir, expect=None):
        self.dir, self.meta = Path(cache_dir), read_metadata(cache_dir, expect)
        self.keys, self.cond_keys = [], None
        for name, n in self.meta["shards"]:
            header = shard_header(self.dir / name, self.meta["settings_sha"], n)
            self.keys += json.loads(header["__metadata__"]["keys"])
            self.cond_keys = sorted(k[5:] for k in header if k.startswith("cond."))
        self.offsets = np.cumsum([0] + [n for _, n in self.meta["shards"]])
        self.num_frames, self.cameras = self.meta["settings"]["num_frames"], tuple(self.meta["settings"]["cameras"])
        self.action_dim = self.meta["cond_shapes"]["action"][1]
        names = [k.rpartition("/")[0] for k in self.keys]
        index = {name: e for e, name in enumerate(dict.fromkeys(names))}   # episodes in first-seen order
        self.episode_names, self.window_episode = list(index), np.array([index[n] for n in names], dtype=np.int64)
        self.window_start = np.array([int(k.rpartition("/")[2]) for k in self.keys], dtype=np.int64)
        self._open = {}

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
            path = self.dir / self.meta["shards"][j][0]
            shard_header(path, self.meta["settings_sha"], self.meta["shards"][j][1])  # deleted or cut since?
            self._open[j] = safe_open(str(path), "pt")
        return self._open[j]

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        i = i % len(self)
        j = int(np.searchsorted(self.offsets, i, side="right")) - 1
        f, r = self.shard(j), i - int(self.offsets[j])
        return {"latent": f.get_slice("latent")[r], "cond": {k: f.get_slice(f"cond.{k}")[r] for k in self.cond_keys},
                "key": self.keys[i]}


def build(ds, tok, c, rank=0, world=1, say=print, barrier=None):
    """The training windows of ds as cached latents (c: latent_cache, tokenizer, num_workers), encoded if missing."""
    settings = cache_settings(ds, tok, c["tokenizer"])
    encode_dataset(ds, tok, c["latent_cache"], settings, rank, world, workers=max(0, c.get("num_workers", 0)), log=say)
    if barrier:
        barrier()
    cache = LatentCacheDataset(c["latent_cache"], expect=settings)
    say(f"training on {cache!r}")
    return cache
