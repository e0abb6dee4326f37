#!/usr/bin/env bash
# The GPU check: every benchmark of nanocosmos on one GPU, random weights, no downloads, in about 8 minutes on an
# H100/H200, ending in one table (step time, MFU measured vs the op count's prediction, peak memory vs the plan).
#   bash bench_gpu.sh            # on a CUDA machine; writes bench_gpu.log
#   bash bench_gpu.sh --smoke    # the same commands at a tiny size on the CPU, to check the script itself (~2 min)
set -uo pipefail
cd "$(dirname "$0")"
LOG=${LOG:-bench_gpu.log}
: > "$LOG"
if [ "${1:-}" = "--smoke" ]; then
  MAIN="--model_size=tiny --cameras=(0,1) --frame_size=(32,48) --tokenizer=pixel --tokenizer_path= --device=cpu"
  PLAN_GPU="H100 SXM"; VAE="--size 64x80 --frames 5 --views 1 --device cpu --dtype fp32"; SAMPLE="--model_size=2B --device=cpu"
  RUN="--model_size=tiny --max_iters=4 --device=cpu"; SAMPLE_OK=0
else
  MAIN=""
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  case "$name" in *H200*) PLAN_GPU="H200";; *PCIe*) PLAN_GPU="H100 PCIe";; *H100*) PLAN_GPU="H100 SXM";;
                  *A100*) PLAN_GPU="A100 80GB";; *L40S*) PLAN_GPU="L40S";; *4090*) PLAN_GPU="RTX 4090";; *) PLAN_GPU="H100 SXM";; esac
  VAE="--size 256x320 --frames 13 --views 4 --dtype both"; SAMPLE="--model_size=2B"
  RUN="--model_size=small --frame_size=(128,160) --cameras=(0,1,2,3) --max_iters=20 --log_interval=5"; SAMPLE_OK=1
fi

step() {   # step <label> <timeout s> <command...>: runs it, its output in the log under the label
  local label=$1 limit=$2; shift 2
  echo "== $label: $*" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1; echo "== $label: exit $?" | tee -a "$LOG"
}

TRAIN="python train.py config/multiview_action.py --init_from= --plan_gpus=1 --parallel=ddp $MAIN"
for ck in True False; do
  step "plan ckpt=$ck" 120 $TRAIN --dry_run=True --activation_checkpointing=$ck --plan_gpu="$PLAN_GPU"
  step "plan ckpt=$ck compiled" 120 $TRAIN --dry_run=True --activation_checkpointing=$ck --compile=blocks --plan_gpu="$PLAN_GPU"
  for lat in False True; do
    step "train ckpt=$ck latents=$lat" 150 $TRAIN --bench=True --bench_steps=5 --activation_checkpointing=$ck --bench_latents=$lat
  done
done
step "train ckpt=True latents=True compiled" 240 $TRAIN --bench=True --bench_steps=5 --bench_latents=True --compile=blocks
step "vae" 120 python vae.py bench $VAE
[ "$SAMPLE_OK" = 1 ] && step "sample" 120 python sample.py --bench $SAMPLE
step "run 20 steps" 240 python train.py $RUN --out_dir=out/bench_gpu --resume=False
step "bf16 vs fp32" 120 python - <<'PY'
import torch, train, model
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
c = {k: getattr(train, k) for k in train._CONFIG_KEYS}
c.update(model_size="small" if dev.type == "cuda" else "tiny", cameras=(0, 1, 2, 3))
net = train.build_model(c, train.model_config(c, 16), dev, say=lambda *a: None)
g = torch.Generator(dev).manual_seed(0)
x0, act = torch.randn(2, 16, 16, 16, 20, device=dev, generator=g), torch.randn(2, 12, 7, device=dev, generator=g)
loss = {}
for bf16 in (False, True):
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        loss[bf16] = model.diffusion_loss(net, x0, {"action": act}, 4, torch.Generator(dev).manual_seed(1),
                                          **train.loss_settings(c))[0].item()
print(f"parity: loss fp32 {loss[False]:.6f} bf16 {loss[True]:.6f} relative {abs(loss[True] / loss[False] - 1):.2e}")
PY

python - "$LOG" <<'PY'
import re, sys
text, rows, plan = open(sys.argv[1]).read(), [], {}
for label, body in re.findall(r"== (.+?): .*?\n(.*?)== \1: exit", text, re.S):
    if label.startswith("plan"):
        ms = re.search(r"step\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+\s+([\d.]+)", body)
        gb = re.search(r"plan: ~([\d.]+) GB", body)
        mfu = re.search(r"MFU ([\d.]+)%", body)
        plan[label[5:]] = (ms and ms[1], mfu and mfu[1], gb and gb[1])
    elif "bench:" in body:
        f = dict(re.findall(r"(\w+) ([\d.e+-]+)", body.split("bench:")[-1].split("\n")[0]))
        key = label[6:].replace(" latents=True", "").replace(" latents=False", "")
        p = plan.get(key, (None, None, None))
        rows.append((label, f.get("step_s"), f.get("mfu"), f.get("peak_mem_gb"), p))
print(f"\n{'benchmark':42s} {'step ms':>8s} {'MFU':>6s} {'pred ms':>8s} {'pred MFU':>8s} {'peak GB':>8s} {'plan GB':>8s}")
for label, s, mfu, mem, (pms, pmfu, pgb) in rows:
    fmt = lambda v, k=1: f"{float(v) * k:.1f}" if v else "-"  # noqa: E731
    print(f"{label:42s} {fmt(s, 1000):>8s} {fmt(mfu, 100):>6s} {pms or '-':>8s} {pmfu or '-':>8s} {fmt(mem):>8s} "
          f"{pgb or '-':>8s}")
print("(pred: the op count's roofline of the DiT step, latents; the video rows add the online VAE encode)")
for line in re.findall(r"^(?:parity|bench|Wan2.1|.*\d+ frames .* s ).*$", text, re.M)[-12:]:
    print(line)
PY
