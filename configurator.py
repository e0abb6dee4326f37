"""
nanoGPT-style configuration overrides. A script defines its defaults as plain module-level
variables, then calls

    _keys = config_keys(globals())      # right after the defaults
    ...
    config = configure(globals(), _keys, sys.argv[1:])

Arguments are applied in order:
    python train.py config/multiview_action.py --batch_size=4 --lr 1e-4
  - a path ending in .py is executed as Python and may assign any known key;
  - --key=value or --key value overrides one key. Values are parsed with ast.literal_eval and must have
    the type of the default (ints are accepted for floats; anything is accepted where the default is None);
    a bare word that is not a Python literal is taken as a string.
Tuples also take the plain shell forms 256x320, 0,1 and 0; a bare --flag sets a boolean key to True.
An unknown key is an error that names the key meant (by meaning or by spelling), so a typo never trains the wrong
model; a value of the wrong type, or a config file that does not run, is one line naming the key or the file's line.
"""

import ast
import difflib
import os
import re
import sys
import traceback


class UserError(ValueError):
    """The one error type of every command: a problem the user can fix, with the file, folder or setting it is
    about. str(e) is '<path>: <problem>'; the handler (exit_on_known_errors) prints it as one line."""

    def __init__(self, path, problem):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class MissingError(UserError, FileNotFoundError):
    """A file or folder that does not exist (catchable as FileNotFoundError too)."""


class ConfigError(UserError):
    """A bad setting; path is the setting as given (--key=value) or the config file."""

    def __init__(self, message, problem=None):
        if problem is None:           # ConfigError("--key: problem") from older call sites
            path, _, problem = message.partition(": ")
            if not problem:
                path, problem = "config", message
        else:
            path = message
        super().__init__(path, problem)


def config_keys(g):
    """The configuration keys of a script: its public module-level values of plain types. Call it right
    after the defaults, before the script defines anything else."""
    return sorted(k for k, v in g.items()
                  if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None))))


# words users type for a key, by meaning (difflib finds spelling slips, not these)
SYNONYMS = {"learning_rate": "lr", "lr_rate": "lr", "batch": "batch_size", "bs": "batch_size",
            "micro_batch_size": "batch_size", "steps": "max_iters", "max_steps": "max_iters", "iters": "max_iters",
            "num_steps": "max_iters", "iterations": "max_iters", "epochs": "max_iters",
            "grad_accumulation": "grad_accum", "gradient_accumulation_steps": "grad_accum",
            "accumulation_steps": "grad_accum", "wd": "weight_decay", "warmup": "warmup_iters",
            "warmup_steps": "warmup_iters", "resolution": "frame_size", "image_size": "frame_size",
            "size": "frame_size", "views": "cameras", "camera": "cameras", "frames": "num_frames",
            "checkpoint": "init_from", "ckpt": "init_from", "pretrained": "init_from", "init": "init_from",
            "output_dir": "out_dir", "out": "out_dir", "output": "out_dir", "precision": "dtype",
            "workers": "num_workers", "threads": "cpu_threads", "rank": "lora_rank", "lora": "lora_rank",
            "data": "data_root", "dataset": "data_root", "data_dir": "data_root", "clip": "grad_clip",
            "save_every": "save_interval", "eval_every": "eval_interval", "log_every": "log_interval",
            "steps_per_sample": "num_steps", "sampling_steps": "num_steps", "cfg": "guidance"}


def _suggest(key, keys):
    by_meaning = [SYNONYMS[key]] if SYNONYMS.get(key) in keys else []
    close = by_meaning or difflib.get_close_matches(key, keys, n=4, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else f" Valid keys: {', '.join(keys)}"


def _simple_form(text, default):
    """The plain shell forms of a tuple value: 256x320, 0,1 and 0 for (256, 320), (0, 1) and (0,)."""
    if not isinstance(default, tuple) or not re.fullmatch(r"[-\d.]+([x,][-\d.]+)*,?", text):
        return None
    parts = [p for p in re.split(r"[x,]", text) if p]
    try:
        return tuple(ast.literal_eval(p) for p in parts)
    except (ValueError, SyntaxError):
        return None


def _describe(default):
    if isinstance(default, tuple):
        return f"a tuple such as {default!r} (or {','.join(map(str, default)) or '0,1'})"
    return f"{type(default).__name__} (default {default!r})"


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
        raise UserError(where, f"expected {_describe(default)}, got {value!r}")
    return value


def _parse(key, text, default):
    value = _simple_form(text, default)
    if value is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word, e.g. --device=cuda
    return check_value(f"--{key}={text}", key, value, default)


def _run_config_file(path, g, keys):
    """Execute a config file and apply its assignments; its own errors become one line naming file and line."""
    if not os.path.isfile(path):
        raise UserError(path, "config file not found")
    print(f"config: {path}")
    scope = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), scope)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}", f"syntax error: {e.msg}") from None
    except Exception as e:   # noqa: BLE001 (a config file that raises: name its line)
        line = next((fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__)) if fr.filename == path), "?")
        raise UserError(f"{path}:{line}", f"{type(e).__name__}: {e}") from None
    for k, v in scope.items():
        if k.startswith("_") or callable(v) or type(v).__name__ == "module":
            continue
        if k not in keys:
            raise UserError(path, f"unknown config key {k!r}.{_suggest(k, keys)}")
        g[k] = check_value(f"{path}: {k}", k, v, g[k])


def configure(g, keys, argv, source=None):
    """Apply config files and --key=value overrides from argv to the dict g (a script's globals()), for the
    given keys (see config_keys). Returns {key: value} of all configuration keys after the overrides.
    --help / -h prints the keys of source (the script's file) with their defaults and comments, and exits."""
    if "--help" in argv or "-h" in argv:
        print(help_text(source or g.get("__file__", ""), {k: g[k] for k in keys}))
        sys.exit(0)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise UserError(repr(arg), "unexpected argument: expected a config file (*.py) or --key=value")
            _run_config_file(arg, g, keys)
            i += 1
            continue
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            i += 1
        else:
            key = body
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                if key in keys and isinstance(g[key], bool):    # a bare --flag sets a boolean key
                    g[key] = True
                    i += 1
                    continue
                raise UserError(f"--{key}", "needs a value (--key=value or --key value)")
            text = argv[i + 1]
            i += 2
        if key not in keys:
            raise UserError(f"--{key}", f"unknown config key.{_suggest(key, keys)}")
        g[key] = _parse(key, text, g[key])
    return {k: g[k] for k in keys}


def help_text(source, defaults):
    """The keys of a script's config block in file order, grouped under its comment headings, with defaults and
    the comment that follows each assignment."""
    lines = [f"usage: python {os.path.basename(source) or 'script.py'} [config/*.py ...] [--key=value ...]",
             "Keys (default, then what it does); tuples also take 0,1 or 256x320:"]
    try:
        text = open(source).read().splitlines()
    except OSError:
        text = []
    seen = set()
    for line in text:
        m = re.match(r"([a-z_][a-z0-9_]*)\s*=\s*(.*?)(?:\s+#\s*(.*))?$", line)
        if m and m.group(1) in defaults and m.group(1) not in seen:
            seen.add(m.group(1))
            lines.append(f"  --{m.group(1)}={defaults[m.group(1)]!r}" + (f"   {m.group(3)}" if m.group(3) else ""))
        elif line.startswith("# ") and not line.startswith("# ---") and seen:
            lines.append(line[2:])
    lines += [f"  --{k}={v!r}" for k, v in defaults.items() if k not in seen]
    return "\n".join(lines)


def known_error(e):
    """The one-line message of an error the user can fix, or None (unexpected: keep the traceback). Known: a
    UserError, a FileNotFoundError (its file named), or one of these raised in a DataLoader worker, which reaches
    the main process as an exception carrying the worker's traceback as text."""
    text = str(e)
    if "DataLoader worker" in text:
        m = re.search(r"\n\S*(?:UserError|ConfigError|FileNotFoundError): (.+?)\s*$", text)
        return m.group(1).strip() if m else None
    if isinstance(e, UserError):
        return text
    if isinstance(e, FileNotFoundError):
        return f"{e.filename}: {e.strerror}" if e.filename else text
    return None


def exit_on_known_errors(main, argv=None):
    """Run a script's main(argv): a known error (known_error) prints one line 'error: <path>: <problem>' on stderr
    and exits 1; anything unexpected keeps its traceback. The one handler of every command."""
    try:
        return main(argv)
    except Exception as e:   # noqa: BLE001 (re-raised unless known)
        msg = known_error(e)
        if msg is None:
            raise
        sys.exit(f"error: {msg}")


# -----------------------------------------------------------------------------
# what every command resolves the same way: device and precision, CPU threads and loader workers, and the
# defaults of another script's config block (read as text, so no script imports another for its defaults)

def resolve_device(device="auto", dtype="auto", local_rank=0):
    """(torch.device, bf16) for --device auto|cpu|cuda and --dtype auto|bfloat16|float32 ("" = auto): bf16
    autocast by default on CUDA, fp32 on CPU. TF32 is switched on for CUDA matmuls and convolutions."""
    import torch
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device={device!r}", "must be one of auto, cpu, cuda")
    if (dtype or "auto") not in ("auto", "bfloat16", "float32"):
        raise UserError(f"--dtype={dtype!r}", "must be one of auto, bfloat16, float32")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda", "no CUDA device is visible to this process")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return dev, dtype == "bfloat16" or ((dtype or "auto") == "auto" and cuda)


def cpu_budget(device_type, num_workers=-1, cpu_threads=0, tiny=False, local_world=1):
    """(loader workers, intra-op threads) from the cores this process may use (os.sched_getaffinity), so the
    loader and the maths never ask for more cores than there are, and sets torch's intra-op threads on CPU.
    num_workers < 0 and cpu_threads == 0 mean "choose". Tiny CPU models get one thread: their kernels are
    dominated by thread synchronisation (README, Performance)."""
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
    """The config block of a script (train.py's, say) as {key: value}: its module-level assignments of literal
    values, read from the file's text without importing it (a script that needs another's defaults must not
    import it: the scripts import each other in one direction only)."""
    tree = ast.parse(open(path).read(), path)
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.startswith("_"):
                continue
            try:
                out[name] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out
