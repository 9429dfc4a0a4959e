"""timm's model contract, for the smallest size of every family we register: creation on meta and
in bf16, features_only / feature_info (FeatureGetterNet), forward_intermediates and pruning, FX
feature extraction with gradients, the classifier surface, the pretrained cfg, torch.export, and
TorchScript refused with what to use instead."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import create_feature_extractor

import shufflemamba  # noqa: F401  (registers the models)
from shufflemamba.errors import TorchScriptUnsupported

# name: (tiny overrides, input (H, W), FX nodes: two leaf outputs inside the network)
FAMILIES = {
    "vim_tiny_patch16_224": (dict(img_size=32, patch_size=8, embed_dim=32, depth=3), (32, 32),
                             ["layers.0.mixer", "layers.2.mixer"]),
    "shufflemamba_tiny_patch16_224": (dict(img_size=32, patch_size=8, embed_dim=32, depth=3, shuffle_rate=1.0),
                                      (32, 32), ["layers.1.mixer", "layers.2.mixer"]),
    "vim_tiny_patch16_stride8_224": (dict(img_size=32, embed_dim=32, depth=3), (32, 32),
                                     ["layers.0.mixer", "layers.1.mixer"]),
    # drop path 0: in an FX training graph timm's drop_path loses its in-place rescale (torchvision's
    # feature extractor removes the unused `div_` node), so traced and eager would differ for any timm model
    "shufflemamba_reg_base_patch16_224": (dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_cls_tokens=4,
                                               cls_reduce=2, drop_path_rate=0.0), (32, 32),
                                          ["layers.0.mixer", "layers.2.mixer"]),
    "vmamba_tiny": (dict(dims=8, depths=(1, 1, 2, 1), drop_path_rate=0.0), (64, 48),
                    ["layers.0.blocks.0.op", "layers.2.blocks.1.op"]),
}  # fmt: skip
NAMES = sorted(FAMILIES)


def _model(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return timm.create_model(name, **{**FAMILIES[name][0], **kw})


def _image(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *FAMILIES[name][1], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", NAMES)
def test_creation_on_meta_and_in_bf16(name):
    meta = _model(name, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    with torch.device("meta"):  # the default-device context, as timm users also write it
        assert all(p.is_meta for p in _model(name).parameters())
    large = {  # the family's largest registered size
        "vim_tiny_patch16_224": "vim_base_patch16_224",
        "shufflemamba_tiny_patch16_224": "shufflemamba_large_patch16_224",
        "vim_tiny_patch16_stride8_224": "vim_small_patch16_stride8_224",
        "shufflemamba_reg_base_patch16_224": "shufflemamba_reg_large_patch16_224",
        "vmamba_tiny": "vmamba_base",
    }[name]
    assert all(p.is_meta for p in timm.create_model(large, device="meta").parameters())  # no 1 GB allocation
    low = _model(name, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the creation context is left as it was
    full = _model(name).eval()
    low.load_state_dict(full.state_dict())  # the same weights, rounded to bf16 (its own init draws in bf16)
    with torch.no_grad():
        out, ref = low(_image(name).bfloat16()), full(_image(name))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize("name", NAMES)
def test_features_only_follows_feature_info_and_equals_forward_intermediates(name):
    model = _model(name).eval()
    info = model.feature_info
    assert len(info) == (len(model.layers))
    hierarchical = name.startswith("vmamba")
    for out_indices in (None, (0, 1) if hierarchical else (0, 2)):
        kw = {} if out_indices is None else dict(out_indices=out_indices)
        features = _model(name, features_only=True, **kw).eval()
        expected = out_indices or ((0, 1, 2, 3) if hierarchical else (0, 1, 2))  # timm's defaults: all stages / last 3
        assert list(features.feature_info.out_indices) == list(expected)
        assert features.feature_info.channels() == [info[i]["num_chs"] for i in expected]
        x = _image(name)
        with torch.no_grad():
            maps = features(x)
            direct = model.forward_intermediates(x, indices=list(expected), intermediates_only=True)
        height, width = x.shape[-2:]
        for i, y, z in zip(expected, maps, direct, strict=True):
            r = info[i]["reduction"]
            assert y.shape[:2] == (2, info[i]["num_chs"])
            if hierarchical:  # stride-2 convs with padding: ceil
                grid = (-(-height // r), -(-width // r))
            elif "stride8" in name:  # 16-px patches every 8 px
                grid = ((height - 16) // r + 1, (width - 16) // r + 1)
            else:
                grid = (height // r, width // r)
            assert tuple(y.shape[2:]) == grid, (i, y.shape)
            torch.testing.assert_close(y, z, rtol=1e-5, atol=1e-6)  # the pruned wrapper = the whole model


@pytest.mark.parametrize("name", NAMES)
def test_pruning_keeps_the_taken_indices_and_the_model_still_runs(name):
    model = _model(name).eval()
    kept = model.prune_intermediate_layers(indices=[1], prune_norm=True)
    assert kept == [1] and len(model.layers) == 2
    with torch.no_grad():
        maps = model.forward_intermediates(_image(name), indices=[1], intermediates_only=True)
        out = model(_image(name))  # no head any more: pre-logits features
    assert maps[0].shape[1] == model.feature_info[1]["num_chs"] and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_fx_feature_extraction_matches_eager_with_gradients(name):
    """Two inner nodes through timm's create_feature_extractor (mixers / SS2D and the shuffle's draws
    are leaves); in training mode, with the shuffle on where the family has it: values and every
    parameter gradient equal the eager model's (hooks on the same modules, the same seeded draws)."""
    model = _model(name).train()
    nodes = FAMILIES[name][2]
    extractor = create_feature_extractor(model, return_nodes=nodes).train()
    x = _image(name)
    torch.manual_seed(5)
    traced = extractor(x)
    loss = sum(traced[n].float().square().mean() for n in nodes)
    grads_fx = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    captured = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in nodes]  # fmt: skip
    torch.manual_seed(5)
    model(x)
    for h in hooks:
        h.remove()
    for n in nodes:
        torch.testing.assert_close(traced[n], captured[n], rtol=1e-5, atol=1e-6)
    loss_eager = sum(captured[n].float().square().mean() for n in nodes)
    grads_eager = torch.autograd.grad(loss_eager, list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads_fx)
    for a, b in zip(grads_fx, grads_eager, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_classifier_surface_through_create_model_and_reset_classifier(name):
    x = _image(name)
    hierarchical = name.startswith("vmamba")
    pooled = _model(name, num_classes=0).eval()
    unpooled = _model(name, num_classes=0, global_pool="").eval()
    model = _model(name).eval()
    with torch.no_grad():
        features = pooled(x)
        tokens = unpooled(x)
        assert features.shape == (2, pooled.num_features if hierarchical else pooled.head_hidden_size)
        if hierarchical:
            assert tokens.dim() == 4 and tokens.shape[-1] == unpooled.num_features  # NHWC, as timm's Swin / MambaOut
        else:
            assert tokens.shape == (
                2,
                unpooled.patch_embed.num_patches + unpooled.num_prefix_tokens,
                unpooled.embed_dim,
            )
        model.reset_classifier(0, "")
        out = model(x)
        assert out.shape == tokens.shape
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x), pre_logits=True))
        model.reset_classifier(7, "avg" if hierarchical else "token")
        assert model(x).shape == (2, 7) and model.num_classes == 7
    low = _model(name, dtype=torch.bfloat16)
    low.reset_classifier(3)
    assert {p.dtype for p in low.get_classifier().parameters()} == {torch.bfloat16}  # the new head joins the model
    with pytest.raises(ValueError, match="global_pool must be"):
        model.reset_classifier(3, "max")


@pytest.mark.parametrize("name", NAMES)
def test_the_pretrained_cfg_names_the_real_modules_and_the_published_eval(name):
    model = _model(name)
    cfg = model.pretrained_cfg
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    data = resolve_data_config({}, model=timm.create_model(name, pretrained=False, device="meta"))
    expected_crop = 1.0 if "reg" in name else 0.875
    assert data == {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                    "std": (0.229, 0.224, 0.225), "crop_pct": expected_crop, "crop_mode": "center"}  # fmt: skip
    if name.startswith("vmamba"):
        assert cfg["pool_size"] == (7, 7) and not cfg["fixed_input_size"]  # 224 / 32
    else:
        assert cfg["pool_size"] is None and cfg["fixed_input_size"]


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_works_and_torchscript_is_refused_with_the_alternatives(name):
    model = _model(name).eval()
    x = _image(name)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(TorchScriptUnsupported, match="use torch.compile.*torch.export.*create_feature_extractor"):
        torch.jit.script(model)
