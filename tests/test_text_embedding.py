"""train.py text_embedding: a precomputed text context (a safetensors file at the crossattn_proj input width) reaches
every training forward, and with it the cross-attention trains (without it those weights are frozen)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import train
from synth import make_synthetic

PROJ_IN = 48            # a tiny net's crossattn_proj input width (it projects to crossattn_emb_channels = 64)
TOKENS = 2 * 512        # multi-view nets take 512 text tokens per view


def train_main(args):
    import train
    return train.main(args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("text") / "syn"
    make_synthetic(str(root), episodes=3, cameras=2, frames=9, size=(16, 32), seed=0, val_episodes=1, workers=1)
    return root


def run(root, out, *extra):
    train_main([f"--data_root={root}", f"--out_dir={out}", "--synth_if_missing=False", "--model_channels=32",
                "--num_blocks=2", "--num_heads=2", "--num_frames=5", "--frame_size=(16, 32)", "--batch_size=2",
                "--num_workers=0", "--log_interval=1", "--eval_interval=0", "--warmup_iters=1", "--max_iters=3",
                "--save_interval=3", f"--crossattn_proj_in_channels={PROJ_IN}", *extra])
    log = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    ema = torch.load(Path(out) / "checkpoints" / "model" / "iter_000000003.pt", weights_only=True)
    return [r["loss"] for r in log if "loss" in r], ema


def embedding(path, seed):
    g = torch.Generator().manual_seed(seed)
    save_file({"text_embedding": torch.randn(TOKENS, PROJ_IN, generator=g)}, str(path))
    return path


def test_text_embedding_reaches_the_forward_and_trains_cross_attention(world, tmp_path):
    a, ema_a = run(world, tmp_path / "a", f"--text_embedding={embedding(tmp_path / 'a.safetensors', 0)}")
    b, _ = run(world, tmp_path / "b", f"--text_embedding={embedding(tmp_path / 'b.safetensors', 1)}")
    none, ema_none = run(world, tmp_path / "none")
    assert len(a) == 3 and all(torch.isfinite(torch.tensor(a)))
    # step 1: same weights, data, noise and t; only the text context differs
    assert len({a[0], b[0], none[0]}) == 3, (a[0], b[0], none[0])
    # both runs start from the same init (seeded); the query side of cross-attention learns only with a text
    # context (with the all-zero text it cannot reach the loss and is frozen: train.zero_gradient_params)
    q = "net.blocks.0.cross_attn.q_proj.weight"
    assert not torch.equal(ema_a[q], ema_none[q])
