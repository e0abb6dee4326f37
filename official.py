"""
The Cosmos-Predict2.5 action guide's command on nanocosmos: `python sample.py -i inference_params.json -o OUT
--checkpoint-path FILE [--experiment NAME]` (sample.py dispatches here with runpy; this file imports sample, sample
never imports it). In this mode every convention follows the official command so that the frames equal the
official tool's (tests/fixtures/e2e_action_p25: sigma grid by experiment, PIL Lanczos resize, truncating uint8,
zero-padded last chunk, the official written layout, save_fps).
"""
import json
from pathlib import Path

import torch

import sample
from configurator import ConfigError
from sample import check_outputs, file_job, parse_args, read_json, run_jobs, setup

# the Cosmos-Predict2.5 action guide's command: -i inference_params.json -o OUT --checkpoint-path CKPT

# ActionConditionedInferenceArguments (cosmos_predict2/action_conditioned_config.py) and its defaults
OFFICIAL_FIELDS = dict(name="", input_root=None, input_json_sub_folder=None, save_root="", chunk_size=12, guidance=7,
                       resolution="none", camera_id=0, start=0, end=100, fps_downsample_ratio=1, gripper_scale=1.0,
                       gripper_key="continuous_gripper_state", state_key="state", reverse=False, single_chunk=False,
                       start_frame_idx=0, save_fps=20, num_latent_conditional_frames=1, action_scaler=20.0,
                       use_quat=False, action_load_fn="cosmos_predict2.action_conditioned.load_default_action_fn",
                       seed=0, prompt=None, prompt_path=None, negative_prompt=None)
KNOWN_EXPERIMENTS = ("ac_reason_embeddings_rectified_flow_2b_256_320",   # the guide's post-training experiment
                     "cosmos_predict2p5_2B_reason_embeddings_action_conditioned_rectified_flow_bridge_13frame_256x320")
_OFFICIAL_FLAGS = {"-i": "input", "--input-file": "input", "-o": "output", "--output-dir": "output",
                   "--checkpoint-path": "checkpoint", "--experiment": "experiment"}


def official_params(argv):
    """(the official flags, inference_params.json with its defaults, the nanocosmos --key=value options left)."""
    flags, rest, k = {}, [], 0
    while k < len(argv):
        key, eq, val = argv[k].partition("=")
        if key in _OFFICIAL_FLAGS:
            if not eq:
                k += 1
                if k == len(argv):
                    raise ConfigError(f"{key} needs a value")
                val = argv[k]
            flags[_OFFICIAL_FLAGS[key]] = val
        else:
            rest.append(argv[k])
        k += 1
    for need, flag in (("input", "-i"), ("output", "-o"), ("checkpoint", "--checkpoint-path")):
        if need not in flags:
            raise ConfigError(f"the official command needs {flag} (nanocosmos downloads no released checkpoint)")
    path = Path(flags["input"])
    p = read_json(path)
    unknown = sorted(set(p) - set(OFFICIAL_FIELDS)) if isinstance(p, dict) else None
    if unknown is None or unknown or p.get("input_root") is None or p.get("input_json_sub_folder") is None:
        raise ConfigError(f"{path}: an inference_params.json object needs input_root and input_json_sub_folder"
                          + (f"; unknown fields {unknown}" if unknown else ""))
    return flags, {**OFFICIAL_FIELDS, **p}, rest


def official_run(argv):
    """
    `python sample.py -i inference_params.json -o OUT --checkpoint-path model_ema_bf16.pt [--experiment NAME]
    [--key=value ...]`: the official action inference (examples/action_conditioned.py ->
    cosmos_predict2/action_conditioned.py) on nanocosmos. Annotations: input_root/input_json_sub_folder/*.json,
    sorted, [start:end]; camera_id picks json["videos"][camera_id] under input_root; actions from state_key /
    gripper_key every fps_downsample_ratio-th row, scaled by action_scaler (xyz, rpy) and gripper_scale; resolution
    "H,W" (or "none": the model's); the rollout starts at (downsampled) frame start_frame_idx, chunk i seeded with
    its first action index as official (which ignores `seed`); single_chunk stops after one chunk; videos go to
    save_root (or OUT) as <name>_chunk.mp4 (<name>_single_chunk.mp4), at save_fps, and an existing one is skipped
    unless --overwrite, as official. Unlike official, the video is time-aligned (frame k = time step k; official
    repeats each chunk's conditioning frame and drops its last). OUT receives nanocosmos_settings.json. Fields that
    cannot be honoured (a custom action_load_fn, quaternion actions, other JSON keys, a prompt without
    --text_embedding, ...) are named in one warning. --experiment is not needed: the configuration comes from the
    checkpoint (run config, else its shapes and family).
    """
    flags, p, rest = official_params(argv)
    c = parse_args(rest)
    single, sfi, cam = bool(p["single_chunk"]), int(p["start_frame_idx"]), p["camera_id"]
    if not str(cam).isdigit():
        raise ConfigError(f"{flags['input']}: camera_id must be an index into json['videos'], got {cam!r}")
    c.update(dit_path=flags["checkpoint"], data_root=str(p["input_root"]), cameras=(int(cam),),
             frame_stride=int(p["fps_downsample_ratio"]), action_scale=float(p["action_scaler"]),
             gripper_scale=float(p["gripper_scale"]), guidance=float(p["guidance"]), save_fps=int(p["save_fps"]),
             seed=sfi, num_frames=int(p["chunk_size"]) + 1, max_actions=int(p["chunk_size"]) if single else 0)
    if str(p["resolution"]).lower() != "none":
        c["frame_size"] = tuple(int(x) for x in str(p["resolution"]).split(","))
    unhonoured = [f"{k}={p[k]!r}" for k in ("action_load_fn", "use_quat", "state_key", "gripper_key",
                                            "num_latent_conditional_frames") if p[k] != OFFICIAL_FIELDS[k]]
    if p["reverse"]:
        unhonoured.append("reverse=true (unused by the official loader too)")
    if p["seed"]:
        unhonoured.append(f"seed={p['seed']} (the official action loop seeds chunk i with i and ignores it; so do we)")
    if (p["prompt"] or p["prompt_path"]) and not c["text_embedding"]:
        unhonoured.append("prompt (no --text_embedding: the text input is zeros)")
    if p["guidance"] and p["negative_prompt"] and not c["negative_text_embedding"]:
        unhonoured.append("negative_prompt (no --negative_text_embedding: zeros, the same as the prompt's text)")
    if flags.get("experiment") and flags["experiment"] not in KNOWN_EXPERIMENTS:
        unhonoured.append(f"--experiment {flags['experiment']} (the configuration comes from the checkpoint)")
    if unhonoured:
        print(f"warning: {flags['input']}: not honoured by nanocosmos: " + "; ".join(unhonoured))
    anns = sorted(Path(p["input_root"], p["input_json_sub_folder"]).glob("*.json"))[int(p["start"]):int(p["end"])]
    if not anns:
        raise ConfigError(f"{Path(p['input_root'], p['input_json_sub_folder'])}: no *.json annotations "
                          f"(start {p['start']}, end {p['end']})")
    save_root = Path(p["save_root"] or flags["output"])
    outs = [save_root / f"{a.stem}_{'single_' if single else ''}chunk.mp4" for a in anns]
    check_outputs([Path(flags["output"], "nanocosmos_settings.json")] + outs, overwrite=True)
    net, s, tok, common = setup(c)
    for o in outs:
        if o.exists() and not c["overwrite"]:
            print(f"{o}: exists, skipped (as official; --overwrite replaces it)")
    jobs = [file_job(a, "", o, c["data_root"]) for a, o in zip(anns, outs) if c["overwrite"] or not o.exists()]
    Path(flags["output"], "nanocosmos_settings.json").write_text(json.dumps(
        dict(params=str(flags["input"]), checkpoint=flags["checkpoint"], not_honoured=unhonoured,
             settings={**s, "num_steps": c["num_steps"], "shift": c["shift"], "guidance": c["guidance"]}), indent=1))
    return run_jobs(jobs, net, tok, common, c, s, start_frame=sfi)


main = torch.no_grad()(official_run)   # (not set_grad_enabled: a caller in the same process keeps its gradients)
