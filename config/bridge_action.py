# Single-camera Bridge post-training with Predict2's recipe (shared/spec/dit.md section 8):
#   torchrun --nproc_per_node=8 train.py config/bridge_action.py
# Data: IRASim's Bridge release moved to datasets/bridge (annotation/{train,val,test}/*.json, videos/...).
# Model: the released Cosmos-Predict2-2B-Sample-Action-Conditioned (global 12x7 action chunk -> MLP input 84).
# Official recipe (cosmos-predict2 configs/action_conditioned/experiment/exp.py): AdamW lr 1e-4, wd 0.1, betas
# (0.9, 0.99), constant lr, clip 1.0, loss x10, batch 2 per GPU, bf16 FSDP. Differences here: an fp32 power EMA
# (the official pipeline disables EMA) and 20k steps (official max 400k).
#
# Arithmetic: 13 frames -> 4 latent frames; 480x640 -> 60x80 latents -> 30x40 = 1,200 patches per latent frame;
#   4 x 1,200 = 4,800 tokens per sample; batch 2 x 8 GPUs = 16 samples = 76,800 tokens per step.
# Memory: 2.02B params x 20 bytes (fp32 weights, grads, AdamW, EMA) = 40 GB, /8 with FSDP2 = ~5 GB per GPU
#   plus activations (checkpointed per block).
synth_if_missing = False                          # a real dataset: missing is an error
out_dir = "checkpoints/posttraining/bridge_action/2b"
data_root = "datasets/bridge"
train_split = "train"
val_split = "val"
cameras = (0,)
num_frames = 13
frame_size = (480, 640)
fps = 4
tokenizer = "wan2.1"
tokenizer_path = "checkpoints/nvidia/Cosmos-Predict2-2B-Video2World/tokenizer/tokenizer.pth"
init_from = "checkpoints/nvidia/Cosmos-Predict2-2B-Sample-Action-Conditioned/model-480p-4fps.pt"
model_size = "2B"
action_mode = "global"
action_dim = 7
n_views_emb = 0
# Predict2: conditioned frames at sigma 1e-4 (t = 1e-4 / (1 + 1e-4)), logit-normal shift sqrt(4 latent frames)
cond_t = 9.999000099990002e-05
t_shift = 2.0
lr = 1e-4
betas = (0.9, 0.99)
weight_decay = 0.1
grad_clip = 1.0
lr_schedule = "constant"
warmup_iters = 0
# Predict2's loss: a mean over all latent elements (zero error on the conditioned frame) times 10, so the
# clip of 1.0 acts at the official strength
loss_mean = "all"
loss_scale = 10.0
max_iters = 20000
batch_size = 2
parallel = "fsdp"
activation_checkpointing = True
num_workers = 4
log_interval = 10
eval_interval = 500
save_interval = 1000
