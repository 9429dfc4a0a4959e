"""shufflemamba.checkpoint: safe reading, strict loading with clear errors, official layouts,
and the declared training state."""

import argparse
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script, subprocess_env, tiny_vmamba
from conftest import tiny_vim as tiny

from shufflemamba.checkpoint import CheckpointError, load_for_finetune, load_weights, read_checkpoint
from shufflemamba.models import resize_pos_embed


def test_official_format_checkpoint_round_trips(tmp_path):
    model = tiny().eval()
    ema = tiny().eval()
    args = argparse.Namespace(model="vim_tiny_patch16_224", lr=5e-4, output_dir="out")
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 299, "args": args}, path)
    assert read_checkpoint(path)["args"].model == "vim_tiny_patch16_224"
    images = torch.randn(2, 3, 32, 32)
    for use_ema, source in ((False, model), (True, ema)):
        target = tiny().eval()
        load_weights(target, path, use_ema=use_ema)
        with torch.no_grad():
            torch.testing.assert_close(target(images), source(images), rtol=0, atol=0)
    ddp_style = {"model": {f"module.{k}": v for k, v in model.state_dict().items()}}
    target = tiny().eval()
    load_weights(target, ddp_style)
    torch.testing.assert_close(target.state_dict()["head.weight"], model.state_dict()["head.weight"])


def test_mismatched_checkpoint_lists_missing_unexpected_and_mis_shaped_keys(tmp_path):
    path = tmp_path / "w.pth"
    sd = tiny(num_classes=10).state_dict()
    sd.pop("norm_f.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny(num_classes=7), path)
    msg = str(err.value)
    assert "missing (1): norm_f.weight" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "head.weight: checkpoint (10, 32) vs model (7, 32)" in msg
    with pytest.raises(CheckpointError, match="no 'model_ema'"):
        load_weights(tiny(), {"model": tiny().state_dict()}, use_ema=True)


def test_unsafe_pickles_are_refused(tmp_path):
    import datetime

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": datetime.date(2024, 1, 1)}, path)  # any non-allow-listed global
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_checkpoint(path)


@pytest.mark.parametrize("cls_position", ["middle", "head"])
def test_resolution_change_resizes_the_position_embedding(cls_position, tmp_path):
    name = "vim_tiny_patch16_224" if cls_position == "middle" else "shufflemamba_tiny_patch16_224"
    src = tiny(name)  # 32 px / patch 8 = 4x4 grid
    path = tmp_path / "w.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = tiny(name, img_size=48)  # 6x6 grid
    load_weights(dst, path)
    pe_src, pe_dst = src.pos_embed.detach(), dst.pos_embed.detach()
    assert pe_dst.shape == (1, 37, 32)
    i_src = 8 if cls_position == "middle" else 0
    i_dst = 18 if cls_position == "middle" else 0
    torch.testing.assert_close(pe_dst[:, i_dst], pe_src[:, i_src])  # class token kept, moved to its new index
    patches = torch.cat([pe_src[:, :i_src], pe_src[:, i_src + 1 :]], 1).reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expect = F.interpolate(patches, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    got = torch.cat([pe_dst[:, :i_dst], pe_dst[:, i_dst + 1 :]], 1).reshape(1, 6, 6, 32)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    assert dst(torch.randn(1, 3, 48, 48)).shape == (1, 7)
    same = resize_pos_embed(pe_src, (4, 4), (4, 4), cls_position)
    assert same is pe_src


def test_official_layout_checkpoint_loads_including_1x1_conv_weights_and_ema(tmp_path):
    model = tiny_vmamba()
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    conv_shaped = dict(state)  # a Linear2d saved as a 1x1 conv (4-D) loads as well
    for key in [k for k in state if k.endswith(("in_proj.weight", "out_proj.weight", "fc1.weight"))]:
        conv_shaped[key] = state[key][:, :, None, None]
    path = tmp_path / "vssm_official.pth"
    torch.save({"model": conv_shaped, "model_ema": state, "epoch": 299, "max_accuracy": 82.6}, path)
    fresh = tiny_vmamba()
    load_weights(fresh, path, use_ema=False)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    load_weights(fresh, path, use_ema=True)
    assert torch.equal(fresh.state_dict()["classifier.head.weight"], state["classifier.head.weight"])


def test_release_file_with_a_foreign_pickled_config_is_refused_then_extracted(tmp_path):
    """An official VMamba file pickles its yacs config: the safe loader refuses it and says how to
    proceed; scripts/extract_weights.py (yacs not installed) copies the weights out."""
    fake_pkg = tmp_path / "site" / "yacs"
    fake_pkg.mkdir(parents=True)
    (fake_pkg / "__init__.py").write_text("")
    (fake_pkg / "config.py").write_text(
        "class CfgNode(dict):\n"
        "    def __init__(self, d=None):\n"
        "        super().__init__(d or {})\n"
        "        self.__dict__['__immutable__'] = True\n"
    )
    weights = tmp_path / "weights.pt"
    state = tiny_vmamba().state_dict()
    torch.save(state, weights)
    release = tmp_path / "vssm_release.pth"
    make = (
        "import sys, torch; from yacs.config import CfgNode\n"
        f"sd = torch.load({str(weights)!r}, weights_only=True)\n"
        "cfg = CfgNode({'MODEL': CfgNode({'NAME': 'vssm1_tiny'}), 'TRAIN': CfgNode({'EPOCHS': 300})})\n"
        f"torch.save({{'model': sd, 'config': cfg, 'epoch': 264, 'max_accuracy': 82.5}}, {str(release)!r})\n"
    )
    env = subprocess_env(PYTHONPATH=str(tmp_path / "site"))
    subprocess.run([sys.executable, "-c", make], check=True, env=env)
    with pytest.raises(CheckpointError, match="extract_weights.py"):
        read_checkpoint(release)
    out = tmp_path / "extracted.pth"
    proc = run_script("scripts/extract_weights.py", str(release), str(out))
    assert "placeholder for yacs.config.CfgNode" in proc.stderr and f"model ({len(state)} tensors)" in proc.stdout
    model = tiny_vmamba()
    load_weights(model, out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _sources(model, ema, tmp_path):
    """The same weights as each source kind a fine-tune starts from."""
    ours = {"model": model.state_dict(), "model_ema": ema.state_dict(), "best_weights": "raw", "progress": {}}
    official = {"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 299, "args": argparse.Namespace()}
    paths = {}
    for kind, obj in (("ours", ours), ("official", official), ("raw", model.state_dict())):
        paths[kind] = tmp_path / f"{kind}.pt"
        torch.save(obj, paths[kind])
    return paths


@pytest.mark.parametrize("kind", ["ours", "official", "raw"])
def test_finetune_loading_adapts_head_and_grid_and_is_strict_about_the_rest(kind, tmp_path):
    torch.manual_seed(0)
    src, ema = tiny(num_classes=10), tiny(num_classes=10)  # 32 px: 4 x 4 grid
    path = _sources(src, ema, tmp_path)[kind]
    torch.manual_seed(1)
    dst = tiny(num_classes=3, img_size=48)  # another class count, 6 x 6 grid
    fresh_head = dst.head.weight.detach().clone()
    notes = load_for_finetune(dst, path)
    # ours: the weights best.pt was chosen by (raw here); an official file: EMA when present
    assert notes[0] == {"ours": "raw weights", "official": "EMA weights", "raw": "raw weights"}[kind]
    reference = src if notes[0] == "raw weights" else ema
    assert "position embedding resized (1, 17, 32) -> (1, 37, 32)" in notes
    assert "classifier re-initialised for another class count (head.weight (10, 32) -> (3, 32), head.bias" in notes[2]
    assert torch.equal(dst.head.weight, fresh_head)  # the model's own init, not the checkpoint's
    assert torch.equal(dst.layers[1].mixer.in_proj.weight, reference.layers[1].mixer.in_proj.weight)
    assert dst(torch.randn(1, 3, 48, 48)).shape == (1, 3)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_for_finetune(tiny(embed_dim=48), path)  # another width: the same clear error as eval
