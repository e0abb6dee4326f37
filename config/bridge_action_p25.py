# The Cosmos-Predict2.5 guide's action post-training (docs/post-training_video2world_action.md), experiment
# `ac_reason_embeddings_rectified_flow_2b_256_320` (cosmos_predict2/experiments/base/action.py):
#   torchrun --nproc_per_node=1 train.py config/bridge_action_p25.py       # the guide uses 1 GPU; 8 work the same
# then, after `python convert.py export <iter dir> <dest>`, the guide's inference command as written:
#   python sample.py -i inference_params.json -o outputs/action_conditioned/basic \
#       --checkpoint-path <dest>/model_ema_bf16.pt --experiment ac_reason_embeddings_rectified_flow_2b_256_320
# Data: IRASim's Bridge release in datasets/bridge (annotation/{train,val,test}/*.json, videos/...), 13-frame clips
#   at every frame (fps_downsample_ratio 1), resized to 256x320 (the experiment's video_size).
# Model: the released Cosmos-Predict2.5-2B Video2World net (base/post-trained, Reason1 text projection
#   100352 -> 1024, 1000-scale timesteps) plus an action embedder that starts as a no-op (zero fc2), so step 0 is the
#   base model. The experiment's net is `cosmos_v1_2B_action_conditioned` = ActionConditionedMinimalV1LVGDiT
#   (action/configs/action_conditioned/net.py): ONE global chunk of 12 actions x 7 -> MLP input 84, not the per-latent-
#   frame embedder (4 x 7 -> 28) of the released robot/action-cond model; set action_mode = "per_frame" for that one.
#
# Arithmetic: 13 frames -> 1 + 12/4 = 4 latent frames; 256x320 -> 32x40 latents -> 16x20 = 320 patches per latent
#   frame; 4 x 320 = 1,280 tokens per sample; batch 2 (the experiment's) = 2,560 tokens per GPU per step.
# Params: 1.956B base + 0.103B crossattn_proj (100352 x 1024 + 1024) + 0.069B action MLPs
#   (2 x (84 x 8192 + 8192) + 8192 x 2048 + 2048 + 8192 x 6144 + 6144) = 2.13B. fp32 weights + grads + AdamW (2x)
#   + fp32 EMA = 20 bytes/param = 42.6 GB: fits one 80 GB GPU with activation checkpointing; FSDP2 over 8 GPUs
#   = ~5.3 GB each.
# LR: AdamW 2^-14.5 = 3.0517578125e-05, wd 0.1, betas (0.9, 0.999), grad clip 0.1 (the released action recipe,
#   dit.md section 8). LambdaLinear: factor 1e-6 -> 0.99 over 100 warm-up steps, then linear towards 0.4 at 400k:
#   at step 20,000 the factor is 0.99 - 0.59 x 19,900 / 399,900 = 0.961, lr 2.93e-5 (a 20k run is nearly constant).
#
# Where it differs from the official run:
#   - text: official feeds Reason1 embeddings of each clip's caption ("reason_embeddings"; 20% dropped to zeros);
#     nanocosmos feeds zeros unless a precomputed embedding is given (convert.load_text_embedding documents the recipe
#     with the official tools), the same file for every sample;
#   - RoPE: the base model's 3/3/1 ratios, fps modulation off, so step 0 equals the base; the experiment's net group
#     lists 1/1/1 but is merged with the base experiment's settings (Hydra), which we do not reproduce;
#   - max_iters: the experiment sets none (checkpoints every 2,000; the guide samples at 1,000); 20k here;
#   - EMA: power EMA with sigma_rel 0.1 as official (Cosmos "power", rate 0.1);
#   - precision: bf16 autocast with fp32 master weights (official: bf16 FSDP with fp32 master weights too).
out_dir = "checkpoints/posttraining/bridge_action_p25/2b"
synth_if_missing = False                          # a real dataset: missing is an error
data_root = "datasets/bridge"
train_split = "train"
val_split = "val"
cameras = (0,)
num_frames = 13
frame_size = (256, 320)
frame_stride = 1                                  # fps_downsample_ratio 1
fps = 4
action_scale = 20.0                               # Cosmos action_scaler: xyz and rpy deltas x 20, gripper x 1
gripper_scale = 1.0
tokenizer = "wan2.1"
tokenizer_path = "checkpoints/nvidia/Cosmos-Predict2.5-2B/tokenizer.pth"
# the experiment's load_path: nvidia/Cosmos-Predict2.5-2B base/post-trained (checkpoint_db.py), EMA bf16 weights
init_from = "checkpoints/nvidia/Cosmos-Predict2.5-2B/base/post-trained/81edfebe-bd6a-4039-8c1d-737df1a790bf_ema_bf16.pt"
model_size = "2B"
action_mode = "global"                            # ActionConditionedMinimalV1LVGDiT: 12 x 7 -> 84
action_dim = 7
n_views_emb = 0
crossattn_proj_in_channels = 100352               # 28 Reason1 layers x 3584 (full_concat)
timestep_scale = 0.001                            # Predict2.5 nets take 1000 t
rope_t_extrapolation_ratio = 1.0
rope_enable_fps_modulation = False
# Predict2.5 rectified flow: conditioned frames clean at the same t, logit-normal t shifted by 5; the loss is the
# mean over all latent elements with zero error on conditioned frames (the Predict2.5 normalisation), weight 1
cond_t = -1.0
t_shift = 5.0
loss_scale = 1.0
loss_mean = "all"
lr = 2 ** -14.5                                   # 3.0517578125e-05
betas = (0.9, 0.999)
weight_decay = 0.1
grad_clip = 0.1
lr_schedule = "lambda_linear"
lr_cycle_iters = 400000
lr_f_start = 1e-6
lr_f_max = 0.99
lr_f_min = 0.4
warmup_iters = 100
max_iters = 20000
batch_size = 2
grad_accum = 1
parallel = "fsdp"
activation_checkpointing = True
num_workers = 4
log_interval = 10
eval_interval = 500
save_interval = 2000                              # the experiment's save_iter
sample_interval = 2000
