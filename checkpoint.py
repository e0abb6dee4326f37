"""
Training checkpoints: what train.py saves, resumes from and loads at start (init_from).

    out_dir/checkpoints/iter_XXXXXXXXX/        torch.distributed.checkpoint (DCP): model, optimizer, EMA, schedule,
                                               step; every rank writes its own share; resumable with any process count
    out_dir/checkpoints/latest_checkpoint.txt  the newest complete one (written last, atomically)
    out_dir/checkpoints/model/iter_X.pt        the consolidated EMA weights {"net.<key>": fp32} (official format;
                                               under LoRA iter_X.safetensors, the adapter) and iter_X.json, its config

A save goes to iter_X.tmp and is renamed when complete, so a killed run leaves the previous checkpoint intact.
Rank 0 writes the consolidated file in a background thread (the other ranks never wait in a barrier for it, so a
long write cannot trip the collective timeout); a resume that finds it missing (a kill during that write) writes it.
A full disk is one line naming what was being written and the checkpoint that is still intact.
"""

import errno
import json
import os
import shutil
import threading

import numpy as np
import torch
import torch.distributed as dist

import lora
import model
from configurator import UserError


def prepare_out_dir(out_dir, rank, barrier):
    """Check out_dir is writable before any work, and remove what a crashed save left (.tmp files and dirs)."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if rank == 0:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            probe = os.path.join(ckpt_dir, ".write_test")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise UserError(out_dir, f"out_dir is not writable ({e.strerror})") from None
        for d in (ckpt_dir, os.path.join(ckpt_dir, "model")):
            for name in os.listdir(d) if os.path.isdir(d) else []:
                if ".tmp" in name:
                    p = os.path.join(d, name)
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
    barrier()
    return ckpt_dir


def checkpoints(ckpt_dir):
    return sorted(d for d in os.listdir(ckpt_dir) if d.startswith("iter_") and ".tmp" not in d) \
        if os.path.isdir(ckpt_dir) else []


def problem(path):
    """What is wrong with a training checkpoint folder (None: it can be resumed)."""
    import convert
    try:
        json.load(open(os.path.join(path, "config.json")))
    except (OSError, ValueError) as e:
        return f"config.json is unreadable ({type(e).__name__})"
    return convert.dcp_problem(path)


def latest(ckpt_dir, resume_from=""):
    """The checkpoint to resume from (None: none yet). resume_from "" is the latest; "previous" the newest intact
    one; anything else a checkpoint folder. A damaged latest checkpoint is an error naming the intact one."""
    if resume_from not in ("", "previous"):
        bad = problem(resume_from) if os.path.isdir(resume_from) else "not a checkpoint folder"
        if bad:
            raise UserError(resume_from, f"resume_from: {bad}")
        return resume_from
    f = os.path.join(ckpt_dir, "latest_checkpoint.txt")
    names = checkpoints(ckpt_dir)
    if resume_from == "previous":
        intact = [n for n in names if not problem(os.path.join(ckpt_dir, n))]
        return os.path.join(ckpt_dir, intact[-1]) if intact else None
    if not os.path.exists(f):
        return None
    name = open(f).read().strip()
    path = os.path.join(ckpt_dir, name)
    if not name:
        where, bad = f, "is empty"
    elif not os.path.isdir(path):
        where, bad = f, f"names {name}, which does not exist"
    else:
        where, bad = path, problem(path)
    if bad:
        intact = [n for n in names if n != name and not problem(os.path.join(ckpt_dir, n))]
        raise UserError(where, f"a damaged checkpoint: {bad}" + (
            f"; {intact[-1]} is intact: resume from it with --resume_from=previous" if intact else
            "; no intact checkpoint is left: --resume=False starts over"))
    return path


def disk_full(e):
    """Whether an exception (or one it wraps: DCP gathers the ranks' failures) is a full disk."""
    seen = [e]
    while seen:
        x = seen.pop()
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if any(m in str(x) for m in ("No space left on device", "File too large", "unexpected pos")):
            return True             # "unexpected pos": torch.save's zip writer after a short write
        seen += [y for y in (x.__cause__, x.__context__) if y is not None]
        seen += [v[0] if isinstance(v, tuple) else v for v in getattr(x, "failures", {}).values()]   # (exc, trace)
    return False


def dcp_options(raw, load=False):
    """LoRA: the checkpoints hold the trainable tensors only (the frozen base is init_from, fingerprinted)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=lora.enabled(raw), strict=not (lora.enabled(raw) and load))


def gather_full(tensors, rank):
    """Full fp32 CPU copies of (possibly FSDP-sharded) tensors, on rank 0 (full_tensor is collective)."""
    out = {}
    for k, v in tensors.items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        if rank == 0:
            out[k] = v.detach().float().cpu().clone()
    return out


class Saver:
    """Owns the checkpoint policy: save(step) writes the training checkpoint and the consolidated file, applies
    keep_last / keep_consolidated; resume(path, ...) restores a run exactly."""

    def __init__(self, c, run_cfg, raw, opt, sched, ema_names, ema_params, global_batch, rank, world, barrier):
        self.c, self.run_cfg, self.raw, self.opt, self.sched = c, run_cfg, raw, opt, sched
        self.ema_names, self.ema_params, self.G = ema_names, ema_params, global_batch
        self.rank, self.world, self.barrier = rank, world, barrier
        self.dir = os.path.join(c["out_dir"], "checkpoints")
        self.last_good, self.writer, self.write_error = None, None, None

    def state(self, step):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.raw, self.opt, options=dcp_options(self.raw))
        return {"model": model_sd, "optim": optim_sd, "ema": dict(zip(self.ema_names, self.ema_params)),
                "scheduler": self.sched.state_dict(), "trainer": {"step": step, "global_batch": self.G}}

    def consolidated_tensors(self):
        """The EMA weights (or, without EMA, the weights themselves) the consolidated file holds."""
        if self.ema_params:
            return dict(zip(self.ema_names, self.ema_params))
        keep = set(self.ema_names)
        return {n: p for n, p in self.raw.named_parameters() if n in keep}

    def consolidated_path(self, step):
        path = os.path.join(self.dir, "model", f"iter_{step:09d}" + (".safetensors" if lora.enabled(self.raw) else ".pt"))
        return path if os.path.exists(path) else None

    def save(self, step):
        import torch.distributed.checkpoint as dcp
        self.finish()                                   # the previous consolidated write, if still running
        name = f"iter_{step:09d}"
        final, tmp = os.path.join(self.dir, name), os.path.join(self.dir, name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.barrier()
        try:
            dcp.save(self.state(step), checkpoint_id=tmp, no_dist=not dist.is_initialized())
            torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                       os.path.join(tmp, f"rng_rank{self.rank:05d}.pt"))
            cfg_json = {**self.run_cfg, "step": step, "world_size": self.world}
            if self.rank == 0:
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(cfg_json, f, indent=1)
        except (Exception, dcp.api.CheckpointException) as e:     # the latter is a BaseException
            self.failed(e, tmp)
        full = gather_full(self.consolidated_tensors(), self.rank) if self.c["save_consolidated"] else None
        self.barrier()                                  # every rank's share is on disk
        if self.rank == 0:
            if os.path.exists(final):                   # re-saving the same step (e.g. a rerun): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)                      # the checkpoint exists only once it is complete
            with open(os.path.join(self.dir, "latest_checkpoint.txt.tmp"), "w") as f:
                f.write(name)
            os.replace(os.path.join(self.dir, "latest_checkpoint.txt.tmp"), os.path.join(self.dir, "latest_checkpoint.txt"))
            for d in checkpoints(self.dir)[:-self.c["keep_last"]] if self.c["keep_last"] > 0 else []:
                shutil.rmtree(os.path.join(self.dir, d))
            if full is not None:                        # rank 0 alone, in the background: nobody waits for it
                self.writer = threading.Thread(target=self.write_consolidated, args=(full, cfg_json, step))
                self.writer.start()
        self.last_good = final
        return final

    def failed(self, e, tmp):
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise UserError(tmp, f"no space left on device writing this checkpoint (removed): the previous "
                                 f"checkpoint {self.last_good or latest(self.dir) or '(none)'} is intact") from None
        raise e

    def write_consolidated(self, full, cfg_json, step):
        try:
            write_consolidated(self.dir, full, cfg_json, step, lora.enabled(self.raw))
            keep_consolidated(os.path.join(self.dir, "model"), self.c["keep_consolidated"],
                              self.c["keep_consolidated_every"])
        except Exception as e:  # noqa: BLE001 (re-raised in the training thread by finish)
            self.write_error = e, os.path.join(self.dir, "model", f"iter_{step:09d}")

    def finish(self):
        """Wait for a background consolidated write; its failure is raised here, in the training thread."""
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        if self.write_error is not None:
            (e, name), self.write_error = self.write_error, None
            if disk_full(e):
                raise UserError(name + (".safetensors" if lora.enabled(self.raw) else ".pt"), f"no space left on "
                                f"device writing the consolidated weights (removed): the training checkpoint "
                                f"{self.last_good} is intact (a resume writes them)") from None
            raise e

    def resume(self, path, lr, lr_factor, say):
        """(step, data position in steps of the current global batch) from the checkpoint at path."""
        lora.check_resume(path, self.raw)
        step, saved_G = self.load(path)
        say(f"resumed from {path} at step {step}")
        self.last_good = path
        if self.sched.base_lrs[0] != lr:      # the config wins over the saved optimizer's lr
            say(f"lr changed {self.sched.base_lrs[0]:g} -> {lr:g}")
            self.sched.base_lrs = [lr] * len(self.sched.base_lrs)
            for group in self.opt.param_groups:
                group["lr"] = lr * lr_factor(step)
        if self.c["save_consolidated"] and not self.consolidated_path(step):   # lost to a kill during its write
            say(f"writing the missing consolidated weights of step {step}")
            full = gather_full(self.consolidated_tensors(), self.rank)
            if self.rank == 0:
                write_consolidated(self.dir, full, {**self.run_cfg, "step": step, "world_size": self.world}, step,
                                   lora.enabled(self.raw))
        if saved_G != self.G:
            say(f"warning: global batch changed {saved_G} -> {self.G}: the data position is kept in samples, not steps")
            return step, step * saved_G // self.G
        return step, step

    def load(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self.state(0)
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        set_state_dict(self.raw, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=dcp_options(self.raw, load=True))
        self.sched.load_state_dict(state["scheduler"])
        # state["ema"] holds the very tensors of ema_params: dcp.load filled them in place
        rng = os.path.join(path, f"rng_rank{self.rank:05d}.pt")
        if os.path.exists(rng) and json.load(open(os.path.join(path, "config.json")))["world_size"] == self.world:
            r = torch.load(rng, weights_only=False)
            torch.set_rng_state(r["torch"])
            np.random.set_state(r["numpy"])
            if r["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(r["cuda"])
        return state["trainer"]["step"], state["trainer"]["global_batch"]


def write_consolidated(ckpt_dir, full, cfg_json, step, is_lora):
    """model/iter_X.pt ({"net.<key>": fp32}) or, under LoRA, the adapter iter_X.safetensors; then iter_X.json.
    Through a .tmp name: a file that exists is complete."""
    import convert
    mdir, name = os.path.join(ckpt_dir, "model"), f"iter_{step:09d}"
    os.makedirs(mdir, exist_ok=True)
    path = os.path.join(mdir, name + (".safetensors" if is_lora else ".pt"))
    try:
        convert.save_weights(convert.prefixed(full), path,        # through path.tmp, renamed when complete
                             metadata=convert.adapter_metadata(cfg_json) if is_lora else None, say=None)
        with open(os.path.join(mdir, name + ".json"), "w") as f:
            json.dump(cfg_json, f, indent=1)
    except BaseException:
        for p in (path + ".tmp",):
            if os.path.exists(p):
                os.remove(p)
        raise


def keep_consolidated(mdir, last, every):
    """Delete consolidated files but the `last` newest and those of steps that are multiples of `every`."""
    files = sorted(f for f in os.listdir(mdir) if f.startswith("iter_") and f.endswith((".pt", ".safetensors")))
    if last <= 0:
        return
    for f in files[:-last]:
        step = int(f[5:14])
        if not (every > 0 and step % every == 0):
            for p in (f, f.rsplit(".", 1)[0] + ".json"):
                if os.path.exists(os.path.join(mdir, p)):
                    os.remove(os.path.join(mdir, p))


# -----------------------------------------------------------------------------
# init_from: the weights a run starts from

def load_init(raw, c, say):
    """Load c["init_from"] into raw: only the grown heads (model.NEW_HEADS: action MLPs, view-embedding columns)
    may be missing; anything else is an error naming the keys and the likely fix, unless init_strict=False."""
    import convert
    path = c["init_from"]
    sd, src = convert.load_weights(path, ema=c["init_ema"])
    if c["lora_rank"] and (src or {}).get("lora"):   # a LoRA base must be one file (the checkpoints record it)
        raise UserError(path, f"init_from is a LoRA run's adapter or checkpoint (factors on {src['lora']['base']}), "
                              f"not base weights: pass its merged export (python convert.py export {path} DEST) "
                              f"or, to start again from its base, {src['lora']['base']}")
    try:
        missing, unexpected, regrown = model.load_into(raw, sd, strict=False, grow=True)
    except ValueError as e:      # a shape mismatch: another model size or text width
        raise UserError(path, f"{e} (check model_size and crossattn_proj_in_channels)") from None
    new = tuple(p for prefixes in model.NEW_HEADS.values() for p in prefixes)
    grown = regrown + [k for k in missing if k.startswith(new)]
    missing = [k for k in missing if not k.startswith(new)]
    if missing or unexpected:
        msg = (f"{len(missing)} model weights missing from the file ({', '.join(sorted(missing)[:4])}"
               f"{' ...' if len(missing) > 4 else ''}), {len(unexpected)} unexpected "
               f"({', '.join(sorted(unexpected)[:4])}{' ...' if len(unexpected) > 4 else ''})"
               + init_hint(raw.state_dict().keys(), sd, missing, unexpected))
        if c["init_strict"]:
            raise UserError(path, msg + "; init_strict=False loads what matches")
        say(f"warning: init_from {path}: partial load: {msg}")
    say(f"init_from {path}: {len(sd) - len(unexpected)} tensors loaded"
        + (f", grown as no-ops: {', '.join(sorted(grown))}" if grown else ""))
    # settings no tensor shape reveals: a mismatch silently changes what the released weights compute
    for k, v in ((src or {}).get("model") or {}).items():
        if (k.startswith("rope_") or k == "timestep_scale") and v != getattr(raw.cfg, k):
            say(f"  warning: {k} is {getattr(raw.cfg, k)} here but {v} in {path}'s config")


def init_hint(model_keys, sd, missing, unexpected):
    """The likeliest fix for a state dict that does not match the model."""
    heads = {k.split(".", 1)[0] for k in unexpected if "." in k}
    if len(heads) == 1 and unexpected:
        prefix = heads.pop() + "."
        if all(k.startswith(prefix) for k in sd) and any(k[len(prefix):] in model_keys for k in sd):
            return f": keys start with {prefix!r}: strip that prefix"
    if "crossattn_proj.0.weight" in unexpected:
        return (f": the file has Predict2.5's text projection: set "
                f"crossattn_proj_in_channels={sd['crossattn_proj.0.weight'].shape[1]}")
    if any(k.startswith("crossattn_proj.") for k in missing):
        return ": the file has no text projection (Predict2): set crossattn_proj_in_channels=0"
    return ""
