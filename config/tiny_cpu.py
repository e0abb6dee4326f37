# The embedded default, spelled out: a 1.57M-parameter DiT on the synthetic 2-camera world, pixel tokenizer.
# 13 frames -> 4 latent frames; 64x80 / 8 -> 8x10 latents -> 4x5 = 20 patches per latent frame;
# 2 views x 4 x 20 = 160 tokens per sample; batch 8 = 1,280 tokens per step. Memory: well under 1 GB.
model_size = "tiny"
cameras = (0, 1)
frame_size = (64, 80)
tokenizer = "pixel"
batch_size = 8
