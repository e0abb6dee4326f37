"""The latent cache (cache.encode_dataset, cache.LatentCacheDataset): what is read back equals online encoding of the
same windows, a cache of other settings is refused naming the field, an interrupted encode resumes and is never
read half-written, and ranks that share the work give the same cache as one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import cache
import data
from configurator import UserError
import vae
from synth import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
H, W, T = 16, 24, 20
CAMERAS = (0, 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache") / "syn"
    make_synthetic(str(root), episodes=4, cameras=2, frames=T, size=(H, W), seed=0, val_episodes=1, workers=1)
    return root


def dataset(root, **kw):
    kw = dict(num_frames=9, cameras=CAMERAS, size=(H, W), start_stride=3) | kw
    return data.RobotVideoDataset(root, "train", **kw)


def small_wan(seed):
    """The Wan2.1 architecture at a small width with random weights: the same code path as the real tokenizer."""
    torch.manual_seed(seed)
    return vae.WanVAE(dim=8).eval().requires_grad_(False)


def online(tok, video_V_3_T_H_W):
    """What the training step does without a cache (train.encode_views): uint8 -> dtype, x / 127.5 - 1, encode."""
    return tok.encode(video_V_3_T_H_W.to(vae.tokenizer_dtype(tok)).div(127.5).sub(1.0))


def encode(ds, tok, out, name="pixel", **kw):
    """(metadata or None, settings)"""
    settings = cache.cache_settings(ds, tok, name)
    return cache.encode_dataset(ds, tok, out, settings, log=lambda *a: None, **kw)[0], settings


@pytest.mark.parametrize("name", ["pixel", "wan2.1"])
def test_cache_equals_online_encoding(world, tmp_path, name):
    ds = dataset(world)
    tok = vae.load_tokenizer("pixel") if name == "pixel" else small_wan(0)
    meta, settings = encode(ds, tok, tmp_path / "c", name, batch_windows=3, shard_bytes=4000)
    assert meta is not None and len(meta["shards"]) > 1  # several shards, so offsets are exercised
    lc = cache.LatentCacheDataset(tmp_path / "c", expect=settings)
    assert len(lc) == len(ds) and lc.cameras == CAMERAS and lc.action_dim == ds.action_dim == 7
    assert (lc.window_episode == ds.window_episode).all() and (lc.window_start == ds.window_start).all()
    assert lc.episode_names == ds.episode_names
    for i in range(len(ds)):
        item, cached = ds[i], lc[i]
        ref = online(tok, item["video"])
        assert cached["key"] == item["key"] and torch.equal(cached["cond"]["action"], item["cond"]["action"])
        assert cached["latent"].dtype == ref.dtype and cached["latent"].shape == ref.shape
        if name == "pixel":  # the pooling is elementwise per clip: bit-exact
            assert torch.equal(cached["latent"], ref)
        else:  # convolutions over a batch of 6 clips vs 2: equal to float rounding
            torch.testing.assert_close(cached["latent"], ref, rtol=1e-5, atol=1e-5)
    batch = next(iter(torch.utils.data.DataLoader(lc, batch_size=4, num_workers=1)))  # pickles, opens in workers
    assert batch["latent"].shape == (4, *meta["latent_shape"]) and len(batch["key"]) == 4


def test_settings_mismatch_names_the_field(world, tmp_path):
    ds, tok = dataset(world), vae.load_tokenizer("pixel")
    _, settings = encode(ds, tok, tmp_path / "c")
    meta = tmp_path / "c" / "metadata.json"
    for change, field in [(dict(cameras=(0,)), "cameras"), (dict(size=(8, 16)), "size"),
                          (dict(start_stride=1), "start_stride"), (dict(num_frames=5), "num_frames")]:
        other = cache.cache_settings(dataset(world, **change), tok, "pixel")
        with pytest.raises(UserError, match=f"{meta}: cache {field} is .* but this run has"):
            cache.LatentCacheDataset(tmp_path / "c", expect=other)
    with pytest.raises(UserError, match="tokenizer_sha256"):  # other weights, same architecture
        cache.LatentCacheDataset(tmp_path / "c", expect=cache.cache_settings(ds, vae.load_tokenizer("pixel", scale=3.0),
                                                                          "pixel"))
    with pytest.raises(UserError, match="cache tokenizer is 'pixel' but this run has 'wan2.1'"):
        cache.LatentCacheDataset(tmp_path / "c", expect=cache.cache_settings(ds, small_wan(0), "wan2.1"))
    video = world / "videos" / "cam1" / "ep00001.mp4"  # a dataset file that changed since the encode
    bigger = dict(settings, files=[[f, n + (f.endswith("cam1/ep00001.mp4")), m] for f, n, m in settings["files"]])
    with pytest.raises(UserError, match=f"files .*{video.relative_to(world)} changed since the encode \\(.* bytes"):
        cache.LatentCacheDataset(tmp_path / "c", expect=bigger)
    with pytest.raises(UserError, match="cameras"):  # encoding into a finished cache of other settings
        encode(dataset(world, cameras=(1,)), tok, tmp_path / "c")


def test_a_long_field_difference_is_one_short_line(world, tmp_path):
    """A field holding thousands of values (the file list of a cache that has none) is shown cut short, one line."""
    ds, tok = dataset(world), vae.load_tokenizer("pixel")
    _, settings = encode(ds, tok, tmp_path / "c")
    path = tmp_path / "c" / "metadata.json"
    meta = json.loads(path.read_text())
    del meta["settings"]["files"]
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"cache files is '\(absent\)' but this run has \[\['annotations/") as e:
        cache.LatentCacheDataset(tmp_path / "c", expect=dict(settings, files=settings["files"] * 100))
    assert len(str(e.value)) < 300 + 2 * len(str(tmp_path)) and "\n" not in str(e.value)


def test_interrupted_encode_resumes(world, tmp_path, monkeypatch):
    ds, tok = dataset(world), small_wan(1)
    clean, settings = encode(ds, tok, tmp_path / "clean", "wan2.1", shard_bytes=4000)
    real, calls = cache.encode_shard, []

    def dies_after_one(ds, tok, path, *a):
        calls.append(path.name)
        if len(calls) == 2:  # killed while writing the second shard: a half-written .tmp is left behind
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(ds, tok, path, *a)

    monkeypatch.setattr(cache, "encode_shard", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        encode(ds, tok, tmp_path / "c", "wan2.1", shard_bytes=4000)
    assert not (tmp_path / "c" / "metadata.json").exists()
    with pytest.raises(UserError, match="not a finished latent cache"):
        cache.LatentCacheDataset(tmp_path / "c", expect=settings)
    calls.clear()
    monkeypatch.setattr(cache, "encode_shard", lambda *a: (calls.append(a[2].name), real(*a)))
    meta, _ = encode(ds, tok, tmp_path / "c", "wan2.1", shard_bytes=4000)
    assert "shard_00000.safetensors" not in calls and len(calls) == len(meta["shards"]) - 1  # the first one was kept
    assert meta == clean
    a, b = cache.LatentCacheDataset(tmp_path / "c", settings), cache.LatentCacheDataset(tmp_path / "clean", settings)
    for i in range(len(a)):
        assert torch.equal(a[i]["latent"], b[i]["latent"]) and a[i]["key"] == b[i]["key"]


def test_ranks_share_the_work(world, tmp_path):
    """Two ranks (called in turn here; under torchrun they run at once) write disjoint shards, and only the one that
    completes the set writes the metadata; the cache equals a one-process encode."""
    ds, tok = dataset(world), vae.load_tokenizer("pixel")
    one, settings = encode(ds, tok, tmp_path / "one", shard_bytes=4000)
    assert encode(ds, tok, tmp_path / "two", rank=1, world=2, shard_bytes=4000)[0] is None
    assert not (tmp_path / "two" / "metadata.json").exists()
    assert encode(ds, tok, tmp_path / "two", rank=0, world=2, shard_bytes=4000)[0] == one
    a, b = cache.LatentCacheDataset(tmp_path / "one", settings), cache.LatentCacheDataset(tmp_path / "two", settings)
    assert all(torch.equal(a[i]["latent"], b[i]["latent"]) for i in range(len(a)))


def test_encode_command_and_one_line_errors(world, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, str(ROOT / "data.py"), *map(str, args)], cwd=tmp_path,
                                       capture_output=True, text=True, timeout=300)
    common = ["--tokenizer", "pixel", "--num_frames", "9", "--size", f"{H}x{W}", "--workers", "0"]
    p = run("encode", world, "--out", tmp_path / "c", "--cameras", "0,1", "--start_stride", "3", *common)
    assert p.returncode == 0, p.stderr
    assert "latent cache" in p.stdout and " windows x " in p.stdout and "wrote" in p.stdout
    meta = json.loads((tmp_path / "c" / "metadata.json").read_text())
    assert meta["settings"]["cameras"] == [0, 1] and meta["settings"]["pixel_factor"] == 8
    assert len(cache.LatentCacheDataset(tmp_path / "c")) == len(dataset(world))
    p = run("encode", world, "--out", tmp_path / "c", "--cameras", "0", "--start_stride", "3", *common)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"error: {tmp_path / 'c' / 'metadata.json'}: cache cameras is [0, 1] but this run "
                                f"has [0]; encode another cache (a new --out) or delete {tmp_path / 'c'}")


def run_data_py(*args, cwd, limit_bytes=None):
    """`python data.py ...`; limit_bytes: a file-size limit (RLIMIT_FSIZE) in the child, i.e. a disk that is full."""
    import resource
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))) if limit_bytes else None
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})


ENCODE = ["--tokenizer", "pixel", "--num_frames", "9", "--size", f"{H}x{W}", "--workers", "0", "--cameras", "0,1",
          "--start_stride", "3"]


def test_stale_cache_is_refused_naming_the_file(world, tmp_path):
    """An annotation edited in place (same size, new numbers) or a video rewritten since the encode: the cache is
    refused with the file named, not silently trained from."""
    import shutil
    root = tmp_path / "syn"
    shutil.copytree(world, root)
    tok = vae.load_tokenizer("pixel")
    encode(dataset(root), tok, tmp_path / "c")
    ann = root / "annotations" / "train" / "ep00001.json"
    text = ann.read_text()
    i = next(i for i, ch in enumerate(text) if ch.isdigit() and ch != "9")
    ann.write_text(text[:i] + str(int(text[i]) + 1) + text[i + 1:])   # one digit: the same byte size
    assert len(ann.read_text()) == len(text)
    with pytest.raises(UserError, match=f"files differ .*{ann.relative_to(root)} changed since the encode "
                                        r"\(its content changed\)"):
        cache.LatentCacheDataset(tmp_path / "c", expect=cache.cache_settings(dataset(root), tok, "pixel"))
    ann.write_text(text)
    video = root / "videos" / "cam0" / "ep00000.mp4"
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))
    with pytest.raises(UserError, match=f"{video.relative_to(root)} changed since the encode \\(modified"):
        cache.LatentCacheDataset(tmp_path / "c", expect=cache.cache_settings(dataset(root), tok, "pixel"))


def test_truncated_or_deleted_shard_is_named(world, tmp_path):
    """A truncated shard: opening the cache, `data.py bench --cache` and training name it in one line; `data.py
    encode` encodes it again (and says so) instead of reporting a finished cache. A shard deleted after the cache
    was opened is a UserError naming it inside a DataLoader worker."""
    ds, tok = dataset(world), vae.load_tokenizer("pixel")
    clean, settings = encode(ds, tok, tmp_path / "clean", shard_bytes=4000)
    p = run_data_py("encode", world, "--out", tmp_path / "c", *ENCODE, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    shard = cache.shard_path(tmp_path / "c", 0)
    full = shard.read_bytes()
    shard.write_bytes(full[:len(full) // 2])
    with pytest.raises(UserError, match=f"{shard}: truncated cache shard: {len(full) // 2} bytes, its header says "
                                        f"{len(full)}"):
        cache.LatentCacheDataset(tmp_path / "c")
    p = run_data_py("bench", world, "--cameras", "0,1", "--size", f"{H}x{W}", "--num-frames", "9", "--workers", "0",
                    "--batches", "2", "--cache", tmp_path / "c", cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {shard}: truncated cache shard")
    shard.write_bytes(full[:5])
    assert "truncated or not a cache shard" in str(pytest.raises(UserError, cache.LatentCacheDataset, tmp_path / "c").value)
    p = run_data_py("encode", world, "--out", tmp_path / "c", *ENCODE, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"{shard}: truncated or not a cache shard" in p.stdout and "encoding it again" in p.stdout
    assert "(1 shard(s) encoded now)" in p.stdout
    (tmp_path / "whole").write_bytes(full)
    again, whole = (safetensors.torch.load_file(f) for f in (shard, tmp_path / "whole"))
    assert again.keys() == whole.keys() and all(torch.equal(again[k], whole[k]) for k in whole)
    p = run_data_py("encode", world, "--out", tmp_path / "c", *ENCODE, cwd=tmp_path)
    assert p.returncode == 0 and "nothing to encode" in p.stdout and "wrote" not in p.stdout
    lc = cache.LatentCacheDataset(tmp_path / "c")
    shard.unlink()
    with pytest.raises(Exception, match=f"UserError: {shard}: cache shard not found") as e:
        next(iter(torch.utils.data.DataLoader(lc, batch_size=2, num_workers=1)))
    assert "DataLoader worker" in str(e.value)
    import configurator                 # what every command's handler prints of it: one line, not the worker's text
    assert configurator.known_error(e.value) == f"{shard}: cache shard not found (deleted?): run the same encode " \
                                                "again to write it"


def test_disk_full_during_encode_is_one_line(world, tmp_path):
    """A file-size limit in the child (what a full disk looks like to the writer): one line naming the shard, no
    partial file left, and the same command without the limit resumes to a whole cache."""
    p = run_data_py("encode", world, "--out", tmp_path / "c", *ENCODE, cwd=tmp_path, limit_bytes=2000)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    shard = cache.shard_path(tmp_path / "c", 0)
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {shard}: no space left on device writing it")
    assert not list((tmp_path / "c").glob("*.tmp*")) and not shard.exists()
    p = run_data_py("encode", world, "--out", tmp_path / "c", *ENCODE, cwd=tmp_path)
    assert p.returncode == 0 and "wrote" in p.stdout, p.stderr
    assert len(cache.LatentCacheDataset(tmp_path / "c")) == len(dataset(world))


def test_make_dataset_builds_and_reads_the_cache(world, tmp_path):
    """data.make_dataset with latent_cache: the train split is the cache (built on first use, read after), other
    splits read video; a settings change names the field."""
    c = dict(train_config(), data_root=str(world), latent_cache=str(tmp_path / "c"), cameras=CAMERAS, num_frames=9,
             frame_size=(H, W), start_stride=3, tokenizer="pixel", num_workers=0)
    tok, said = vae.load_tokenizer("pixel"), []
    train = data.make_dataset(c, "train", tok, say=said.append)
    assert isinstance(train, cache.LatentCacheDataset) and len(train) == len(dataset(world))
    assert any(line.startswith("latent cache") for line in said) and said[-1].startswith("training on LatentCache")
    val = data.make_dataset(c, "val", say=said.append)
    assert isinstance(val, data.RobotVideoDataset) and val.start_stride == 8
    assert len(data.make_dataset(c, "train", tok, say=said.append)) == len(train)     # read, not built again
    with pytest.raises(UserError, match="cache start_stride is 3 but this run has 1"):
        data.make_dataset(dict(c, start_stride=1), "train", tok, say=said.append)


def train_config():
    import configurator
    return configurator.script_defaults(str(ROOT / "train.py"))


# -----------------------------------------------------------------------------
# train.py --latent_cache: the same run as online encoding, resumable, and one-line errors

def train_main(args):
    import train
    return train.main(args)


@pytest.fixture(scope="module")
def train_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_train") / "syn"
    make_synthetic(str(root), episodes=5, cameras=2, frames=17, size=(16, 32), seed=0, val_episodes=1, workers=1)
    return root


def run_args(root, out, tokenizer, *extra):
    """A very small DiT on 2 cameras x 5 frames of 16x32; wan2.1 with an empty tokenizer_path is the full Wan2.1
    architecture with random weights (seeded by the run's seed, so every run has the same tokenizer)."""
    return [f"--data_root={root}", f"--out_dir={out}", f"--tokenizer={tokenizer}", "--synth_if_missing=False",
            "--model_size=tiny", "--model_channels=32", "--num_blocks=2", "--num_heads=2", "--num_frames=5",
            "--frame_size=(16, 32)", "--start_stride=4", "--batch_size=2", "--num_workers=0", "--log_interval=1",
            "--eval_interval=4", "--eval_batches=1", "--warmup_iters=1", "--lr_decay_iters=4", "--save_interval=2",
            "--save_consolidated=False", *extra]


def losses(out):
    log = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    return {r["step"]: r["loss"] for r in log if "loss" in r}, [r["val_loss"] for r in log if "val_loss" in r]


@pytest.mark.parametrize("tokenizer", ["pixel", "wan2.1"])
def test_training_from_the_cache_equals_online_encoding_and_resumes(train_world, tmp_path, tokenizer):
    cache = tmp_path / "cache"
    train_main(run_args(train_world, tmp_path / "online", tokenizer, "--max_iters=4"))
    train_main(run_args(train_world, tmp_path / "cached", tokenizer, "--max_iters=4", f"--latent_cache={cache}"))
    assert (cache / "metadata.json").exists()
    (online, val_online), (cached, val_cached) = losses(tmp_path / "online"), losses(tmp_path / "cached")
    assert sorted(cached) == [1, 2, 3, 4] and len(val_cached) == 1   # validation reads video in both runs
    # pixel: the cache holds the very latents of online encoding; wan2.1: convolutions batched differently
    tol = dict(rtol=0, atol=0) if tokenizer == "pixel" else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor([cached[s] for s in range(1, 5)]),
                               torch.tensor([online[s] for s in range(1, 5)]), **tol)
    torch.testing.assert_close(torch.tensor(val_cached), torch.tensor(val_online), **tol)
    # stopped at step 2 and resumed from the cache (now read, not built): the same steps 3 and 4
    resumed = tmp_path / "resumed"
    train_main(run_args(train_world, resumed, tokenizer, "--max_iters=2", f"--latent_cache={cache}"))
    train_main(run_args(train_world, resumed, tokenizer, "--max_iters=4", f"--latent_cache={cache}"))
    again, _ = losses(resumed)
    assert [again[s] for s in (3, 4)] == [cached[s] for s in (3, 4)]


def test_train_with_a_cache_of_other_settings_is_one_line(train_world, tmp_path):
    cache = tmp_path / "cache"
    train_main(run_args(train_world, tmp_path / "a", "pixel", "--max_iters=1", f"--latent_cache={cache}"))
    p = subprocess.run([sys.executable, str(ROOT / "train.py"),
                        *run_args(train_world, tmp_path / "b", "pixel", "--max_iters=1", f"--latent_cache={cache}",
                                  "--start_stride=2")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip() == (f"error: {cache / 'metadata.json'}: cache start_stride is 4 but this run has 2; "
                                f"encode another cache (a new --out) or delete {cache}")


def test_two_processes_build_the_cache_and_train_like_one(train_world, tmp_path):
    """torchrun, 2 processes (gloo): every rank takes its share of the encode, waits at the barrier, then reads the
    cache; the losses equal one process reading its own cache with the same global batch in the same slots
    (2 processes x batch 1 = 1 process x batch 1 x accum 2)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train_main(run_args(train_world, tmp_path / "one", "pixel", "--max_iters=4", "--batch_size=1", "--grad_accum=2",
                        f"--latent_cache={tmp_path / 'c1'}"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        str(ROOT / "train.py"),
                        *run_args(train_world, tmp_path / "two", "pixel", "--max_iters=4", "--batch_size=1",
                                  f"--latent_cache={tmp_path / 'c2'}")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "world 2" in p.stdout and "training on LatentCacheDataset" in p.stdout
    (one, _), (two, _) = losses(tmp_path / "one"), losses(tmp_path / "two")
    torch.testing.assert_close(torch.tensor([two[s] for s in range(1, 5)]),
                               torch.tensor([one[s] for s in range(1, 5)]), rtol=1e-5, atol=1e-6)
