"""convert.py: loading every checkpoint form (official files, consolidated files, DCP training checkpoints),
export to the official files, import of official-looking files, growing new heads, and the round trip through
train.py and sample.py. Every file is made here, from tiny random networks or the official fixtures."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

import convert
import model
from test_model import assert_close, call, config_from_sidecar, tiny

FIXTURES = Path(__file__).parent / "fixtures"


def inputs_for(net, views=1, T=3, seed=0):
    """Forward inputs that exercise every conditioning path of `net` (actions, views, condition mask)."""
    g = torch.Generator().manual_seed(seed)
    cfg = net.cfg
    x = torch.randn(2, cfg.in_channels, views * T, 8, 8, generator=g)
    kw = dict(x_B_C_T_H_W=x, timesteps_B_T=torch.rand(2, generator=g),
              condition_video_input_mask_B_C_T_H_W=model.condition_mask(2, views, T, 8, 8, 1))
    if cfg.action_mode == "per_frame":
        kw["action"] = torch.randn(2, (T - 1) * cfg.actions_per_latent, cfg.action_dim, generator=g)
    elif cfg.action_mode == "global":
        kw["action"] = torch.randn(2, cfg.num_actions, cfg.action_dim, generator=g)
    return kw


def output(net, views=1, **kw):
    with torch.no_grad():
        return call(net, inputs_for(net, views, **kw), views)


def run_config(net):
    return {"model": model.config_dict(net.cfg), "train": {"fps": 4}, "step": 3, "world_size": 1}


def write_dcp(ckpt_dir, sd, ema_sd, cfg_json):
    """The layout train.py writes (CONTRACT.md), made by hand."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"model": sd, "ema": ema_sd, "trainer": {"step": 3}}, checkpoint_id=str(ckpt_dir), no_dist=True)
    (ckpt_dir / "config.json").write_text(json.dumps(cfg_json))


@pytest.fixture
def nets():
    """A regular and an EMA network (different weights, so picking the wrong one shows)."""
    reg = tiny(action_mode="per_frame")
    ema = tiny(action_mode="per_frame")
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    return reg, ema


# ---- load_weights / load_dit ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_consolidated_file_with_sidecar(tmp_path, nets, fmt):
    _, ema = nets
    f = tmp_path / f"iter_000000003.{fmt}"
    flat = {"net." + k: v.contiguous() for k, v in ema.state_dict().items()}
    torch.save(flat, f) if fmt == "pt" else save_file(flat, str(f))
    f.with_suffix(".json").write_text(json.dumps(run_config(ema)))
    sd, rc = convert.load_weights(f)
    assert rc == run_config(ema) and sd.keys() == ema.state_dict().keys()
    net, rc = convert.load_dit(f)
    assert not net.training and net.cfg == ema.cfg
    assert torch.equal(output(net), output(ema))


def test_config_json_in_folder_and_inferred_without(tmp_path, nets, capsys):
    _, ema = nets
    torch.save({"net." + k: v for k, v in ema.state_dict().items()}, tmp_path / "model_ema_fp32.pt")
    net, rc = convert.load_dit(tmp_path / "model_ema_fp32.pt")
    assert rc is None and "inferred from shapes" in capsys.readouterr().out
    assert net.cfg == ema.cfg and torch.equal(output(net), output(ema))
    (tmp_path / "config.json").write_text(json.dumps(run_config(ema)))
    assert convert.load_weights(tmp_path / "model_ema_fp32.pt")[1] == run_config(ema)


def test_official_prefixes_choose_ema_or_regular(tmp_path, nets):
    reg, ema = nets
    f = tmp_path / "model.pt"
    torch.save({**{"net." + k: v for k, v in reg.state_dict().items()},
                **{"net_ema." + k: v for k, v in ema.state_dict().items()}}, f)
    assert torch.equal(output(convert.load_dit(f)[0]), output(ema))
    assert torch.equal(output(convert.load_dit(f, ema=False)[0]), output(reg))


def test_dcp_training_checkpoint(tmp_path, nets):
    reg, ema = nets
    out_dir = tmp_path / "out"
    ckpt = out_dir / "checkpoints" / "iter_000000003"
    write_dcp(ckpt, reg.state_dict(), ema.state_dict(), run_config(ema))
    (out_dir / "checkpoints" / "latest_checkpoint.txt").write_text("iter_000000003\n")
    for path in (ckpt, out_dir / "checkpoints", out_dir):
        sd, rc = convert.load_weights(path)
        assert rc == run_config(ema) and all(torch.equal(sd[k], v) for k, v in ema.state_dict().items())
    assert torch.equal(output(convert.load_dit(out_dir)[0]), output(ema))
    assert torch.equal(output(convert.load_dit(ckpt, ema=False)[0]), output(reg))


def test_load_errors_are_loud(tmp_path, nets):
    _, ema = nets
    sd = {"net." + k: v for k, v in ema.state_dict().items()}
    with pytest.raises(FileNotFoundError):
        convert.load_weights(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a training checkpoint"):
        convert.load_weights(tmp_path / "empty")
    (tmp_path / "iter_000000009.tmp").mkdir()
    with pytest.raises(ValueError, match="incomplete"):
        convert.load_weights(tmp_path / "iter_000000009.tmp")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest_checkpoint.txt").write_text("iter_000000001")
    with pytest.raises(FileNotFoundError, match="iter_000000001"):
        convert.load_weights(tmp_path)
    torch.save({"state_dict": sd}, tmp_path / "nested.pt")        # a training-framework wrapper, not a flat dict
    with pytest.raises(ValueError, match="flat dict"):
        convert.load_weights(tmp_path / "nested.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="flat dict"):
        convert.load_weights(tmp_path / "list.pt")
    missing = dict(sd)
    del missing["net.blocks.1.mlp.layer2.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing.*blocks.1.mlp.layer2.weight"):
        convert.load_dit(tmp_path / "missing.pt")
    torch.save({**sd, "net.blocks.0.extra.weight": torch.ones(1)}, tmp_path / "unexpected.pt")
    with pytest.raises(ValueError, match="unexpected.*blocks.0.extra.weight"):
        convert.load_dit(tmp_path / "unexpected.pt")
