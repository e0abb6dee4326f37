"""The README's commands run. Every `python X.py` / `torchrun` line of its bash blocks names a real script and real
config keys; every train.py command plans its run (`--dry_run=True`: no data, no weights, no GPU); the quick start
(train -> sample -> export -> check) runs end to end on tiny settings."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sample
import train

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands(text=README):
    """The command lines of the bash blocks of text: continuations joined, comments dropped, loops unrolled to
    their first values (`for x in A B` -> $x = A)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        loop_vars = dict(re.findall(r"for (\w+) in (\S+)", text))
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            line = re.sub(r"^for \w+ in .*?; do ", "", line)
            line = re.sub(r"\s*\|.*$", "", line)                          # `| grep ...`
            line = re.sub(r";?\s*done.*$", "", line).strip()
            for k, v in loop_vars.items():
                line = line.replace(f"${k}", v)
            if line.startswith(("python ", "torchrun ")):
                out.append(line)
    return out


COMMANDS = commands()
_SECTION = README.split("## Sampling and evaluation", 1)[1]
SAMPLING = commands(_SECTION[:_SECTION.index("```", _SECTION.index("```bash") + 7) + 3])   # its first block
TRAIN = [c for c in COMMANDS if " train.py" in c]


def argv_of(cmd):
    words = shlex.split(cmd)
    script = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return words[script], words[script + 1:]


def test_readme_is_short_and_its_commands_name_real_things():
    assert len(README.splitlines()) < 300, "a newcomer should finish the README"
    assert len(COMMANDS) >= 15 and TRAIN, COMMANDS
    for cmd in COMMANDS:
        if cmd.startswith("python -m"):
            continue
        script, args = argv_of(cmd)
        assert (ROOT / script).is_file(), cmd
        for a in args:
            if a.endswith(".py"):
                assert (ROOT / a).is_file(), f"{cmd}: {a} does not exist"
        keys = {"train.py": train._CONFIG_KEYS, "sample.py": sample._KEYS}.get(script)
        for a in args if keys else []:
            if a.startswith("--") and a not in ("--checkpoint-path",):
                assert a[2:].split("=")[0] in keys, f"{cmd}: unknown key {a}"
    for picture in re.findall(r"!\[[^]]*\]\(([^)]+)\)", README):
        assert (ROOT / picture).is_file(), picture


@pytest.mark.parametrize("cmd", TRAIN, ids=[f"train{i}" for i in range(len(TRAIN))])
def test_readme_train_commands_plan_their_run(cmd):
    """Each train.py command of the README, as a dry run: its config and keys are valid and the plan prints."""
    _, args = argv_of(cmd)
    gpus = re.search(r"--nproc_per_node=(\d+)", cmd)
    args = [a for a in args if not a.startswith("--dry_run")] + ["--dry_run=True"]
    args += [f"--plan_gpus={gpus.group(1)}"] if gpus else []
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert "memory per GPU" in p.stdout and "dry run" in p.stdout


def test_readme_quick_start_runs(tmp_path):
    """The quick start as a new user runs it, on tiny settings: train, sample, export, check; then the Sampling
    block's commands in order, as written (a taken default output name moves to the next free one), its Bridge
    line on a Bridge-layout copy of a synthetic val episode."""
    quick = [c for c in COMMANDS if c.split()[:2] in (["python", "train.py"], ["python", "sample.py"])][:2]
    assert quick == ["python train.py", "python sample.py --compare"], quick
    tiny = ["--max_iters=4", "--eval_interval=4", "--save_interval=4", "--log_interval=2", "--synth_episodes=16",
            "--batch_size=2"]

    def run(*args):
        p = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, f"{args}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        return p.stdout

    out = run("train.py", *tiny)
    assert "python sample.py" in out                         # the run ends with the next command
    run("sample.py", "--compare", "--num_steps=2")
    assert (tmp_path / "output" / "sample.mp4").is_file() and (tmp_path / "output" / "sample.png").is_file()
    run("convert.py", "export", "out/synthetic/checkpoints", "release/")
    assert (tmp_path / "release" / "model_ema_bf16.pt").is_file()
    assert "OK" in run("data.py", "check", "datasets/synthetic", "--cameras", "0,1")
    syn, bridge = tmp_path / "datasets" / "synthetic", tmp_path / "datasets" / "bridge"
    ann = json.loads((syn / "annotations" / "val" / "ep00012.json").read_text())
    ann["videos"] = [{"video_path": f"videos/test/0/rgb{k}.mp4"} for k in range(2)]
    for k in range(2):
        (bridge / "videos" / "test" / "0").mkdir(parents=True, exist_ok=True)
        shutil.copy(syn / "videos" / f"cam{k}" / "ep00012.mp4", bridge / "videos" / "test" / "0" / f"rgb{k}.mp4")
    (bridge / "annotation" / "test").mkdir(parents=True)
    (bridge / "annotation" / "test" / "0.json").write_text(json.dumps(ann))
    assert len(SAMPLING) == 4 and SAMPLING[0] == "python sample.py", SAMPLING
    outs = [run(argv_of(cmd)[0], *argv_of(cmd)[1], "--num_steps=2") for cmd in SAMPLING]
    assert "output/sample.mp4 exists: writing output/sample_1.mp4" in outs[0]
    assert "wrote output/sample_2.mp4" in outs[1] and "wrote output/eval.json" in outs[2]
    assert "wrote output/sample_3.mp4" in outs[3]
    assert all((tmp_path / "output" / f"sample_{i}.png").is_file() for i in (1, 2, 3))
