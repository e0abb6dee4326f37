"""
nanoGPT-style configuration overrides: a script defines its defaults as module-level variables, then calls
`_keys = config_keys(globals())` right after them and `configure(globals(), _keys, sys.argv[1:])`.
Arguments apply in order (python train.py config/multiview_action.py --batch_size=4 --lr 1e-4): a *.py path is
executed and may assign any known key; --key=value or --key value is parsed with ast.literal_eval and must have the
default's type (ints pass for floats, anything where the default is None; a bare word is a string). Tuples also take
256x320, 0,1 and 0; a bare --flag sets a boolean to True. An unknown key names the key meant (by meaning or
spelling), so a typo never trains the wrong model; a bad value or config file is one line naming the key or line.
"""

import ast
import difflib
import os
import re
import sys
import traceback


class UserError(ValueError):
    """A problem the user can fix, with the file, folder or setting it is about: str(e) is '<path>: <problem>'."""

    def __init__(self, path, problem):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class MissingError(UserError, FileNotFoundError):
    """A file or folder that does not exist (catchable as FileNotFoundError too)."""


class ConfigError(UserError):
    """A bad setting; path is the setting as given (--key=value) or the config file."""

    def __init__(self, message, problem=None):
        if problem is None:   # ConfigError("<path>: <problem>"), or a bare problem (path "config")
            message, _, problem = message.partition(": ") if ": " in message else ("config", "", message)
        super().__init__(message, problem)


def config_keys(g):
    """A script's configuration keys: its public module-level values of plain types (call it right after them)."""
    return sorted(k for k, v in g.items()
                  if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None))))


# words users type for a key, by meaning (difflib finds spelling slips, not these)
SYNONYMS = {word: key for key, words in {
    "lr": "learning_rate lr_rate", "batch_size": "batch bs micro_batch_size",
    "max_iters": "steps max_steps iters num_steps iterations epochs",
    "grad_accum": "grad_accumulation gradient_accumulation_steps accumulation_steps", "weight_decay": "wd",
    "warmup_iters": "warmup warmup_steps", "frame_size": "resolution image_size size", "cameras": "views camera",
    "num_frames": "frames", "init_from": "checkpoint ckpt pretrained init", "out_dir": "output_dir out output",
    "dtype": "precision", "num_workers": "workers", "cpu_threads": "threads", "lora_rank": "rank lora",
    "data_root": "data dataset data_dir", "grad_clip": "clip", "save_interval": "save_every",
    "eval_interval": "eval_every", "log_interval": "log_every", "num_steps": "steps_per_sample sampling_steps",
    "guidance": "cfg"}.items() for word in words.split()}


def _suggest(key, keys):
    close = [SYNONYMS[key]] if SYNONYMS.get(key) in keys else difflib.get_close_matches(key, keys, n=4, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else f" Valid keys: {', '.join(keys)}"


def _simple_form(text, default):
    """The plain shell forms of a tuple value: 256x320, 0,1 and 0 for (256, 320), (0, 1) and (0,); else None."""
    if not isinstance(default, tuple) or not re.fullmatch(r"[-\d.]+([x,][-\d.]+)*,?", text):
        return None
    return tuple(ast.literal_eval(p) for p in re.split(r"[x,]", text) if p)


def check_value(where, key, value, default):
    """value converted to the type of default (int -> float, list -> tuple), or a UserError naming where."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(where, f"expected True or False, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(value, bool) and isinstance(default, (int, float)) or not isinstance(value, type(default)):
        want = (f"a tuple such as {default!r} (or {','.join(map(str, default)) or '0,1'})"
                if isinstance(default, tuple) else f"{type(default).__name__} (default {default!r})")
        raise UserError(where, f"expected {want}, got {value!r}")
    return value


def _parse(key, text, default):
    try:
        value = _simple_form(text, default) or ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word, e.g. --device=cuda
    return check_value(f"--{key}={text}", key, value, default)


def _run_config_file(path, g, keys):
    """Execute a config file and apply its assignments; its own errors become one line naming file and line."""
    if not os.path.isfile(path):
        raise UserError(path, "config file not found")
    print(f"config: {path}")
    scope, text = {}, open(path).read()
    try:
        exec(compile(text, path, "exec"), scope)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}", f"syntax error: {e.msg}") from None
    except Exception as e:   # noqa: BLE001 (a config file that raises: name its line)
        line = next((fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__)) if fr.filename == path), "?")
        raise UserError(f"{path}:{line}", f"{type(e).__name__}: {e}") from None
    lines = {t.id: n.lineno for n in ast.parse(text).body if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
             for t in getattr(n, "targets", [getattr(n, "target", None)]) if isinstance(t, ast.Name)}
    for k, v in scope.items():
        if not (k.startswith("_") or callable(v) or type(v).__name__ == "module"):
            SET_IN[k] = f"{path}:{lines.get(k, '?')}"
            if k not in keys:
                raise UserError(SET_IN[k], f"unknown config key {k!r}.{_suggest(k, keys)}")
            g[k] = check_value(f"{SET_IN[k]}: {k}", k, v, g[k])


SET_IN = {}   # key -> "file:line" of the config file that set it last (a later check's "--key=value" names it)


def configure(g, keys, argv, source=None):
    """Apply config files and --key=value overrides from argv to g (a script's globals()); returns {key: value}.
    --help / -h prints the keys of source (the script's file) with their defaults and comments, and exits."""
    if "--help" in argv or "-h" in argv:
        print(help_text(source or g.get("__file__", ""), {k: g[k] for k in keys}))
        sys.exit(0)
    i = 0
    SET_IN.clear()
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise UserError(repr(arg), "unexpected argument: expected a config file (*.py) or --key=value")
            _run_config_file(arg, g, keys)
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                text, i = argv[i], i + 1
            elif key in keys and isinstance(g[key], bool):    # a bare --flag sets a boolean key
                g[key] = True
                continue
            else:
                raise UserError(f"--{key}", "needs a value (--key=value or --key value)")
        if key not in keys:
            raise UserError(f"--{key}", f"unknown config key.{_suggest(key, keys)}")
        g[key], _ = _parse(key, text, g[key]), SET_IN.pop(key, None)
    return {k: g[k] for k in keys}


def help_text(source, defaults):
    """A script's keys in file order under its comment headings, with defaults and each assignment's comment."""
    lines = [f"usage: python {os.path.basename(source) or 'script.py'} [config/*.py ...] [--key=value ...]",
             "Keys (default, then what it does); tuples also take 0,1 or 256x320:"]
    seen = set()
    for line in (open(source).read().splitlines() if os.path.isfile(source) else []):
        m = re.match(r"([a-z_][a-z0-9_]*)\s*=\s*(.*?)(?:\s+#\s*(.*))?$", line)
        if m and m.group(1) in defaults and m.group(1) not in seen:
            seen.add(m.group(1))
            lines.append(f"  --{m.group(1)}={defaults[m.group(1)]!r}" + (f"   {m.group(3)}" if m.group(3) else ""))
        elif line.startswith("# ") and not line.startswith("# ---") and seen:
            lines.append(line[2:])
    lines += [f"  --{k}={v!r}" for k, v in defaults.items() if k not in seen]
    return "\n".join(lines)


def known_error(e):
    """The one-line message of a UserError or FileNotFoundError, also one raised in a DataLoader worker (it arrives
    with the worker's traceback as text); None for anything else (unexpected: keep the traceback)."""
    text = str(e)
    if "DataLoader worker" in text:
        m = re.search(r"\n\S*(?:UserError|ConfigError|FileNotFoundError): (.+?)\s*$", text)
        return m.group(1).strip() if m else None
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    return text if isinstance(e, (UserError, FileNotFoundError)) else None


def exit_on_known_errors(main, argv=None):
    """The one handler of every command: main(argv), a known error printed as 'error: <path>: <problem>' (exit 1)."""
    try:
        return main(argv)
    except BrokenPipeError:   # output piped into a reader that left (`--help | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as e:   # noqa: BLE001 (re-raised unless known)
        msg = known_error(e)
        if msg is None:
            raise
        key = re.match(r"--(\w+)=", msg)             # a setting's check: the config file and line that set it
        sys.exit(f"error: {SET_IN[key.group(1)]}: {msg}" if key and key.group(1) in SET_IN else f"error: {msg}")


# -----------------------------------------------------------------------------
# what every command resolves the same way: device and precision, CPU threads and workers, another script's defaults

def resolve_device(device="auto", dtype="auto", local_rank=0):
    """(torch.device, bf16) for --device auto|cpu|cuda and --dtype auto|bfloat16|float32 ("" = auto): bf16 by
    default on CUDA (with TF32 matmuls and convolutions), fp32 on CPU."""
    import torch
    dtype = dtype or "auto"
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device={device!r}", "must be one of auto, cpu, cuda")
    if dtype not in ("auto", "bfloat16", "float32"):
        raise UserError(f"--dtype={dtype!r}", "must be one of auto, bfloat16, float32")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda", "no CUDA device is visible to this process")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(f"cuda:{local_rank}" if cuda else "cpu"), dtype == "bfloat16" or (dtype == "auto" and cuda)


def cpu_budget(device_type, num_workers=-1, cpu_threads=0, tiny=False, local_world=1):
    """(loader workers, intra-op threads) within the cores this process may use; sets torch's threads on CPU.
    num_workers < 0 and cpu_threads == 0 mean "choose". Tiny CPU models get one thread (README, Performance)."""
    import torch
    cores = max(1, len(os.sched_getaffinity(0)) // max(1, local_world))
    if device_type == "cuda":
        workers = min(8, cores) if num_workers < 0 else num_workers
        return workers, cpu_threads or max(1, cores - workers)
    threads = cpu_threads or (1 if tiny else max(1, cores - 1))
    workers = max(0, min(4, cores - threads)) if num_workers < 0 else num_workers
    torch.set_num_threads(threads)
    return workers, threads


def script_defaults(path):
    """A script's config block as {key: value}: its module-level literal assignments, read from the file's text
    (scripts import each other in one direction only, so none imports another for its defaults)."""
    out = {}
    for node in ast.parse(open(path).read(), path).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and not node.targets[0].id.startswith("_"):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out
