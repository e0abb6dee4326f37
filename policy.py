"""
Closed-loop rollouts of a policy in the world model and in the synthetic simulator, and how far to trust the one
by the other. `python sample.py --policy file.py:fn | pkg.mod:fn [--policy_arg TEXT]` (sample.main -> evaluate.main
-> here): fn(frames_B_V_3_H_W uint8, step, history) -> the next chunk's actions [B, n <= chunk, A] in the run's
convention (data.compute_actions, scaled by its action_scale / gripper_scale); with --policy_arg, fn is a factory
called fn(policy_arg, settings) (settings: cameras, frame_size, action_scale, gripper_scale, chunk, action_dim)
that returns the policy. --max_actions sets the rollout's length (0: the episode's). Writes the mp4 of all cameras,
the strip and <save_path>.actions.json; replay it with --policy policy.py:replay --policy_arg that.json.
`--policy_eval`: every reference policy (REFERENCE) on --policy_episodes first scenes of the synthetic world, closed
loop in synth.World and in the world model from the same first frames (episode indices from the val split's first, by
synth.json); success rates in both worlds, their Spearman rank correlation and mean absolute difference, per-chunk
PSNR between the two videos; --policy_scores {name: real success rate} adds a real column (names: REFERENCE names
or file.py:fn specs). Output: --policy_json and a PNG bar chart beside it.
Task and success, the same in both worlds: the target is the cube colour (OBJECT_COLOURS but white) covering most
pixels of the first camera's first frame; a pixel is a colour when its chromaticity (rgb / sum) is within 0.2 (L1)
of it and r+g+b > 60; the gripper is the blue palm. Success: in the last frame, in every camera, both are seen
(>= 3 pixels) and their centroids' columns differ by < 8% of the width (so the gripper is over the cube).
Reference policies (REFERENCE), per chunk from its latest frame: servo: each camera's column error (cube - palm)
moves the gripper along that camera's right axis, a fraction `gain` of what is left per step, plus gaussian noise
(m per step); no rotation (the wrist's yaw, < 0.6 rad, is ignored), gripper open. random: xy steps of up to 3 cm.
Owns: loading and checking policies, the reference policies, the success measure, --policy and --policy_eval.
Must not: change rollout or the simulator (sample.py, synth.py), or define the action convention (data.py's).
"""
import importlib
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

import evaluate
import sample
import synth
from configurator import UserError

TOL, MIN_PIXELS, WIDTH_FRACTION = 0.2, 3, 0.08
PALM = synth.EE_PARTS[0][2]
TARGETS = {k: v for k, v in synth.OBJECT_COLOURS.items() if k != "white"}   # white is the wall's chromaticity
# name: (gain: fraction of the seen error corrected per step, noise: m per step), or None: random
REFERENCE = {"servo_fast": (0.4, 0.0), "servo": (0.2, 0.0), "servo_noisy": (0.2, 0.01), "servo_slow": (0.06, 0.0),
             "servo_very_noisy": (0.4, 0.03), "random": None}


def load(spec, arg, settings):
    """The policy of --policy spec (file.py:fn or pkg.mod:fn), called through its factory when arg is given."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UserError(f"--policy={spec!r}", "must be path/to/file.py:function or package.module:function")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise UserError(where, "policy file not found")
        loader = importlib.util.spec_from_file_location(Path(where).stem, where)
        mod = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise UserError(where, f"no such module ({e.msg}); a file is given as path/to/file.py:function") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise UserError(where, f"has no function {name!r}")
    return checked(fn(arg, settings) if arg else fn, spec, settings["action_dim"])


def checked(policy, name, action_dim):
    """The policy with its answers checked: [B, n, action_dim], finite, as float32 tensors."""
    def ask(frames, step, history):
        a = policy(frames, step, history)
        a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).float()
        if a.ndim != 3 or a.shape[0] != frames.shape[0] or a.shape[1] == 0:
            raise UserError(name, f"returned shape {list(a.shape)} at step {step}: a chunk is [B={frames.shape[0]}, "
                                  f"n, {action_dim}] actions")
        if a.shape[2] != action_dim:
            raise UserError(name, f"returned {a.shape[2]}-D actions, the model takes {action_dim}-D")
        if not torch.isfinite(a).all():
            raise UserError(name, f"returned NaN or infinite actions at step {step}")
        return a
    return ask


def replay(path, settings):
    """The actions of a <save_path>.actions.json, chunk by chunk: the same rollout again, bit for bit."""
    actions = torch.tensor(evaluate.read_json(path)["actions"], dtype=torch.float32)[None]
    return lambda frames, step, history: actions[:, step:step + settings["chunk"]].expand(frames.shape[0], -1, -1)


def reference(name, settings):
    """A reference policy by name (REFERENCE; factory form: --policy policy.py:reference --policy_arg servo)."""
    if name not in REFERENCE:
        raise UserError(f"--policy_arg={name!r}", f"must be one of {sorted(REFERENCE)}")
    s = settings
    right = [synth.camera(k, s["frame_size"])["right"][:2] for k in s["cameras"]]
    g = torch.Generator().manual_seed(sorted(REFERENCE).index(name))

    def act(frames, step, history):
        B, n = frames.shape[0], s["chunk"]
        out = torch.zeros(B, n, s["action_dim"])
        for b in range(B):
            if REFERENCE[name] is None:
                out[b, :, :2] = (torch.rand(n, 2, generator=g) - 0.5) * 0.06
                continue
            gain, noise = REFERENCE[name]
            colour = target(history[b, :, :, 0])
            err = np.zeros(2)
            for v, r in enumerate(right):   # a column error in camera v: move along that camera's right
                seen = [centroid(frames[b, v], c) for c in (colour, PALM)]
                if all(x is not None for x in seen):
                    err += 0.5 * (seen[0] - seen[1]) / frames.shape[-1] * r
            left = err
            for k in range(n):   # the plan: a fraction `gain` of what is left each step
                step_xy = gain * left
                out[b, k, :2] = torch.from_numpy(step_xy).float() + noise * torch.randn(2, generator=g)
                left = left - step_xy
        out[..., :6] = (out[..., :6] * s["action_scale"]).clamp(-0.6 * s["action_scale"], 0.6 * s["action_scale"])
        return out
    return act


def colour_mask(frame_3_H_W, colour):
    x = torch.as_tensor(frame_3_H_W).double()
    total = x.sum(0)
    chroma = x / total.clamp(min=1)
    c = torch.tensor(colour, dtype=torch.float64)
    return ((chroma - (c / c.sum())[:, None, None]).abs().sum(0) < TOL) & (total > 60)


def centroid(frame_3_H_W, colour):
    """The column of a colour's centroid, or None when fewer than MIN_PIXELS show it."""
    m = colour_mask(frame_3_H_W, colour)
    return m.nonzero()[:, 1].double().mean().item() if m.sum() >= MIN_PIXELS else None


def target(first_V_3_H_W):
    counts = {k: colour_mask(first_V_3_H_W[0], c).sum().item() for k, c in TARGETS.items()}
    return TARGETS[max(counts, key=counts.get)]


def success(video_V_3_T_H_W):
    """The task done at the last frame (module docstring)."""
    colour, W = target(video_V_3_T_H_W[:, :, 0]), video_V_3_T_H_W.shape[-1]
    for v in range(video_V_3_T_H_W.shape[0]):
        seen = [centroid(video_V_3_T_H_W[v, :, -1], c) for c in (colour, PALM)]
        if None in seen or abs(seen[0] - seen[1]) >= WIDTH_FRACTION * W:
            return False
    return True


def simulate(worlds, policy, N, s):
    """The closed loop in synth.World: [B, V, 3, N+1, H, W] uint8, chunk by chunk as sample.rollout asks."""
    video = [torch.from_numpy(np.stack([w.render(s["cameras"], s["frame_size"]) for w in worlds]))]
    for start in range(0, N, s["chunk"]):
        a = policy(video[-1], start, torch.stack(video, dim=3))[:, :min(s["chunk"], N - start)]
        for k in range(a.shape[1]):
            for w, a_b in zip(worlds, a[:, k].numpy()):
                w.act(a_b, s["action_scale"], s["gripper_scale"])
            video.append(torch.from_numpy(np.stack([w.render(s["cameras"], s["frame_size"]) for w in worlds])))
    return torch.stack(video, dim=3)


def settings_of(net, s):
    return dict(cameras=tuple(s["cameras"]), frame_size=tuple(s["frame_size"]), action_scale=s["action_scale"],
                gripper_scale=s["gripper_scale"], chunk=s["num_frames"] - 1, action_dim=net.cfg.action_dim)


def sample_policy(c):
    """`python sample.py --policy ...`: the episode's (or the files') first frames, rolled out closed loop."""
    save_path = Path(c["save_path"])
    jobs = evaluate.file_jobs(c, save_path) if c["input_path"] or c["annotation"] else None
    check_outputs = [out for *_, out in jobs] if jobs else [save_path]
    evaluate.check_outputs(check_outputs + [p.with_suffix(".actions.json") for p in check_outputs], c["overwrite"])
    net, s, tok, common = evaluate.setup(c)
    policy = load(c["policy"], c["policy_arg"], settings_of(net, s))
    if not jobs:
        ds = evaluate.dataset(s, c["split"] or s["split"])
        i = evaluate.episode_index(ds, c["episode"])
        jobs = [(ds.episodes[i].name, lambda s: (ds.episode_frames(i), ds.episode_actions(i)), save_path)]
    outputs = []
    for name, get, out in jobs:
        frames, actions = get(s)
        N = c["max_actions"] or actions.shape[0]
        t0 = time.perf_counter()
        video, used = sample.rollout(net, tok, frames[None, :, :, 0], policy=policy, num_actions=N,
                                     return_actions=True, **common)
        sample.save_video(out, video[0], fps=c["save_fps"] or s["fps"])
        sample.save_strip(out.with_suffix(".png"), video[0])
        out.with_suffix(".actions.json").write_text(json.dumps(dict(
            policy=c["policy"], policy_arg=c["policy_arg"], episode=name, seed=c["seed"], **settings_of(net, s),
            actions=used[0].tolist())))
        print(f"{name}: {c['policy']} closed loop, {N} actions in {time.perf_counter() - t0:.1f} s; wrote {out} and "
              f"{out.with_suffix('.actions.json')} (replay: --policy policy.py:replay --policy_arg that file)")
        outputs.append((out, video[0], used[0]))
    return outputs


def spearman(x, y):
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        return np.array([np.mean(np.nonzero(np.sort(v) == e)[0]) for e in v])
    rx, ry = ranks(x), ranks(y)
    if len(x) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def agreement(a, b):
    return {"spearman": spearman(a, b), "mean_abs_diff": float(np.mean(np.abs(np.subtract(a, b))))}


def chart(path, rows, columns):
    """A PNG bar chart: a group of bars per policy (table order), one colour per column, white background."""
    colours = [(40, 90, 200), (240, 140, 30), (120, 120, 120)]
    H, bar, gap = 120, 10, 14
    img = np.full((H + 10, gap + len(rows) * (len(columns) * bar + gap), 3), 255, np.uint8)
    img[H + 1] = 0
    for i, r in enumerate(rows):
        for j, col in enumerate(columns):
            x = gap + i * (len(columns) * bar + gap) + j * bar
            img[H + 1 - round(H * r[col]):H + 1, x:x + bar - 1] = colours[j]
    sample.write_png(path, img)


def policy_eval(c):
    """`python sample.py --policy_eval`: the agreement table of simulator, world model (and real scores)."""
    path = Path(c["policy_json"] or "output/policy_eval.json")
    evaluate.check_outputs([path, path.with_suffix(".png")], c["overwrite"])
    real = evaluate.read_json(c["policy_scores"]) if c["policy_scores"] else {}
    net, s, tok, common = evaluate.setup(c)
    st = settings_of(net, s)
    meta = Path(s["data_root"]) / "synth.json"
    meta = json.loads(meta.read_text()) if meta.is_file() else dict(seed=0, objects=(1, 3), episodes=0, val_episodes=0)
    first_index = meta["episodes"] - meta["val_episodes"]   # the val split's first scenes
    n, N = c["policy_episodes"], c["max_actions"] or 2 * st["chunk"]
    names = list(real) or list(REFERENCE)
    rows, t0 = [], time.perf_counter()
    for name in names:
        policy = checked(reference(name, st), name, st["action_dim"]) if name in REFERENCE else load(name, "", st)
        worlds = [synth.World.episode(meta["seed"], first_index + i, meta["objects"]) for i in range(n)]
        sim = simulate(worlds, policy, N, st)
        wm = sample.rollout(net, tok, sim[:, :, :, 0], policy=policy, num_actions=N, progress=False, **common)
        psnr = [evaluate.psnr(*(x[:, :, :, k + 1:k + 1 + st["chunk"]].transpose(2, 3).flatten(0, 2)
                                for x in (wm, sim))).mean().item() for k in range(0, N, st["chunk"])]
        row = dict(policy=name, sim=np.mean([success(v) for v in sim]), world_model=np.mean([success(v) for v in wm]),
                   psnr_per_chunk=psnr, **({"real": float(real[name])} if name in real else {}))
        rows.append({k: float(v) if isinstance(v, np.floating) else v for k, v in row.items()})
        print(f"{name:18s} success: simulator {row['sim']:.2f}, world model {row['world_model']:.2f}"
              + (f", real {row['real']:.2f}" if "real" in row else "") + " | PSNR per chunk (WM vs sim) "
              + " ".join(f"{p:.1f}" for p in psnr))
    columns = ["sim", "world_model"] + (["real"] if real else [])
    report = dict(episodes=n, actions=N, first_episode=first_index, seconds=time.perf_counter() - t0, policies=rows,
                  agreement={f"{a}_vs_{b}": agreement([r[a] for r in rows], [r[b] for r in rows])
                             for a, b in [("sim", "world_model"), ("real", "world_model"), ("real", "sim")]
                             if a in columns},
                  psnr_per_chunk=np.mean([r["psnr_per_chunk"] for r in rows], axis=0).tolist(),
                  chart=f"{path.with_suffix('.png')}: bars per policy, blue simulator, orange world model, grey real")
    for k, v in report["agreement"].items():
        rho = "n/a (a constant column)" if v["spearman"] is None else f"{v['spearman']:+.2f}"
        print(f"{k}: Spearman {rho}, mean |difference| {v['mean_abs_diff']:.2f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    chart(path.with_suffix(".png"), rows, columns)
    print(f"{n} episodes x {len(rows)} policies x {N} actions in {report['seconds']:.0f} s; wrote {path} and "
          f"{report['chart']}")
    return report
