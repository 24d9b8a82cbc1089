"""Antidote (csulora.methods.antidote) against a reference written here from the definition.

The reference scores every weight by |W_ij| * ||x_j|| with the norms taken from explicit
activations (token by token), sorts each row in Python by (score, column), keeps the first
int(width * (1 - ratio)) and zeroes the rest (docs/peers.md).
"""

from __future__ import annotations

import math

import pytest
import torch

from csulora.errors import OptionError
from csulora.linalg.gram import Eigen, moment_diagonal, normalised_gram
from csulora.methods.antidote import (
    ANTIDOTE_TUNING,
    PUBLISHED_DENSE_RATIO_ADAPTER,
    PUBLISHED_DENSE_RATIO_FULL,
    AntidoteConfig,
    antidote_dense_,
    antidote_factors,
    is_published_full_target,
    pruned_per_row,
    top_score_mask,
)
from csulora.types import SecondMoment


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def activations(tokens, n, seed):
    return randn(tokens, n, seed=seed) * torch.linspace(0.2, 2.0, n, dtype=torch.float64)


def reference_prune(W, norms, ratio):
    """Zero each row's highest |W_ij| * norms_j entries, ties to the higher column."""
    out = W.clone()
    rows, width = W.shape
    keep = int(width * (1 - ratio))
    for i in range(rows):
        ranked = sorted(range(width), key=lambda j: (float(abs(W[i, j]) * norms[j]), j))
        for j in ranked[keep:]:
            out[i, j] = 0.0
    return out


def token_norms(x):
    """||x_j|| over tokens, summed token by token."""
    return torch.tensor([math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0]))) for j in range(x.shape[1])])


def dense_moment(x):
    return SecondMoment(n=x.shape[1], matrix=normalised_gram(x.T @ x, x.shape[0]))


@pytest.mark.parametrize(
    ("width", "ratio", "expected"),
    [(4096, 1e-5, 1), (4096, 0.1, 410), (8, 0.1, 1), (10, 0.1, 1), (16, 0.1, 2), (576, 0.3, 173), (7, 0.0, 0), (7, 1.0, 7)],
)
def test_pruned_per_row_keeps_the_published_float_arithmetic(width, ratio, expected):
    assert pruned_per_row(width, ratio) == expected


@pytest.mark.parametrize(("ratio", "seed"), [(0.1, 0), (0.3, 1), (1e-5, 2), (0.5, 3)])
def test_full_fine_tune_matches_the_reference(ratio, seed):
    m, n = 9, 23
    W_aligned, dW = randn(m, n, seed=seed), 0.1 * randn(m, n, seed=seed + 10)
    x = activations(40, n, seed + 20)
    X = dW.clone()
    pruned = antidote_dense_(X, W_aligned, moment_diagonal(dense_moment(x)), ratio)
    expected = reference_prune(W_aligned + dW, token_norms(x), ratio)
    torch.testing.assert_close(W_aligned + X, expected, rtol=0, atol=1e-15)
    assert pruned == m * pruned_per_row(n, ratio) == int((expected == 0).sum())


def test_ties_prune_the_higher_column_first():
    W = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0]], dtype=torch.float64)
    mask = top_score_mask(W, torch.ones(5, dtype=torch.float64), 0.5)  # prunes 5 - int(2.5) = 3
    assert mask.tolist() == [[False, True, True, False, True]]
    mask = top_score_mask(W, torch.ones(5, dtype=torch.float64), 0.3)  # prunes 5 - int(3.5) = 2
    assert mask.tolist() == [[False, False, True, False, True]]


@pytest.mark.parametrize("spiked", [False, True])
def test_lora_factors_match_the_reference_with_b_scored_on_a_x(spiked):
    n, r, m = 20, 6, 11
    basis = randn(3, n, seed=5)
    x = randn(60, 3, seed=6) @ basis + 0.05 * randn(60, n, seed=7)
    S = normalised_gram(x.T @ x, 60)
    moment = SecondMoment(n=n, matrix=S)
    if spiked:
        # an exact spiked form: the Gram of 3 directions over an isotropic floor
        S = normalised_gram(basis.T @ basis + 0.2 * torch.eye(n, dtype=torch.float64), 1)
        moment = Eigen.of(S).spiked(3, 1)
        x = torch.linalg.cholesky(S).T  # rows whose Gram is S: the same norms
    A, B = randn(r, n, seed=8), randn(m, r, seed=9)
    out = antidote_factors(A, B, moment, 0.3)
    torch.testing.assert_close(out.A, reference_prune(A, token_norms(x), 0.3), rtol=0, atol=0)
    torch.testing.assert_close(out.B, reference_prune(B, token_norms(x @ A.T), 0.3), rtol=0, atol=0)
    assert out.pruned_A == r * pruned_per_row(n, 0.3) and out.pruned_B == m * pruned_per_row(r, 0.3)
    assert out.A.shape == A.shape and out.B.shape == B.shape  # same rank: still a LoRA


def test_the_scale_of_the_statistics_does_not_matter():
    W, q = randn(7, 15, seed=10), randn(15, seed=11).abs()
    assert torch.equal(top_score_mask(W, q, 0.2), top_score_mask(W, 1e3 * q, 0.2))


def test_ratio_zero_is_the_identity_and_ratio_one_zeroes_everything():
    A, B = randn(3, 8, seed=12), randn(5, 3, seed=13)
    moment = dense_moment(activations(20, 8, 14))
    out = antidote_factors(A, B, moment, 0.0)
    assert torch.equal(out.A, A) and torch.equal(out.B, B) and out.pruned_A == out.pruned_B == 0
    out = antidote_factors(A, B, moment, 1.0)
    assert not out.A.any() and not out.B.any()
    dW, W_aligned = randn(4, 8, seed=15), randn(4, 8, seed=16)
    X = dW.clone()
    assert antidote_dense_(X, W_aligned, moment_diagonal(moment), 0.0) == 0 and torch.equal(X, dW)
    antidote_dense_(X, W_aligned, moment_diagonal(moment), 1.0)
    assert torch.equal(W_aligned + X, torch.zeros_like(X))


def test_a_zero_update_still_prunes_the_fine_tuned_weights_but_zero_factors_stay_zero():
    W_aligned = randn(4, 10, seed=17)
    q = torch.ones(10, dtype=torch.float64)
    X = torch.zeros(4, 10, dtype=torch.float64)
    assert antidote_dense_(X, W_aligned, q, 0.1) == 4  # published: the weights, not the update
    assert torch.equal((W_aligned + X) == 0, top_score_mask(W_aligned, q, 0.1))
    out = antidote_factors(torch.zeros(2, 10, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64),
                           SecondMoment(n=10, matrix=torch.eye(10, dtype=torch.float64)), 0.3)
    assert not out.A.any() and not out.B.any()


def test_inputs_no_token_reaches_are_pruned_last():
    # A rank-deficient Gram: input 2 is never active, so its weights score 0 and survive a small ratio.
    x = activations(30, 6, 18)
    x[:, 2] = 0.0
    W = randn(5, 6, seed=19)
    W[:, 2] = 100.0  # the largest weights, but on an input harmful data never uses
    mask = top_score_mask(W, moment_diagonal(dense_moment(x)), 0.3)  # 6 - int(4.2) = 2 per row
    assert not mask[:, 2].any() and int(mask.sum()) == 10


def test_bad_shapes_are_value_errors():
    with pytest.raises(ValueError, match="columns"):
        top_score_mask(torch.ones(2, 3), torch.ones(4), 0.1)
    with pytest.raises(ValueError, match="lora_A has 5 columns"):
        antidote_factors(torch.ones(2, 5), torch.ones(3, 2), SecondMoment(n=4, matrix=torch.eye(4)), 0.1)
    with pytest.raises(ValueError, match="aligned weight"):
        antidote_dense_(torch.ones(2, 3), torch.ones(3, 2), torch.ones(3), 0.1)


def test_published_full_fine_tune_targets_and_the_prune_option():
    assert is_published_full_target("model.layers.0.self_attn.q_proj")
    assert is_published_full_target("model.layers.3.self_attn.v_proj")
    assert not is_published_full_target("model.layers.0.self_attn.o_proj")
    assert not is_published_full_target("model.layers.0.mlp.down_proj")
    assert not AntidoteConfig().prunes("model.layers.0.mlp.up_proj")
    assert AntidoteConfig(prune="all").prunes("model.layers.0.mlp.up_proj")


def test_config_defaults_to_the_published_ratio_for_the_kind_and_validates():
    config = AntidoteConfig()
    assert config.ratio(full_fine_tune=False) == PUBLISHED_DENSE_RATIO_ADAPTER == 0.1
    assert config.ratio(full_fine_tune=True) == PUBLISHED_DENSE_RATIO_FULL == 1e-5
    assert AntidoteConfig(dense_ratio=0.2).ratio(full_fine_tune=True) == 0.2
    for bad in (-0.1, 1.5, math.nan, "x", True):
        with pytest.raises(OptionError, match="--dense-ratio"):
            AntidoteConfig(dense_ratio=bad)
    with pytest.raises(OptionError, match="--prune"):
        AntidoteConfig(prune="mlp")


def test_tuning_starts_at_the_identity_and_covers_both_published_defaults():
    assert ANTIDOTE_TUNING.identity == ANTIDOTE_TUNING.grid[0] == 0.0
    assert ANTIDOTE_TUNING.order_weakest_first(ANTIDOTE_TUNING.grid) == ANTIDOTE_TUNING.grid
    assert {PUBLISHED_DENSE_RATIO_FULL, PUBLISHED_DENSE_RATIO_ADAPTER} <= set(ANTIDOTE_TUNING.grid)


def test_without_statistics_the_error_names_the_command_that_writes_them():
    from csulora.methods.registry import get_method, make_config

    method = get_method("antidote")
    with pytest.raises(OptionError, match=r"give --update-statistics FILE \(written by `csulora calibrate ALIGNED "
                                          r"--update UPDATE --pairs PAIRS\.jsonl -o FILE`"):
        method.check_sources(make_config(method, {}), has_displacement=False, has_subspace=False)
