"""
Owns the Cosmos-Predict2.5 action guide's command `python sample.py -i inference_params.json -o OUT --checkpoint-path
FILE [--experiment NAME] [--key=value ...]` (sample.py runs this file with runpy and must not import it), with the
official conventions so the frames equal the official tool's (sigma grid by experiment, PIL Lanczos resize,
truncating uint8, zero-padded last chunk, written layout, save_fps).
"""
import json
from pathlib import Path

import numpy as np
import torch

import data
import sample
from configurator import ConfigError, UserError
from evaluate import check_outputs, read_json, setup

# ActionConditionedInferenceArguments (cosmos_predict2/action_conditioned_config.py) and its defaults
OFFICIAL_FIELDS = dict(name="", input_root=None, input_json_sub_folder=None, save_root="", chunk_size=12, guidance=7,
                       resolution="none", camera_id=0, start=0, end=100, fps_downsample_ratio=1, gripper_scale=1.0,
                       gripper_key="continuous_gripper_state", state_key="state", reverse=False, single_chunk=False,
                       start_frame_idx=0, save_fps=20, num_latent_conditional_frames=1, action_scaler=20.0,
                       use_quat=False, action_load_fn="cosmos_predict2.action_conditioned.load_default_action_fn",
                       seed=0, prompt=None, prompt_path=None, negative_prompt=None)
# use_kerras_sigma_at_inference as each experiment's config composes it: the guide's Bridge post-training experiment
# inherits True from its 2B base (SFT_2B_RF.py:767); the released robot checkpoint's experiment sets False
KNOWN_EXPERIMENTS = {"ac_reason_embeddings_rectified_flow_2b_256_320": True,
                     "cosmos_predict2p5_2B_reason_embeddings_action_conditioned_rectified_flow_bridge_13frame_256x320":
                         False}
_OFFICIAL_FLAGS = {"-i": "input", "--input-file": "input", "-o": "output", "--output-dir": "output",
                   "--checkpoint-path": "checkpoint", "--experiment": "experiment"}


def official_params(argv):
    """(official flags, inference_params.json with defaults and its numbers checked, --key=value rest, resolution)."""
    flags, rest, args = {}, [], iter(argv)
    for arg in args:
        key, eq, val = arg.partition("=")
        if key not in _OFFICIAL_FLAGS:
            rest.append(arg)
            continue
        flags[_OFFICIAL_FLAGS[key]] = val if eq else next(args, None)
        if flags[_OFFICIAL_FLAGS[key]] is None:
            raise ConfigError(f"{key} needs a value")
    for need, flag in (("input", "-i"), ("output", "-o"), ("checkpoint", "--checkpoint-path")):
        if need not in flags:
            raise ConfigError(f"the official command needs {flag} (nanocosmos downloads no released checkpoint)")
    params = flags["input"]
    p = read_json(Path(params))
    unknown = sorted(set(p) - set(OFFICIAL_FIELDS)) if isinstance(p, dict) else None
    if unknown is None or unknown or p.get("input_root") is None or p.get("input_json_sub_folder") is None:
        raise ConfigError(f"{params}: an inference_params.json object needs input_root and input_json_sub_folder"
                          + (f"; unknown fields {unknown}" if unknown else ""))
    p = {**OFFICIAL_FIELDS, **p}
    for key in ("chunk_size", "camera_id", "start", "end", "fps_downsample_ratio", "start_frame_idx", "save_fps",
                "guidance", "gripper_scale", "action_scaler"):
        v, kind = p[key], float if key in ("guidance", "gripper_scale", "action_scaler") else int
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (kind is int and not float(v).is_integer()):
            raise UserError(params, f"{key}={v!r}: must be a{'n integer' if kind is int else ' number'}")
        p[key] = kind(v)
    if p["chunk_size"] < 1 or p["fps_downsample_ratio"] < 1 or p["start_frame_idx"] < 0 or p["save_fps"] < 1:
        raise UserError(params, "chunk_size, fps_downsample_ratio and save_fps must be >= 1, start_frame_idx >= 0")
    parts = str(p["resolution"]).split(",")
    if str(p["resolution"]).lower() == "none":
        return flags, p, rest, None
    if len(parts) != 2 or not all(x.strip().isdigit() and int(x) > 0 for x in parts):
        raise UserError(params, f"resolution={p['resolution']!r}: must be \"H,W\" (e.g. \"256,320\") or \"none\"")
    return flags, p, rest, tuple(int(x) for x in parts)


def lanczos(frame_3_H_W, size):
    """The official resize of the conditioning frame: mediapy.resize_image, i.e. PIL's Lanczos on uint8
    (action_conditioned.py:165-172). Pillow is optional: without it, data.py's bilinear resize, said once."""
    if tuple(frame_3_H_W.shape[-2:]) == tuple(size):
        return frame_3_H_W
    try:
        from PIL import Image
    except ImportError:
        print("note: Pillow is not installed: bilinear resize instead of the official Lanczos (frames will differ)")
        return data.resize_frames(frame_3_H_W[None], size)[0]
    img = Image.fromarray(frame_3_H_W.permute(1, 2, 0).numpy()).resize((size[1], size[0]), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def load_episode(params, ann_path, p, s, root):
    """(the conditioning frame uint8 [1, 3, H, W] resized the official way, actions [N, A]) of one annotation:
    the video json["videos"][camera_id] under input_root, every fps_downsample_ratio-th row, from start_frame_idx."""
    ann = data.parse_annotation(ann_path)
    video = data.camera_paths(root, "irasim", ann_path, ann["json"], (p["camera_id"],))[0]
    if not Path(video).is_file():
        raise UserError(video, f"video not found (camera_id {p['camera_id']} of {ann_path})")
    stride, sfi = p["fps_downsample_ratio"], p["start_frame_idx"]
    n = min(data.probe_video(video)[0], len(ann["state"]))
    if sfi * stride >= n:
        raise UserError(params, f"start_frame_idx={sfi}: beyond {ann_path} ({n} frames"
                                f"{f' at fps_downsample_ratio {stride}' if stride > 1 else ''})")
    frame = lanczos(data.read_frames(video, [sfi * stride])[0], s["frame_size"])
    actions = data.compute_actions(ann["state"][::stride], ann["gripper"][::stride], s["action_scale"],
                                   s["gripper_scale"])[sfi:]
    if actions.shape[0] < p["chunk_size"]:
        raise UserError(ann_path, f"{actions.shape[0]} actions from start_frame_idx {sfi}: fewer than one chunk "
                                  f"(chunk_size {p['chunk_size']} in {params})")
    return frame[None], torch.from_numpy(actions)


def official_layout(chunks_B_V_3_T_H_W):
    """What the official command writes (action_conditioned.py:361-371): chunk 0's 13 frames, then frames 0..11 of
    every later chunk (time step 12c twice, as its VAE reconstruction; the last step dropped)."""
    per_chunk = chunks_B_V_3_T_H_W[0].shape[3] - 1
    return torch.cat([chunks_B_V_3_T_H_W[0][0]] + [c[0][:, :, :per_chunk] for c in chunks_B_V_3_T_H_W[1:]], dim=2)


def official_run(argv):
    """The official action inference (examples/action_conditioned.py -> cosmos_predict2/action_conditioned.py) of
    input_root/input_json_sub_folder/*.json, sorted, [start:end]: videos <name>_chunk.mp4 in save_root (or OUT), an
    existing one skipped unless --overwrite, and OUT/nanocosmos_settings.json; unhonoured fields in one warning."""
    flags, p, rest, size = official_params(argv)
    params, c = flags["input"], sample.parse_args(rest)
    single, exp, explicit = bool(p["single_chunk"]), flags.get("experiment"), c["sigma_grid"]
    grid = explicit or ("karras" if KNOWN_EXPERIMENTS.get(exp) else "linear")
    c.update(dit_path=flags["checkpoint"], data_root=str(p["input_root"]), cameras=(p["camera_id"],),
             frame_stride=p["fps_downsample_ratio"], action_scale=p["action_scaler"], gripper_scale=p["gripper_scale"],
             guidance=p["guidance"], save_fps=p["save_fps"], seed=p["start_frame_idx"], num_frames=p["chunk_size"] + 1,
             sigma_grid=grid, **({"frame_size": size} if size else {}))
    unhonoured = [f"{k}={p[k]!r}" for k in ("action_load_fn", "use_quat", "state_key", "gripper_key",
                                            "num_latent_conditional_frames") if p[k] != OFFICIAL_FIELDS[k]]
    unhonoured += [text for cond, text in (
        (p["reverse"], "reverse=true (unused by the official loader too)"),
        (p["seed"], f"seed={p['seed']} (the official action loop seeds chunk i with i and ignores it; so do we)"),
        ((p["prompt"] or p["prompt_path"]) and not c["text_embedding"],
         "prompt (no --text_embedding: the text input is zeros)"),
        (p["guidance"] and p["negative_prompt"] and not c["negative_text_embedding"],
         "negative_prompt (no --negative_text_embedding: zeros, the same as the prompt's text)"),
        (exp and exp not in KNOWN_EXPERIMENTS,
         f"--experiment {exp} (unknown: the configuration comes from the checkpoint, grid {grid})")) if cond]
    if unhonoured:
        print(f"warning: {params}: not honoured by nanocosmos: " + "; ".join(unhonoured))
    folder = Path(p["input_root"], p["input_json_sub_folder"])
    anns = sorted(folder.glob("*.json"))[p["start"]:p["end"]]
    if not anns:
        raise UserError(folder, f"no *.json annotations (start {p['start']}, end {p['end']} in {params})")
    outs = [Path(p["save_root"] or flags["output"]) / f"{a.stem}_{'single_' if single else ''}chunk.mp4" for a in anns]
    check_outputs([Path(flags["output"], "nanocosmos_settings.json")] + outs, overwrite=True)
    net, s, tok, common = setup(c)
    cfg, chunk_size = net.cfg, p["chunk_size"]   # the params' chunk size against the checkpoint's, before sampling
    if cfg.action_mode == "global" and cfg.num_actions != chunk_size:
        raise UserError(params, f"chunk_size={chunk_size}: the checkpoint takes {cfg.num_actions} actions per chunk")
    if cfg.action_mode == "per_frame" and chunk_size % 4:
        raise UserError(params, f"chunk_size={chunk_size}: must be a multiple of 4 (4 frames per latent frame)")
    how = "--sigma_grid" if explicit else f"as {exp} composes it" if exp in KNOWN_EXPERIMENTS else "default"
    print(f"official conventions: sigma grid {grid} ({how}), PIL Lanczos resize of the conditioning frame, "
          f"truncating uint8, zero-padded last chunk, written layout chunk 0's {p['chunk_size'] + 1} frames + frames "
          f"0-{p['chunk_size'] - 1} of each later chunk, save_fps {p['save_fps']}")
    Path(flags["output"], "nanocosmos_settings.json").write_text(json.dumps(
        dict(params=str(params), checkpoint=flags["checkpoint"], not_honoured=unhonoured, sigma_grid=grid,
             settings={**s, "num_steps": c["num_steps"], "shift": c["shift"], "guidance": c["guidance"]}), indent=1))
    written = []
    for ann, out in zip(anns, outs):
        if out.exists() and not c["overwrite"]:
            print(f"{out}: exists, skipped (as official; --overwrite replaces it)")
            continue
        frame, actions = load_episode(params, ann, p, s, Path(c["data_root"]))
        chunks = []
        sample.rollout(net, tok, frame[None], actions[None, :p["chunk_size"] if single else None], chunks=chunks,
                       official=True, progress=False, **common)
        video = official_layout(chunks)
        sample.save_video(out, video, fps=p["save_fps"])
        frames = f" and {sample.write_frames(out, video)}" if c["save_frames"] else ""
        print(f"{ann.stem}: {actions.shape[0]} actions, {len(chunks)} chunks -> {video.shape[2]} frames: wrote {out}"
              f" ({p['save_fps']} fps){frames}")
        written.append((out, video))
    return written


main = torch.no_grad()(official_run)   # (not set_grad_enabled: a caller in the same process keeps its gradients)
