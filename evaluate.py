"""
Evaluation of a rollout against the ground truth: PSNR / SSIM per camera and per chunk, the reference rows
(shuffled actions, no motion through the tokenizer, the sharp first frame, the tokenizer round trip, latent L2)
and the table. `python sample.py --eval ...` runs main() here (sample.py dispatches with runpy; this file
imports sample, sample never imports it).
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

import sample
from sample import decode, encode, rollout
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
    """The rollout's windows of a video: (start, real frames k, clip [V,3,num_frames,H,W]) for time steps
    12c..12c+12, a short last window padded with its last frame."""
    T = video_V_3_T_H_W.shape[2]
    for start in range(0, T - 1, num_frames - 1):
        clip = video_V_3_T_H_W[:, :, start:start + num_frames]
        k = clip.shape[2]
        yield start, k, torch.cat([clip, clip[:, :, -1:].expand(-1, -1, num_frames - k, -1, -1)], dim=2)


def reconstruct(tokenizer, video_V_3_T_H_W, num_frames=13):
    """The ground truth through the tokenizer alone, window by window as a rollout sees it: the best any model can
    score with this tokenizer."""
    out = video_V_3_T_H_W.clone()
    for start, k, clip in windows(video_V_3_T_H_W, num_frames):
        out[:, :, start + 1:start + k] = decode(tokenizer, encode(tokenizer, clip))[:, :, 1:k]
    return out


def no_motion(tokenizer, first_V_3_H_W, T, num_frames=13):
    """A model that predicts a still robot, through the tokenizer like every model's output: latent 0 of the first
    frame held for every latent frame of a chunk, decoded; every chunk decodes that same clip. [V,3,T,H,W]."""
    z = encode(tokenizer, first_V_3_H_W[:, :, None])
    clip = decode(tokenizer, z.repeat(1, 1, latent_frames(num_frames, tokenizer.temporal_factor), 1, 1))
    idx = [0] + [1 + (k - 1) % (num_frames - 1) for k in range(1, T)]
    return torch.cat([first_V_3_H_W[:, :, None], clip[:, :, idx[1:]]], dim=2)


def latent_l2(tokenizer, pred_V_3_T_H_W, gt_V_3_T_H_W, num_frames=13):
    """Latent-space L2 as in the Cosmos Bridge evaluation (prediction vs ground-truth latents): each rollout window
    of both videos encoded, then the root-mean-square latent difference over the predicted latent frames (1..),
    averaged over windows. Lower is better; unlike PSNR it does not reward blur."""
    errs = [(encode(tokenizer, p)[:, :, 1:] - encode(tokenizer, g)[:, :, 1:]).pow(2).mean().sqrt().item()
            for (_, _, p), (_, _, g) in zip(windows(pred_V_3_T_H_W, num_frames), windows(gt_V_3_T_H_W, num_frames))]
    return sum(errs) / len(errs)


def shuffled_actions(dataset, i):
    """Actions that do not belong to episode i: the next episode's (rolled by one). With a single episode, its own
    actions time-reversed. Returns (actions [n, A], how)."""
    n = len(dataset.episodes)
    if n > 1:
        return dataset.episode_actions((i + 1) % n), "actions of the next episode (rolled by one)"
    return dataset.episode_actions(i).flip(0), "the episode's own actions time-reversed (single episode)"


@torch.no_grad()
def evaluate(net, tokenizer, dataset, *, episodes=0, max_actions=0, progress=True, strip_dir=None, **kw):
    """Roll out every episode of a data.RobotVideoDataset from its first frame (rollout settings in kw) and compare
    to the ground truth (time steps 1..N; step 0 is given). Reports PSNR / SSIM overall, per view, per chunk (the
    drift over the rollout), the same with shuffled actions (action sensitivity = true minus shuffled: > 0 means
    the model follows the actions), the latent L2, and references: the no-motion model through the tokenizer (the
    baseline a world model must beat), the sharp first frame copied (no tokenizer: not reachable by any model) and
    the ground truth through the tokenizer alone (the ceiling). Returns a JSON-able dict."""
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
            sample.save_strip(Path(strip_dir) / f"{dataset.episodes[i].name}.png", pred, gt)
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




@torch.no_grad()   # (not set_grad_enabled: a caller in the same process keeps its gradients)
def main(argv):
    """`python sample.py --eval ...`: the report over the split -> table, eval_json (refused when it exists unless
    --overwrite, as every output) and one PNG strip per episode beside it."""
    c = sample.parse_args(argv)
    path = Path(c["eval_json"] or "output/eval.json")
    sample.check_outputs([path], c["overwrite"])
    net, s, tok, common = sample.setup(c)
    ds = sample.dataset(s, c["split"] or s["split"])
    print(f"eval: {ds}")
    (path.parent / (path.stem + "_strips")).mkdir(parents=True, exist_ok=True)
    report = evaluate(net, tok, ds, episodes=c["eval_episodes"], max_actions=c["max_actions"],
                      strip_dir=path.parent / (path.stem + "_strips"), **common)
    report.update(checkpoint=str(c["dit_path"]), data_root=str(s["data_root"]), split=ds.split,
                  cameras=list(s["cameras"]))
    print(format_table(report, [f"cam{k}" for k in s["cameras"]]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return report
