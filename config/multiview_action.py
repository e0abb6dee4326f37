# Multi-view, action-conditioned post-training of the 2B model (4 cameras), nanocosmos' main job:
#   torchrun --nproc_per_node=8 train.py config/multiview_action.py
# Starts from NVIDIA's released Cosmos-Predict2.5-2B robot action-conditioned model (the per-latent-frame
# "chunk" net: 4 actions x 7 -> MLP input 28, Reason1 text projection 100352 -> 1024), with the 7-entry view
# embedding grown in as zero-initialised input channels. Step 0 is the released model run jointly over the
# views: each view's tokens also attend to the other views', so its prediction is NOT the released model's
# single-view prediction (tests/test_train.py::test_joint_views_differ_from_per_view_forwards measures the gap);
# the grown heads only guarantee that the view embedding adds nothing yet.
#
# Arithmetic: 13 frames -> 4 latent frames; 256x320 -> 32x40 latents -> 16x20 = 320 patches per latent frame;
#   4 views x 4 x 320 = 5,120 tokens per sample (joint self-attention over all views).
#   batch 1 x 8 GPUs = 8 samples = 40,960 tokens per step.
# Plan (python train.py config/multiview_action.py --dry_run=True, 8 GPUs): 2.13B params, 1.85B trainable (the
#   q/k side of cross-attention and the 103M text-projection weight get no gradient with the zero text: frozen);
#   model state 4.85 GB per GPU with FSDP2 (fp32 weights 0.99 + grads 0.86 + AdamW 1.72 + EMA 0.99 + two gathered
#   bf16 blocks 0.28), activations ~1.2 GB with per-block checkpointing (~14.9 GB without), the bf16 VAE 0.24 GB.
synth_if_missing = False                          # a real dataset: missing is an error
out_dir = "checkpoints/posttraining/multiview_action/2b"
data_root = "datasets/multiview_action"          # annotations/{train,val}/<name>.json + videos/cam0..cam3/<name>.mp4
cameras = (0, 1, 2, 3)
num_frames = 13
frame_size = (256, 320)
fps = 4
tokenizer = "wan2.1"
tokenizer_path = "checkpoints/nvidia/Cosmos-Predict2.5-2B/tokenizer.pth"
# the released robot model's EMA weights, e.g. from huggingface.co/nvidia/Cosmos-Predict2.5-2B (robot/action-cond)
init_from = "checkpoints/nvidia/Cosmos-Predict2.5-2B/robot/action-cond/model_ema_bf16.pt"
model_size = "2B"
action_mode = "per_frame"
action_dim = 7
n_views_emb = 7
crossattn_proj_in_channels = 100352
timestep_scale = 0.001
# Predict2.5 action recipe: conditioned frames get the same t, logit-normal shift 5
cond_t = -1.0
t_shift = 5.0
# Predict2.5 user recipe (cosmos-predict2.5 cosmos_predict2/experiments/base/action.py,
# ac_reason_embeddings_rectified_flow_2b_256_320; shared/spec/dit.md 8): AdamW 2^-14.5, betas (0.9, 0.999),
# wd 0.1, clip 0.1, LambdaLinear: x1e-6 -> x0.99 over 100 warm-up steps, then linear to x0.4 at 400k steps
# (at 20k steps the factor is still ~0.96), loss = mean over all latent elements, no x10.
# Differences: 4 views in one joint sequence with a view embedding (official: 1 view), batch 1 per GPU
# (official 2: 4x the tokens per sample), 20k steps, text weights with zero gradient frozen (official: in AdamW).
lr = 3.05e-5
betas = (0.9, 0.999)
weight_decay = 0.1
grad_clip = 0.1
lr_schedule = "lambda_linear"
warmup_iters = 100
lr_cycle_iters = 400000
lr_f_start = 1e-6
lr_f_max = 0.99
lr_f_min = 0.4
loss_mean = "all"
loss_scale = 1.0
max_iters = 20000
batch_size = 1
grad_accum = 1
parallel = "fsdp"
activation_checkpointing = True
# regional torch.compile of each block (as torchtitan): the plan's op count on an H100 SXM, per sample and step,
# 194 GB memory-bound traffic in 4,601 kernels eager -> 99 GB in 1,345 compiled, MFU 36.7% -> 47.2% (README);
# tested on CPU under FSDP2 with checkpointing (inductor), not yet on a GPU. "" runs eager (no Triton, debugging)
compile = "blocks"
num_workers = 4
log_interval = 10
eval_interval = 500
eval_batches = 8
save_interval = 1000
keep_last = 3
sample_interval = 1000
