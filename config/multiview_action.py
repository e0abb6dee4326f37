# Multi-view, action-conditioned post-training of the 2B model (4 cameras), nanocosmos' main job:
#   torchrun --nproc_per_node=8 train.py config/multiview_action.py
# Starts from NVIDIA's released Cosmos-Predict2.5-2B robot action-conditioned model (the per-latent-frame
# "chunk" net: 4 actions x 7 -> MLP input 28, Reason1 text projection 100352 -> 1024), with the 7-entry view
# embedding grown in as zero-initialised input channels, so step 0 behaves exactly like the released model
# on every view.
#
# Arithmetic: 13 frames -> 4 latent frames; 256x320 -> 32x40 latents -> 16x20 = 320 patches per latent frame;
#   4 views x 4 x 320 = 5,120 tokens per sample (joint self-attention over all views).
#   batch 1 x 8 GPUs = 8 samples = 40,960 tokens per step.
# Memory: 2.13B params (incl. the 103M text projection); fp32 weights + grads + AdamW (2x) + fp32 EMA = 20 bytes/param
#   = 42.5 GB at most (frozen text weights need no grads or AdamW state), sharded by FSDP2
#   over 8 GPUs = ~5.3 GB each, plus bf16 activations with per-block checkpointing (a few GB) and the bf16 VAE.
out_dir = "checkpoints/posttraining/multiview_action/2b"
synth_if_missing = False                          # a real dataset: missing is an error
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
# Predict2.5 user recipe (post-training from a released model): AdamW 2^-14.5, betas (0.9, 0.999), wd 0.1,
# clip 0.1, LambdaLinear warm-up 100 steps then linear decay
lr = 3.05e-5
betas = (0.9, 0.999)
weight_decay = 0.1
grad_clip = 0.1
lr_schedule = "linear"
warmup_iters = 100
min_lr_ratio = 0.4
max_iters = 20000
batch_size = 1
grad_accum = 1
parallel = "fsdp"
activation_checkpointing = True
num_workers = 4
log_interval = 10
eval_interval = 500
eval_batches = 8
save_interval = 1000
keep_last = 3
sample_interval = 1000
