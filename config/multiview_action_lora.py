# Multi-view, action-conditioned post-training of the 2B model on ONE GPU with LoRA (4 cameras):
#   python train.py config/multiview_action_lora.py
# Same data, model and objective as config/multiview_action.py (8 GPUs, full fine-tuning); only what makes it fit
# one 24 GB GPU differs. Base: NVIDIA's released Cosmos-Predict2.5-2B robot action-conditioned model, frozen and
# stored in bf16; the 7-entry view embedding is grown in as zero input columns, so step 0 is the released model.
# Trained in fp32: rank-32 LoRA factors on self-attention q/k/v/output and the MLP of all 28 blocks (B = 0 at
# start), plus in full the action MLPs and x_embedder (whose last 28 input columns are the new view channels)
# and the view embedding. Cross-attention gets no LoRA: action models see an all-zero text.
#
# Arithmetic (tokens as config/multiview_action.py): 4 views x 4 latent frames x 16x20 patches = 5,120 tokens per
#   sample; batch 1 x grad_accum 8 = 8 samples = 40,960 tokens per step, the global batch of the 8-GPU preset.
# Parameters (model.lora_param_counts, rank 32): 2,159.9M in all = 2,059.0M frozen + 100.8M trainable
#   (33.0M LoRA: per block 4 x 32 x (2048 + 2048) + 32 x (2048 + 8192) x 2 = 1.18M, x 28; 67.8M heads, almost all
#   the two action MLPs 28 -> 8192 -> 2048 / 6144; 0.2M x_embedder + view embedding).
# Memory per GPU: frozen bf16 2,059.0M x 2 B = 4.1 GB; trainable 100.8M x (4 weights + 4 grads + 8 AdamW + 4 EMA)
#   = 20 B/param = 2.0 GB; model state 6.1 GB (full fine-tuning: 2.13B weights + EMA, 1.85B of them trained with
#   grads and AdamW = 39.2 GB, hence 8-way FSDP there).
#   Plus activations, counted on the meta device by opcount.saved_activations (bf16 autocast as on CUDA, attention
#   as the flash kernel): 0.6 GiB per sample with per-block checkpointing (mostly the 28 saved bf16 block inputs of
#   5,120 x 2048) plus one block recomputed at a time (0.64 GiB); 18.0 GiB without. Then the bf16 Wan2.1 VAE
#   (0.25 GB), its encode of 4 x 13 frames at 256x320, and the CUDA context.
#   `python train.py config/multiview_action_lora.py --dry_run=True` prints (GiB):
#     model state 5.71 = weights 4.21 + grads 0.38 + AdamW 0.75 + EMA 0.38 | activations 1.25 with checkpointing
#     plan: ~7.20 GiB per GPU | 24 GB: fits, 48 GB: fits, 80 GB: fits       (the verdict keeps 3 GiB in reserve)
#   Without checkpointing ~23.9 GiB: does NOT fit 24 GB (48 GB and up); base_dtype=float32 ~11.1; batch_size=4
#   ~10.9; full fine-tuning (lora_rank=0) on one GPU ~38.0 GiB: 48 GB cards and up. Rank 16 saves 0.3 GB, rank 64
#   costs 0.6 GB more. Not yet measured on a GPU (bench_gpu.sh prints plan vs peak).
out_dir = "checkpoints/posttraining/multiview_action_lora/2b"
synth_if_missing = False                          # a real dataset: missing is an error
data_root = "datasets/multiview_action"          # annotations/{train,val}/<name>.json + videos/cam0..cam3/<name>.mp4
cameras = (0, 1, 2, 3)
num_frames = 13
frame_size = (256, 320)
fps = 4
tokenizer = "wan2.1"
tokenizer_path = "checkpoints/nvidia/Cosmos-Predict2.5-2B/tokenizer.pth"
# the base: the released robot model's EMA weights; the LoRA checkpoints record this path and its fingerprint,
# and refuse another file later (convert.py export merges onto it, or --lora-only writes the adapter alone)
init_from = "checkpoints/nvidia/Cosmos-Predict2.5-2B/robot/action-cond/model_ema_bf16.pt"
model_size = "2B"
action_mode = "per_frame"
action_dim = 7
n_views_emb = 7
crossattn_proj_in_channels = 100352
timestep_scale = 0.001
# LoRA as the official Predict2.5 recipe (cosmos_predict2/experiments/base/cosmos_nemo_assets_lora.py: rank 32,
# alpha 32, these module names), minus cross-attention
lora_rank = 32
lora_alpha = 32
lora_targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.output_proj",
                "mlp.layer1", "mlp.layer2"]
base_dtype = "bfloat16"                           # frozen weights in bf16 (the released file is bf16 already)
# Predict2.5 action recipe: conditioned frames get the same t, logit-normal shift 5
cond_t = -1.0
t_shift = 5.0
# the Predict2.5 post-training optimiser (lr 2^-14.5, betas (0.9, 0.999), clip 0.1, LambdaLinear warm-up 100 then
# linear decay) with the official LoRA recipe's weight decay 0.001 (0.1 would pull the factors back to 0)
lr = 3.05e-5
betas = (0.9, 0.999)
weight_decay = 0.001
grad_clip = 0.1
lr_schedule = "linear"
warmup_iters = 100
min_lr_ratio = 0.4
max_iters = 20000
batch_size = 1
grad_accum = 8
parallel = "ddp"                                  # one process: no wrapper; several GPUs: DDP of the trainable part
plan_gpus = 1                                     # --dry_run=True plans for this one GPU
dtype = "bfloat16"                                # bf16 autocast (a bf16 base needs it)
activation_checkpointing = True
num_workers = 4
log_interval = 10
eval_interval = 500
eval_batches = 8
save_interval = 1000
keep_last = 3
sample_interval = 1000
