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
An unknown key is an error that lists the closest valid keys, so a typo never trains the wrong model.
"""

import ast
import difflib
import os
import re
import sys


class UserError(ValueError):
    """The one error type of every command: a problem the user can fix, with the file, folder or setting it is
    about. str(e) is '<path>: <problem>'; the handler (exit_on_known_errors) prints it as one line."""

    def __init__(self, path, problem):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


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


def _suggest(key, keys):
    close = difflib.get_close_matches(key, keys, n=4, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else f" Valid keys: {', '.join(keys)}"


def _parse(key, text, default):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word, e.g. --device=cuda
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"--{key}: expected True or False, got {text!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(default, (int, float)) and isinstance(value, bool):
        raise ConfigError(f"--{key}: expected {type(default).__name__}, got {text!r}")
    if not isinstance(value, type(default)):
        raise ConfigError(f"--{key}: expected {type(default).__name__} (default {default!r}), got {text!r}")
    return value


def configure(g, keys, argv):
    """Apply config files and --key=value overrides from argv to the dict g (a script's globals()), for the
    given keys (see config_keys). Returns {key: value} of all configuration keys after the overrides."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise ConfigError(f"unexpected argument {arg!r}: expected a config file (*.py) or --key=value")
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: {arg}")
            print(f"config: {arg}")
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), scope)
            for k, v in scope.items():
                if k.startswith("_") or callable(v) or type(v).__name__ == "module":
                    continue
                if k not in keys:
                    raise ConfigError(f"{arg}: unknown config key {k!r}.{_suggest(k, keys)}")
                g[k] = v
            i += 1
            continue
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            i += 1
        else:
            key = body
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            text = argv[i + 1]
            i += 2
        if key not in keys:
            raise ConfigError(f"unknown config key {key!r}.{_suggest(key, keys)}")
        g[key] = _parse(key, text, g[key])
    return {k: g[k] for k in keys}


def known_error(e, known=()):
    """The one-line message of an error the user can fix, or None (unexpected: keep the traceback). Known: a
    ConfigError, a FileNotFoundError (its file named), an instance of a class in `known` (each script's error classes,
    whose str is '<file>: <problem>'), or one of these raised in a DataLoader worker, which reaches the main process
    as a RuntimeError carrying the worker's traceback as text."""
    if isinstance(e, (ConfigError, *known)):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return f"{e.filename}: {e.strerror}" if e.filename else str(e)
    names = "|".join(k.__name__ for k in (ConfigError, *known))
    m = re.search(rf"\n\S*(?:{names}): (.+)\s*$", str(e)) if "DataLoader worker" in str(e) else None
    return m.group(1).strip() if m else None


def exit_on_known_errors(main, argv=None, known=()):
    """Run a script's main(argv): a known error (known_error) prints one line 'error: <file>: <problem>' on stderr
    and exits 1; anything unexpected keeps its traceback. The one handler of every script but data.py's commands
    (data.py, a leaf below the scripts, catches its own DataError)."""
    try:
        return main(argv)
    except Exception as e:   # noqa: BLE001 (re-raised unless known)
        msg = known_error(e, known)
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
