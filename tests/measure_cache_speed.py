"""Training steps/s with and without the latent cache, with the Wan2.1 tokenizer architecture (random weights:
tokenizer_path empty) on 4 cameras. Not a test (minutes):
python tests/measure_cache_speed.py [--steps N] [--model_size tiny|small] [OUT]

Runs train.py three times on a small synthetic 4-camera world: online encoding, then --latent_cache (which builds the
cache, timed), then --latent_cache again (read only). Steps/s is taken from the log lines after the first
(start-up and the first batches excluded). The ratio is the figure that matters: the absolute numbers depend on
the machine and the tiny DiT; the encode cost per step is the same VAE work as on a GPU run, relative to a real DiT.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out, data_root, steps, size, *extra):
    args = [sys.executable, str(ROOT / "train.py"), f"--out_dir={out}", f"--data_root={data_root}",
            f"--synth_data_root={data_root}", "--synth_episodes=6", "--cameras=(0, 1, 2, 3)", "--tokenizer=wan2.1",
            "--tokenizer_path=", "--num_frames=13", "--frame_size=(32, 48)", "--start_stride=12", "--batch_size=2",
            f"--max_iters={steps}", f"--log_interval={steps // 2}", "--eval_interval=0", f"--save_interval={steps}",
            "--resume=False", "--save_consolidated=False", f"--model_size={size}", *extra]
    t0 = time.time()
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stdout[-3000:] + p.stderr[-3000:])
    log = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    rate = log[-1]["samples_per_s"] / 2           # the second half of the run: samples/s / batch size
    return rate, time.time() - t0, p.stdout


def main(argv):
    opt = lambda k, d: argv[argv.index(k) + 1] if k in argv else d  # noqa: E731
    steps, size = int(opt("--steps", 10)), opt("--model_size", "tiny")
    rest = [a for i, a in enumerate(argv) if not a.startswith("--") and not (i and argv[i - 1].startswith("--"))]
    out = Path(rest[0] if rest else "/tmp/measure_cache")
    data_root = out / "syn4"
    online, t_online, _ = run(out / "online", data_root, steps, size)
    _, t_build, log = run(out / "build", data_root, steps, size, f"--latent_cache={out / 'cache'}")
    cached, t_cached, _ = run(out / "cached", data_root, steps, size, f"--latent_cache={out / 'cache'}")
    cache_line = next((line for line in log.splitlines() if line.startswith("latent cache")), "")
    print(f"model_size {size} | machine: {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}")
    print(cache_line)
    print(f"online encoding: {online:.3f} steps/s ({t_online:.0f} s run)")
    print(f"latent cache:    {cached:.3f} steps/s ({t_cached:.0f} s run; the run that built it: {t_build:.0f} s)")
    print(f"ratio: {cached / online:.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
