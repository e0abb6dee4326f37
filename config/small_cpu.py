# A mid-size model for CPU benchmarks and longer synthetic runs: D=512, 8 blocks (40.1M parameters),
# 4 cameras at 128x160 with the pixel tokenizer.
# 13 frames -> 4 latent frames; 128x160 / 8 -> 16x20 latents -> 8x10 = 80 patches per latent frame;
# 4 views x 4 x 80 = 1,280 tokens per sample; batch 4 = 5,120 tokens per step. Memory: a few GB on CPU.
out_dir = "out/small"
data_root = "datasets/synthetic_small"
synth_data_root = data_root                      # generated when missing
model_size = "small"
cameras = (0, 1, 2, 3)
frame_size = (128, 160)
tokenizer = "pixel"
batch_size = 4
lr = 3e-4
