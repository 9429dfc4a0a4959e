"""Properties of the stochastic layer-wise shuffle."""

import pytest
import timm
import torch

import shufflemamba  # noqa: F401
from shufflemamba.models.shuffle import LayerwiseShuffle, permute_tokens, restore_tokens


def model_with(rate, **kw):
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_classes": 5, "drop_path_rate": 0.0, **kw}
    return timm.create_model("shufflemamba_tiny_patch16_224", shuffle_rate=rate, **kw)


def test_probability_grows_linearly_with_depth():
    s = LayerwiseShuffle(0.5, depth=5)
    assert [s.probability(i) for i in range(5)] == [0.0, 0.125, 0.25, 0.375, 0.5]
    with pytest.raises(ValueError):
        LayerwiseShuffle(1.5, depth=4)


def test_eval_output_is_identical_whatever_the_rate():
    x = torch.randn(2, 3, 32, 32)
    base = model_with(0.0).eval()
    with torch.no_grad():
        ref = base(x)
        for rate in (0.3, 1.0):
            m = model_with(rate).eval()
            m.load_state_dict(base.state_dict())
            state = torch.get_rng_state()
            assert torch.equal(m(x), ref)
            assert torch.equal(torch.get_rng_state(), state)  # no RNG draw at inference


def test_rate_zero_in_training_equals_eval_and_draws_nothing():
    m = model_with(0.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        state = torch.get_rng_state()
        train_out = m.train()(x)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(train_out, m.eval()(x))


def test_rate_one_changes_the_training_output():
    m = model_with(1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(m.train()(x), m.eval()(x))


@pytest.mark.parametrize("per_sample", [False, True])
def test_per_block_frequency_matches_the_schedule(per_sample):
    depth, steps = 5, 4000
    s = LayerwiseShuffle(0.8, depth, per_sample=per_sample).train()
    hidden = torch.zeros(3, 10, 4)
    torch.manual_seed(0)
    identity = torch.arange(10)

    def shuffled(i: int) -> bool:
        perm = s.sample(i, hidden)
        return perm is not None and not bool((perm == identity).all())

    counts = [sum(shuffled(i) for _ in range(steps)) for i in range(depth)]
    for i, c in enumerate(counts):
        p = s.probability(i)
        sigma = (p * (1 - p) / steps) ** 0.5
        assert abs(c / steps - p) <= 4 * sigma + 1e-9, (i, c / steps, p)
    assert s.sample(0, hidden) is None  # the first block never shuffles: nothing drawn
    assert s.sample(depth - 1, hidden).shape == ((3, 10) if per_sample else (10,))


@pytest.mark.parametrize("shape", [(10,), (3, 10)])
def test_permute_and_restore_are_exact_inverses(shape):
    x = torch.randn(3, 10, 4)
    perm = torch.rand(shape).argsort(-1)
    y = permute_tokens(x, perm)
    assert not torch.equal(y, x)
    assert torch.equal(restore_tokens(y, perm), x)


def test_class_token_readout_is_unchanged_by_a_block_that_ignores_order():
    """With identity-like blocks the shuffle must be invisible: order is restored after each block."""
    m = model_with(1.0)
    with torch.no_grad():
        for layer in m.layers:
            layer.mixer.out_proj.weight.zero_()  # each block adds nothing: output = f(tokens) only
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats_train = m.train().forward_features(x)
        feats_eval = m.eval().forward_features(x)
    assert torch.equal(feats_train, feats_eval)
    assert torch.equal(m.forward_head(feats_train), m.forward_head(feats_eval))
