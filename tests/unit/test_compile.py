"""torch.compile of whole models: one graph (fullgraph=True, the scans as custom ops), logits and
gradients equal to eager, and neither the shuffle's per-step draws nor the per-block drop-path
rates (a different constant in every block) recompile."""

import pytest
import timm
import torch
import torch._dynamo
import torch._inductor.config

import shufflemamba  # noqa: F401  (registers the models)

FAMILIES = {
    "vim_tiny_patch16_224": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, shuffle_rate=0.0),
    "shufflemamba_tiny_patch16_224": dict(img_size=32, patch_size=8, embed_dim=32, depth=3, shuffle_rate=1.0),
    "vmamba_tiny": dict(dims=8, depths=(1, 1, 1, 1)),
}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.slow  # Inductor compiles on 2 cores: tens of seconds
@pytest.mark.parametrize("name", sorted(FAMILIES))
# compiled draws = eager draws. Inductor's own patch, not monkeypatch: pytest >= 9.2 undoes a
# setattr on a module by deleting the name unless it is in the module's __dict__, and Inductor's
# config entries are not, so the next compile would find the option gone.
@torch._inductor.config.patch(fallback_random=True)
def test_a_compiled_model_is_one_graph_equal_to_eager_in_training(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.2, **FAMILIES[name]).train()
    compiled = torch.compile(model, fullgraph=True)  # a graph break would raise
    x = torch.randn(2, 3, 32, 32)
    results = []
    for fn in (compiled, model):
        torch.manual_seed(1)  # the same shuffle draws in both
        out = fn(x)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (out_c, grads_c), (out_e, grads_e) = results
    assert _rel(out_c, out_e) < 1e-4
    assert max(_rel(a, b) for a, b in zip(grads_c, grads_e, strict=True)) < 1e-4
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    for step in range(3):  # new shuffle draws every step, same graph
        torch.manual_seed(10 + step)
        compiled(x).sum().backward()
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames  # no recompilation
