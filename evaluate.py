"""
The sample.py command line and evaluation: sample.main runs main() here with runpy (sample never imports this file).
Owns: the settings (command line, else the run's config, else the family's), tokenizer, episodes (a split or files),
video / strip outputs, --bench, and --eval: PSNR / SSIM per camera and chunk against the ground truth, the reference
rows (shuffled actions, no motion, sharp first frame, tokenizer round trip, latent L2) and the table. --policy and
--policy_eval are policy.py's. Must not: hold rollout or sampler code (sample.py's).
"""
import json
import math
import os
import re
import runpy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

import configurator
import model
import sample
from configurator import ConfigError, UserError
from sample import SAMPLERS, decode, encode, parse_args, rollout, save_strip, save_video, write_frames
from vae import latent_frames

# -----------------------------------------------------------------------------
# metrics: PSNR (data range 255) and SSIM (Wang et al. 2004: gaussian window 11, sigma 1.5, grayscale,
# K1 0.01, K2 0.03, 'valid' filtering as the reference MATLAB code), per frame

def psnr(pred_N_3_H_W, gt_N_3_H_W):
    mse = (pred_N_3_H_W.double() - gt_N_3_H_W.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp(min=1e-10))    # identical frames: ~148 dB, never inf


def ssim(pred_N_3_H_W, gt_N_3_H_W, window=11, sigma=1.5):
    def gray(x):  # ITU-R BT.601 luma, as skimage's rgb2gray up to scaling
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)[:, None, None]
        return (x.double() * luma).sum(1, keepdim=True)

    x, y = gray(pred_N_3_H_W), gray(gt_N_3_H_W)
    window = min(window, *x.shape[-2:])   # frames smaller than the window: the window shrinks to the frame
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None]

    def blur(z):
        return F.conv2d(z, k)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def frame_metrics(pred_V_3_T_H_W, gt_V_3_T_H_W):
    """(psnr [V, T], ssim [V, T]) frame by frame."""
    p, g = (rearrange(x, "v c t h w -> (v t) c h w") for x in (pred_V_3_T_H_W, gt_V_3_T_H_W))
    V = pred_V_3_T_H_W.shape[0]
    return psnr(p, g).view(V, -1), ssim(p, g).view(V, -1)


def windows(video_V_3_T_H_W, num_frames=13):
    """(start, real frames k, clip [V,3,num_frames,H,W]) per rollout window, the last padded with its last frame."""
    T = video_V_3_T_H_W.shape[2]
    for start in range(0, T - 1, num_frames - 1):
        clip = video_V_3_T_H_W[:, :, start:start + num_frames]
        k = clip.shape[2]
        yield start, k, torch.cat([clip, clip[:, :, -1:].expand(-1, -1, num_frames - k, -1, -1)], dim=2)


def reconstruct(tokenizer, video_V_3_T_H_W, num_frames=13):
    """The ground truth through the tokenizer alone, window by window: the ceiling of any model."""
    out = video_V_3_T_H_W.clone()
    for start, k, clip in windows(video_V_3_T_H_W, num_frames):
        out[:, :, start + 1:start + k] = decode(tokenizer, encode(tokenizer, clip))[:, :, 1:k]
    return out


def no_motion(tokenizer, first_V_3_H_W, T, num_frames=13):
    """A still robot through the tokenizer: latent 0 of the first frame held for a whole chunk, decoded. [V,3,T,H,W]."""
    z = encode(tokenizer, first_V_3_H_W[:, :, None])
    clip = decode(tokenizer, z.repeat(1, 1, latent_frames(num_frames, tokenizer.temporal_factor), 1, 1))
    idx = [0] + [1 + (k - 1) % (num_frames - 1) for k in range(1, T)]
    return torch.cat([first_V_3_H_W[:, :, None], clip[:, :, idx[1:]]], dim=2)


def latent_l2(tokenizer, pred_V_3_T_H_W, gt_V_3_T_H_W, num_frames=13):
    """Latent L2 as the Cosmos Bridge evaluation: RMS latent difference of the predicted latent frames (1..) per
    window, averaged. Lower is better; unlike PSNR it does not reward blur."""
    errs = [(encode(tokenizer, p)[:, :, 1:] - encode(tokenizer, g)[:, :, 1:]).pow(2).mean().sqrt().item()
            for (_, _, p), (_, _, g) in zip(windows(pred_V_3_T_H_W, num_frames), windows(gt_V_3_T_H_W, num_frames))]
    return sum(errs) / len(errs)


def shuffled_actions(dataset, i):
    """(actions [n, A] not of episode i: the next episode's, or with one episode its own reversed, how)."""
    n = len(dataset.episodes)
    if n > 1:
        return dataset.episode_actions((i + 1) % n), "actions of the next episode (rolled by one)"
    return dataset.episode_actions(i).flip(0), "the episode's own actions time-reversed (single episode)"


@torch.no_grad()
def evaluate(net, tokenizer, dataset, *, episodes=0, max_actions=0, progress=True, strip_dir=None, **kw):
    """Every episode rolled out from its first frame (rollout settings in kw) against the ground truth: PSNR / SSIM
    overall, per view, per chunk, with shuffled actions (action sensitivity = true - shuffled), latent L2 and the
    references (no motion: the baseline to beat; sharp first frame; tokenizer round trip: the ceiling). A dict."""
    num_frames = kw.get("num_frames", 13)
    per_chunk = num_frames - 1
    import data
    n_eps = len(dataset.episodes) if not episodes else min(episodes, len(dataset.episodes))
    m = {k: [] for k in ("true", "shuf", "copy", "still", "rec", "lat", "lat_still")}
    chunk_p, chunk_s = {}, {}
    per_episode, timings, how = [], [], ""
    for i in data.progress(range(n_eps), n_eps, "episodes", min_total=1 if progress else n_eps + 1):
        gt = dataset.episode_frames(i)                      # [V,3,T,H,W]
        act = dataset.episode_actions(i)[:max_actions or None]
        N = act.shape[0]
        gt = gt[:, :, :N + 1]
        first = gt[None, :, :, 0]
        pred = rollout(net, tokenizer, first, act[None], timings=timings, progress=False, **kw)[0]
        p, s = frame_metrics(pred[:, :, 1:], gt[:, :, 1:])       # [V, N]
        if strip_dir is not None:   # issue 24 item 13: one strip per episode, prediction over ground truth
            sample.save_strip(Path(strip_dir) / f"{dataset.episodes[i].name}.png", pred, gt,
                              cameras=getattr(dataset, "cameras", None))
        wrong, how = shuffled_actions(dataset, i)
        L = min(N, wrong.shape[0])
        pw, sw = frame_metrics(rollout(net, tokenizer, first, wrong[None, :L], progress=False, **kw)[0][:, :, 1:],
                               gt[:, :, 1:L + 1])
        still = no_motion(tokenizer, gt[:, :, 0], N + 1, num_frames)
        m["true"].append((p, s)), m["shuf"].append((p[:, :L], s[:, :L], pw, sw))
        m["copy"].append(frame_metrics(gt[:, :, :1].expand(-1, -1, N, -1, -1), gt[:, :, 1:]))
        m["still"].append(frame_metrics(still[:, :, 1:], gt[:, :, 1:]))
        m["rec"].append(frame_metrics(reconstruct(tokenizer, gt, num_frames)[:, :, 1:], gt[:, :, 1:]))
        m["lat"].append(latent_l2(tokenizer, pred, gt, num_frames))
        m["lat_still"].append(latent_l2(tokenizer, still, gt, num_frames))
        for k in range(math.ceil(N / per_chunk)):
            sl = slice(k * per_chunk, (k + 1) * per_chunk)
            chunk_p.setdefault(k, []).append(p[:, sl].flatten())
            chunk_s.setdefault(k, []).append(s[:, sl].flatten())
        per_episode.append(dict(name=dataset.episodes[i].name, frames=N + 1, psnr=p.mean().item(),
                                ssim=s.mean().item(), psnr_shuffled=pw.mean().item(), ssim_shuffled=sw.mean().item(),
                                latent_l2=m["lat"][-1], latent_l2_no_motion=m["lat_still"][-1]))

    def mean(xs):
        return torch.cat([x.flatten() for x in xs]).mean().item()

    def ps(key, a=0, b=1):
        return {"psnr": mean([x[a] for x in m[key]]), "ssim": mean([x[b] for x in m[key]])}

    V = m["true"][0][0].shape[0]
    longest = max(p.shape[1] for p, _ in m["true"])
    lat, lat_still = sum(m["lat"]) / n_eps, sum(m["lat_still"]) / n_eps
    report = {
        "episodes": n_eps, "views": V, "chunk_size": per_chunk, "num_steps": kw.get("num_steps", 35),
        "sampler": kw.get("sampler", "ab2"), "seed": kw.get("seed", 0), **ps("true"), "latent_l2": lat,
        "per_view": {"psnr": [mean([p[v] for p, _ in m["true"]]) for v in range(V)],
                     "ssim": [mean([s[v] for _, s in m["true"]]) for v in range(V)]},
        "per_chunk": {"psnr": [mean(chunk_p[k]) for k in sorted(chunk_p)],
                      "ssim": [mean(chunk_s[k]) for k in sorted(chunk_s)],
                      "frames": [sum(x.numel() for x in chunk_p[k]) for k in sorted(chunk_p)],
                      "time_steps": [[k * per_chunk + 1, min((k + 1) * per_chunk, longest)] for k in sorted(chunk_p)]},
        "shuffled_actions": {"how": how, **ps("shuf", 2, 3)},
        "action_sensitivity": {k: ps("shuf")[k] - ps("shuf", 2, 3)[k] for k in ("psnr", "ssim")},
        "no_motion": {**ps("still"), "latent_l2": lat_still},
        "copy_first_frame": ps("copy"),
        "tokenizer_round_trip": ps("rec"),
        "seconds_per_chunk": sum(r["seconds"] for r in timings) / len(timings),
        "seconds_per_step": sum(r["sample_seconds"] for r in timings) / sum(r["net_calls"] for r in timings),
        "per_episode": per_episode,
    }
    report["beats_no_motion"] = {"psnr": report["psnr"] > report["no_motion"]["psnr"], "latent_l2": lat < lat_still}
    return report


def format_table(report, camera_names=None):
    """The eval report as a plain-text table, ending with whether the model beats standing still."""
    names = camera_names or [f"view {v}" for v in range(report["views"])]
    rows = [("all frames", report["psnr"], report["ssim"])]
    rows += [(f"  {name}", p, s) for name, p, s in zip(names, report["per_view"]["psnr"], report["per_view"]["ssim"])]
    chunks = report["per_chunk"]
    rows += [(f"  chunk {k} (t {a}-{b})", p, s)
             for k, (p, s, (a, b)) in enumerate(zip(chunks["psnr"], chunks["ssim"], chunks["time_steps"]))]
    rows += [(label, report[key]["psnr"], report[key]["ssim"]) for label, key in [
        ("shuffled actions", "shuffled_actions"), ("action sensitivity (true - shuffled)", "action_sensitivity"),
        ("no motion, through the tokenizer (baseline)", "no_motion"),
        ("copy first frame, sharp (no tokenizer)", "copy_first_frame"),
        ("tokenizer round trip (ceiling)", "tokenizer_round_trip")]]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}   PSNR dB    SSIM", "-" * (width + 18)]
    lines += [f"{name:{width}}  {p:8.2f}  {s:6.3f}" for name, p, s in rows]
    beats = report["beats_no_motion"]
    verdict = {2: "beats standing still", 1: "beats standing still on one measure only",
               0: "does NOT beat standing still"}[beats["psnr"] + beats["latent_l2"]]
    lines.append(f"latent L2: model {report['latent_l2']:.4f}, no motion {report['no_motion']['latent_l2']:.4f}; "
                 f"PSNR {report['psnr'] - report['no_motion']['psnr']:+.2f} dB vs no motion: the model {verdict}")
    lines.append(f"{report['episodes']} episodes, {report['sampler']} {report['num_steps']} steps, "
                 f"{report['seconds_per_chunk']:.2f} s/chunk, {report['seconds_per_step'] * 1000:.1f} ms/step; "
                 f"shuffled = {report['shuffled_actions']['how']}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the command line of sample.py: settings from the run's config, episodes from a dataset or from files

# What a released checkpoint was trained and run with, for files without a run config (official releases).
FAMILY = {
    # Cosmos-Predict2-2B-Sample-Action-Conditioned: 480p, conditioned frames at sigma 1e-4, AB2 35 steps (dit.md 7.1)
    "predict2": dict(frame_size=(480, 640), cond_t=model.sigma_to_t(1e-4), sampler="ab2",
                     says="480x640, conditioned frames at sigma 1e-4, ab2 35 steps"),
    # Cosmos-Predict2.5-2B robot/action-cond: Bridge 256x320, same-t conditioning on the 1000 scale, UniPC shift 5
    "predict2.5": dict(frame_size=(256, 320), cond_t=-1.0, sampler="unipc",
                       says="256x320, conditioned frames clean at the same t (1000-scale timesteps), unipc shift 5"),
}


TRAIN_KEYS = ("data_root", "num_frames", "frame_stride", "action_scale", "gripper_scale", "fps", "tokenizer_path",
              "pixel_factor", "action_key", "action_type", "action_norm", "state_key")
OVERRIDES = ("frame_size", "pixel_factor", "cameras", "num_frames", "fps", "tokenizer", "frame_stride")


def settings(c, run, fam):
    """CLI value, else the run config's (train.py), else train.py's defaults (read from its config block, never
    re-declared) with the net family's frame size, conditioning, Wan2.1 tokenizer and one camera (a released file
    has no run config). A CLI value that differs from the run's is printed as a deliberate override."""
    t = (run or {}).get("train", {})
    train = configurator.script_defaults(str(Path(__file__).with_name("train.py")))
    fallback = {**{k: train[k] for k in TRAIN_KEYS}, "split": train["val_split"], "cameras": (0,),
                "tokenizer": "wan2.1", "frame_size": FAMILY[fam]["frame_size"], "cond_t": FAMILY[fam]["cond_t"]}
    s, over = {}, []
    for k, default in fallback.items():
        v = c[k]
        # cond_t 0 and camera 0 are real values (issue 24 item 1: --cameras 0 was taken as unset)
        unset = v is None if k in ("cond_t", "cameras") else v in (None, "", 0, 0.0, ())
        s[k] = t.get("val_split" if k == "split" else k, default) if unset else v
        if not unset and k in OVERRIDES and k in t and list(as_tuple(v)) != list(as_tuple(t[k])):
            over.append(f"--{k}={v!r} (the run used {t[k]!r})")
    if over:
        print("override of the run's config: " + "; ".join(over))
    s["cameras"] = tuple(x if isinstance(x, str) and not x.isdigit() else int(x)   # LeRobot cameras may be names
                         for x in as_tuple(s["cameras"]))
    s["frame_size"] = tuple(s["frame_size"])
    s["cond_t"] = None if s["cond_t"] is None or s["cond_t"] < 0 else float(s["cond_t"])
    s["sampler"] = c["sampler"] or ("unipc" if fam == "predict2.5" and s["cond_t"] is None else "ab2")
    return s


def as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def load_tokenizer(s, dev, bench=False):
    import vae
    if s["tokenizer"] == "pixel":
        return vae.load_tokenizer("pixel", None, device=dev, spatial_factor=s["pixel_factor"])
    path = s["tokenizer_path"] or None
    if path is None and bench:
        print(f"bench: {s['tokenizer']} tokenizer with random weights")
    elif path is None:
        raise UserError("--tokenizer_path", "the Wan2.1 tokenizer needs its weights: pass --tokenizer_path "
                                            "path/to/tokenizer.pth")
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(2, "tokenizer weights not found (--tokenizer_path)", path)
    return vae.load_tokenizer(s["tokenizer"], path, device=dev)


def dataset_root(ann_path, folder, data_root):
    """--data_root, else the folder holding the annotation's `folder` ancestor (root/annotation/<split>/x.json)."""
    if data_root:
        return Path(data_root)
    ancestor = next((p for p in Path(ann_path).resolve().parents if p.name == folder), Path(ann_path).parent)
    return ancestor.parent


def camera_files(ann_path, ann, video_path, cameras, data_root):
    """Every camera's video of an annotation: the video path's sibling cam<k>/ folders (or, one camera, the file),
    else IRASim's json["videos"][k]["video_path"] or camera folders (root/videos/cam<k>/<name>.mp4). Missing: named."""
    import data
    if video_path:
        p = Path(video_path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: input video not found")
        if re.fullmatch(r"cam\d+", p.parent.name):
            paths = [p.parent.parent / f"cam{k}" / p.name for k in cameras]
        elif len(cameras) == 1:
            paths = [p]
        else:
            raise ConfigError(f"{p}: the model needs cameras {list(cameras)}; put each camera's video in sibling "
                             f"folders cam<k>/ under the same file name")
    elif ann.get("videos"):
        paths = data.camera_paths(dataset_root(ann_path, "annotation", data_root), "irasim", ann_path, ann, cameras)
    else:
        root = dataset_root(ann_path, "annotations", data_root)
        paths = data.camera_paths(root, "camera_folders", ann_path, ann, cameras)
    missing = [f"camera {k}: {q}" for k, q in zip(cameras, paths) if not Path(q).is_file()]
    if missing:
        raise FileNotFoundError(f"video not found for {ann_path}: " + "; ".join(missing))
    return paths


def load_files_episode(ann_path, video_path, s, data_root):
    """(frames uint8 [V,3,T,H,W], actions [T-1, 7]) of one episode given by files, at the run's frame size/stride."""
    import data
    ann = data.parse_annotation(ann_path)
    videos = camera_files(ann_path, ann["json"], video_path, camera_ids(s, ann_path), data_root)
    T = len(ann["state"])
    data.check_frame_counts(ann_path, T, videos, [data.probe_video(v)[0] for v in videos])
    st = s["frame_stride"]
    frames = torch.stack([data.read_frames(v, range(0, T, st), s["frame_size"]) for v in videos]).transpose(1, 2)
    actions = data.compute_actions(ann["state"][::st], ann["gripper"][::st], s["action_scale"], s["gripper_scale"])
    return frames.contiguous(), torch.from_numpy(actions)


def resolve(p, base):
    p = Path(p)
    return p if p.exists() or p.is_absolute() else base / p


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def file_job(ann, video, out, data_root):
    """A rollout job: (name, load(settings) -> (frames [V,3,T,H,W], actions [T-1,A]), save path)."""
    return Path(ann).stem, lambda s: load_files_episode(ann, video, s, data_root), Path(out)


def file_jobs(c, save_path):
    """The jobs (file_job) of --annotation (an episode JSON, a JSON list, or a folder) and --input_path."""
    if not c["annotation"]:
        raise UserError("--input_path", "needs --annotation (the episode's state and gripper, for the actions)")
    a = Path(c["annotation"])
    if a.is_dir():
        entries = [str(p) for p in sorted(a.glob("*.json"))]
        if not entries:
            raise FileNotFoundError(f"{a}: no *.json episodes in this folder")
        base = Path(".")
    elif not a.is_file():
        raise FileNotFoundError(f"{a}: annotation not found")
    else:
        d = read_json(a)
        if not isinstance(d, list):
            return [file_job(a, c["input_path"], save_path, c["data_root"])]
        entries, base = d, a.parent
    jobs = []
    for e in entries:   # batch: each entry is an annotation path or {"annotation", "input_path", "save_path"}
        e = {"annotation": e} if isinstance(e, str) else e
        if not isinstance(e, dict) or "annotation" not in e:
            raise ConfigError(f"{a}: each entry must be an annotation path or a dict with 'annotation', got {e!r}")
        ann = resolve(e["annotation"], base)
        out = e.get("save_path") or save_path.with_name(f"{save_path.stem}_{ann.stem}{save_path.suffix}")
        video = str(resolve(e["input_path"], base)) if e.get("input_path") else ""
        jobs.append(file_job(ann, video, out, c["data_root"]))
    return jobs


def camera_ids(s, where):
    """The cameras of a non-LeRobot dataset: ids (a LeRobot run's camera names are refused, naming the fix)."""
    names = [k for k in s["cameras"] if isinstance(k, str)]
    if names:
        raise UserError(where, f"cameras {names} are LeRobot camera names (the run's), but this is not a LeRobot "
                               f"folder (no meta/info.json): pass --cameras with this data's ids, e.g. --cameras 0")
    return s["cameras"]


def dataset(s, split):
    import data
    if os.path.isfile(os.path.join(s["data_root"], "meta", "info.json")):   # a LeRobot folder
        import lerobot
        return lerobot.LeRobotDataset(s["data_root"], split, **lerobot.config_kwargs(s))
    camera_ids(s, s["data_root"])
    return data.RobotVideoDataset(s["data_root"], split, num_frames=s["num_frames"], cameras=s["cameras"],
                                  size=s["frame_size"], frame_stride=s["frame_stride"], action_scale=s["action_scale"],
                                  gripper_scale=s["gripper_scale"])


def episode_index(ds, ep):
    if ep is None:
        return 0
    if isinstance(ep, int):
        if not -len(ds.episodes) <= ep < len(ds.episodes):
            raise ConfigError(f"episode {ep} out of range: {ds.root} split {ds.split!r} has {len(ds.episodes)}")
        return ep
    names = [e.name for e in ds.episodes]
    if str(ep) not in names:
        raise ConfigError(f"no episode {ep!r} in {ds.root} split {ds.split!r}; first ones: {names[:5]}")
    return names.index(str(ep))


def free_path(path, named):
    """An output path: as named (check_outputs refuses it when it exists), else the default one or, when that is
    taken, the next free <stem>_<n> (said): no output is replaced without --overwrite, and commands run in a row."""
    path, n = Path(path), 1
    if named or not path.exists():
        return path
    while path.with_name(f"{path.stem}_{n}{path.suffix}").exists():
        n += 1
    free = path.with_name(f"{path.stem}_{n}{path.suffix}")
    print(f"{path} exists: writing {free} (--save_path / --eval_json name the output; --overwrite replaces it)")
    return free


def check_outputs(paths, overwrite):
    """Before any work: every output folder is writable and no existing output is replaced unless overwrite."""
    for p in map(Path, paths):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{p.parent}: cannot create the output folder ({e.strerror})") from None
        if not os.access(p.parent, os.W_OK):
            raise ConfigError(f"{p.parent}: output folder is not writable")
        if p.exists() and not overwrite:
            raise ConfigError(f"{p}: exists; pass --overwrite to replace it, or another --save_path")


def setup(c):
    """Device, net, settings (printed), tokenizer and the rollout arguments; text contexts are loaded once."""
    import convert
    dev, bf16 = configurator.resolve_device(c["device"], c["dtype"])   # (TF32 on for CUDA)
    dtype = "bfloat16" if bf16 else "float32"
    # one thread policy with train.py (issue 24 item 8): tiny CPU nets on one thread
    configurator.cpu_budget(dev.type, num_workers=0, tiny=c["model_size"] == "" and dev.type == "cpu")
    if c["sampler"] and c["sampler"] not in SAMPLERS:
        raise UserError(f"--sampler={c['sampler']!r}", f"must be one of {sorted(SAMPLERS)}")
    if c["num_conditional_frames"] != 1:
        raise UserError("--num_conditional_frames", "the action models condition on exactly 1 frame per camera")
    if c["disable_guardrail"]:
        print("--disable_guardrail: nanocosmos has no guardrail models, so there is nothing to disable")
    net, run = bench_net(c, dev) if c["bench"] and c["model_size"] else convert.load_dit(c["dit_path"], dev, c["ema"])
    fam = convert.family(net.cfg)
    s = settings(c, run, fam)
    if run is None and not c["bench"]:
        print(f"no run config beside the checkpoint: {fam} defaults assumed ({FAMILY[fam]['says']}; 13 frames, "
              f"4 fps, Wan2.1 tokenizer); command-line values win")
    ctx, neg = (convert.load_text_embedding(c[k], net.cfg, dev) if c[k] else None
                for k in ("text_embedding", "negative_text_embedding"))
    if fam == "predict2.5" and ctx is None and not c["bench"]:
        print("warning: no --text_embedding: this Predict2.5 net gets an all-zero text input (GELU(bias) tokens after "
              "crossattn_proj), while the release was trained on Reason1 embeddings of the empty caption and official "
              "inference embeds the prompt (or \"\") and the negative prompt (recipe: convert.load_text_embedding)")
    tok = load_tokenizer(s, dev, bench=c["bench"])
    shift = f" shift {c['shift']:g}" if s["sampler"] == "unipc" else ""
    if dtype == "bfloat16" and dev.type == "cuda":
        tok = tok.to(torch.bfloat16)
    print(f"model: {net.num_params() / 1e6:.2f}M params, {fam}, action {net.cfg.action_mode}, {s['tokenizer']} "
          f"tokenizer | cameras {list(s['cameras'])} at {s['frame_size'][0]}x{s['frame_size'][1]}, "
          f"{s['num_frames']}-frame chunks, fps {s['fps']}, cond_t {s['cond_t']} | {s['sampler']} {c['num_steps']} "
          f"steps{shift}, seed {c['seed']}, guidance {c['guidance']:g}, {dtype}, {dev}")
    if c["compile"]:
        net = torch.compile(net)
    common = dict(num_frames=s["num_frames"], num_steps=c["num_steps"], sampler=s["sampler"], shift=c["shift"],
                  seed=c["seed"], cond_t=s["cond_t"], fps=s["fps"], guidance=c["guidance"], crossattn_emb=ctx,
                  neg_crossattn_emb=neg, amp=torch.bfloat16 if dtype == "bfloat16" else None,
                  sigma_grid=c["sigma_grid"] or None)
    return net, s, tok, common


def run_jobs(jobs, net, tok, common, c, s, start_frame=0):
    """Roll out and write each job (file_job)."""
    outputs = []
    for name, load, out in jobs:
        frames, actions = load(s)
        frames, actions = frames[:, :, start_frame:], actions[start_frame:][:c["max_actions"] or None]
        timings = []
        t0 = time.perf_counter()
        video = rollout(net, tok, frames[None, :, :, 0], actions[None], timings=timings, **common)[0]
        dt = time.perf_counter() - t0
        gt = frames[:, :, :video.shape[2]] if c["compare"] else None
        save_video(out, video, gt, fps=c["save_fps"] or s["fps"])
        if c["save_frames"]:
            write_frames(out, video)
        strip = Path(c["strip_path"]) if c["strip_path"] and len(jobs) == 1 else out.with_suffix(".png")
        times = save_strip(strip, video, gt, cameras=s["cameras"])
        calls = sum(r["net_calls"] for r in timings)
        print(f"{name}: {actions.shape[0]} actions -> {video.shape[2]} frames x {video.shape[0]} views in "
              f"{len(timings)} chunks, {dt:.1f} s ({dt / max(len(timings), 1):.2f} s/chunk, "
              f"{sum(r['sample_seconds'] for r in timings) / max(calls, 1) * 1000:.1f} ms/denoising step, "
              f"{sum(r['decode_seconds'] for r in timings):.2f} s decoding)")
        print(f"wrote {out} ({c['save_fps'] or s['fps']} fps) and {strip} (time steps {times})")
        outputs.append((out, video))
    return outputs


def bench_net(c, dev):
    """(a random-weight Predict2.5 multi-view action net of --model_size as config/multiview_action.py, None)."""
    if c["model_size"] not in model.PRESETS:
        raise ConfigError(f"--bench --model_size must be one of {sorted(model.PRESETS)}, got {c['model_size']!r} "
                          f"(or no --model_size: the checkpoint --dit_path)")
    cfg = model.DiTConfig(**model.PRESETS[c["model_size"]], action_mode="per_frame", action_dim=7, num_actions=12,
                          n_views_emb=7, crossattn_proj_in_channels=100352, timestep_scale=0.001)
    with torch.device("meta"):
        net = model.DiT(cfg)
    net.to_empty(device=dev)
    torch.manual_seed(c["seed"])
    net.init_weights()
    return net.eval(), None


def bench(c):
    """Seconds per chunk of a rollout on random first frames and actions (no dataset is read), at the net's
    settings (setup); two chunks: the first includes warm-up (kernel selection, compile), the second is the
    figure. Prints the timings and the peak CUDA memory; returns the per-chunk timing dicts of rollout."""
    if c["model_size"]:
        c = {**c, "cameras": c["cameras"] or (0, 1, 2, 3)}
    net, s, tok, common = setup(c)
    H, W = s["frame_size"]
    V = len(s["cameras"])
    g = torch.Generator().manual_seed(c["seed"])
    frames = torch.randint(0, 256, (1, V, 3, H, W), generator=g, dtype=torch.uint8)
    actions = torch.randn(1, 2 * (s["num_frames"] - 1), net.cfg.action_dim, generator=g) * 0.1
    dev = next(net.parameters()).device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    timings = []
    rollout(net, tok, frames, actions, timings=timings, progress=False, **common)
    peak = f", peak CUDA memory {torch.cuda.max_memory_allocated(dev) / 2 ** 30:.2f} GB" if dev.type == "cuda" else ""
    for r in timings:
        print(f"bench chunk {r['chunk']}: {r['seconds']:.3f} s = encode {r['encode_seconds']:.3f} + sample "
              f"{r['sample_seconds']:.3f} ({r['net_calls']} net calls) + decode {r['decode_seconds']:.3f}")
    print(f"bench: {timings[-1]['seconds']:.3f} s per {V}-view chunk ({s['num_frames'] - 1} new frames at {H}x{W}, "
          f"{common['sampler']} {common['num_steps']} steps, {'bf16' if common['amp'] else 'fp32'}){peak}")
    return timings


@torch.no_grad()   # (not set_grad_enabled: a caller in the same process keeps its gradients)
def main(argv):
    """`python sample.py [--eval | --bench] ...` (sample.main dispatches here): one episode of the split or the files
    given -> video + strip; --bench; --eval: the report over the split -> table, eval_json and one PNG strip per
    episode beside it. Every output: a named one that exists is refused unless --overwrite; a taken default name
    moves to the next free one (free_path)."""
    c = parse_args(argv)
    if c["bench"]:
        return bench(c)
    if c["policy"] or c["policy_eval"]:   # policy.py imports this file: runpy, not an import (no cycle)
        policy = runpy.run_module("policy", run_name="policy_cli")
        return policy["policy_eval"](c) if c["policy_eval"] else policy["sample_policy"](c)
    named = {a.split("=")[0][2:] for a in argv if a.startswith("--")}
    if not c["eval"]:
        return sample_episodes({**c, "save_path": free_path(c["save_path"], "save_path" in named or c["overwrite"])})
    path = free_path(c["eval_json"] or "output/eval.json", c["eval_json"] or c["overwrite"])
    check_outputs([path], c["overwrite"])
    net, s, tok, common = setup(c)
    ds = dataset(s, c["split"] or s["split"])
    print(f"eval: {ds}")
    (path.parent / (path.stem + "_strips")).mkdir(parents=True, exist_ok=True)
    report = evaluate(net, tok, ds, episodes=c["eval_episodes"], max_actions=c["max_actions"],
                      strip_dir=path.parent / (path.stem + "_strips"), **common)
    report.update(checkpoint=str(c["dit_path"]), data_root=str(s["data_root"]), split=ds.split,
                  cameras=list(s["cameras"]))
    print(format_table(report, sample.camera_names(s["cameras"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return report


def sample_episodes(c):
    """`python sample.py`: the episode of the split (or the files) rolled out and written."""
    save_path = Path(c["save_path"])
    jobs = file_jobs(c, save_path) if c["input_path"] or c["annotation"] else None
    check_outputs([out for *_, out in jobs] if jobs else [save_path], c["overwrite"])
    net, s, tok, common = setup(c)
    if not jobs:
        ds = dataset(s, c["split"] or s["split"])
        i = episode_index(ds, c["episode"])
        jobs = [(ds.episodes[i].name, lambda s: (ds.episode_frames(i), ds.episode_actions(i)), save_path)]
    return run_jobs(jobs, net, tok, common, c, s)
