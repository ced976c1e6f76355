"""ADQ codebook quantizer: quantile init, nearest-level assignment, STE, EMA by hand, reseeding, fixed point."""

import math

import pytest
import torch

from mpqat.errors import ConfigError
from mpqat.quant.codebook import (
    CODEWORD_MAX,
    CodebookWeightQuantizer,
    assign,
    assign_rows,
    codebook_fake_quant,
    initial_magnitudes,
    side_sizes,
    snap_levels,
    sorted_quantiles,
    strictly_increasing,
)
from mpqat.quant.functional import dyadic_parts


def _grid(n: int = 1000) -> torch.Tensor:
    """Uniform magnitudes (1..n)/n on both signs: quantiles are known in closed form."""
    mags = torch.arange(1, n + 1, dtype=torch.float64) / n
    return torch.cat([-mags, mags]).reshape(20, -1)


def test_quantile_init_on_a_uniform_distribution_hits_the_known_quantiles():
    n = 1000
    for bits in (2, 3, 4):
        k = 2 ** (bits - 1) - 1
        neg, pos = initial_magnitudes(_grid(n), bits)
        # linear interpolation on (1..n)/n: Q(p) = (1 + p (n - 1)) / n, at p = (j - 1/2)/K
        expected = torch.tensor([(1 + (j - 0.5) / k * (n - 1)) / n for j in range(1, k + 1)], dtype=torch.float64)
        assert torch.allclose(pos, expected, rtol=0, atol=1e-12)
        assert torch.equal(neg, pos)  # symmetric codebook
    neg, pos = initial_magnitudes(_grid(n), 3, levels="full")
    assert (neg.numel(), pos.numel()) == side_sizes(3, "full") == (4, 3)
    assert torch.allclose(neg, torch.tensor([(1 + p * (n - 1)) / n for p in (1 / 8, 3 / 8, 5 / 8, 7 / 8)],
                                            dtype=torch.float64), atol=1e-12)


def test_quantile_init_averages_the_two_signs_and_matches_torch_quantile():
    gen = torch.Generator().manual_seed(0)
    w = torch.cat([torch.rand(3000, generator=gen) * 2.0, -torch.rand(1000, generator=gen) * 0.5])
    _, pos = initial_magnitudes(w, 3)
    p = torch.tensor([1 / 6, 1 / 2, 5 / 6], dtype=torch.float64)
    ref = 0.5 * (torch.quantile(w[w > 0].double(), p) + torch.quantile(-w[w < 0].double(), p))
    assert torch.allclose(pos, ref, atol=1e-12)
    x = torch.randn(999, generator=gen).double()
    probs = torch.rand(7, generator=gen).double()
    assert torch.allclose(sorted_quantiles(torch.sort(x).values, probs), torch.quantile(x, probs), atol=1e-12)


def test_uniform_init_is_lsq_initial_grid():
    w = torch.tensor([-1.0, -0.5, 0.25, 0.25])
    neg, pos = initial_magnitudes(w, 3, init="uniform")
    step = 2 * 0.5 / math.sqrt(3)
    assert torch.allclose(pos, torch.tensor([1, 2, 3], dtype=torch.float64) * step)


def test_assignment_by_bucketize_equals_argmin_on_random_data():
    gen = torch.Generator().manual_seed(1)
    for bits, levels in ((2, "symmetric"), (3, "symmetric"), (4, "full"), (6, "symmetric")):
        q = CodebookWeightQuantizer(32, 50, bits, levels=levels)
        w = torch.randn(32, 50, generator=gen) * 0.3
        q.initialize(w)
        codes, s = snap_levels(q.levels())
        table = codes * s
        brute = (w.double().unsqueeze(-1) - table).abs().argmin(-1)
        assert torch.equal(q.indices(w), brute)
        assert q.n_levels() == (2**bits - 1 if levels == "symmetric" else 2**bits)
        assert int(q.codebook_int()[q.index_offset()]) == 0


def test_ties_between_two_levels_go_to_the_upper_level():
    codes, s = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)
    assert assign(torch.tensor([-0.25, 0.25]), codes, s).tolist() == [1, 2]


def test_forward_is_fixed_point_and_the_gradient_is_straight_through():
    q = CodebookWeightQuantizer(8, 16, 3).train()
    w = (torch.randn(8, 16) * 0.2).requires_grad_(True)
    out = q(w)
    assert bool(q.initialized)
    upstream = torch.randn(8, 16)
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)  # identity: codebook gets no gradient, no clipping
    codes = q.integer_codes(w.detach().double())
    scale = q.scale()
    assert scale.shape == (1, 1) and scale.dtype == torch.float64
    m, e = dyadic_parts(scale.reshape(-1))
    assert int(m[0]) < 2**16 and float(m[0]) * 2.0 ** -int(e[0]) == float(scale)
    assert torch.equal(codes, codes.round()) and int(codes.abs().max()) <= CODEWORD_MAX
    assert torch.allclose((codes * scale).float(), out.detach())
    assert set(codes.unique().tolist()) <= set(q.codebook_int().tolist())
    assert len(q.codebook_int()) == 7 and q.codebook_int().tolist() == sorted(q.codebook_int().tolist())
    assert q.bits().tolist() == [3.0] and q.extra_metadata_bits() == 7 * 12


def test_ema_update_on_a_hand_made_example():
    # ternary codebook; quantile init c0 = (median(0.1, 0.7, 0.8) + median(0.6, 0.9)) / 2 = 0.725
    w = torch.tensor([[-0.9, -0.6, 0.0], [0.1, 0.7, 0.8]], dtype=torch.float64)
    q = CodebookWeightQuantizer(2, 3, 2, decay=0.5)
    q.initialize(w)
    assert q.levels().tolist() == pytest.approx([-0.725, 0.0, 0.725], abs=1e-12)
    # assignment: {-0.9, -0.6, 0.7, 0.8} -> +-c (n = 4, m = 3.0); {0, 0.1} -> 0. Init state N = 4, M = 0.725 * 4
    assert float(q.pos_count[0]) == 4.0
    assert q.ema_update(w)
    # N = 0.5*4 + 0.5*4 = 4, M = 0.5*2.9 + 0.5*3.0 = 2.95, c = 0.7375
    assert float(q.pos_levels[0]) == pytest.approx(0.7375, abs=1e-12)
    w2 = torch.tensor([[-0.2, 0.0, 0.0], [0.0, 0.0, 1.2]], dtype=torch.float64)  # now only 1.2 is on the level (0.2 < midpoint)
    assert q.ema_update(w2)
    # N = 0.5*4 + 0.5*1 = 2.5, M = 0.5*2.95 + 0.5*1.2 = 2.075, c = 0.83
    assert float(q.pos_levels[0]) == pytest.approx(0.83, abs=1e-12)
    assert q.levels().tolist() == pytest.approx([-0.83, 0.0, 0.83], abs=1e-12)
    assert int(q.reseeds) == 0


def test_ema_full_codebook_tracks_each_side_separately():
    w = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    q = CodebookWeightQuantizer(1, 6, 2, levels="full", decay=0.0)  # decay 0: levels = means of their cells
    q.set_magnitudes(torch.tensor([0.4, 1.1]), torch.tensor([1.5]), w)
    assert q.levels().tolist() == pytest.approx([-1.1, -0.4, 0.0, 1.5])
    q.ema_update(w)
    assert q.levels().tolist() == pytest.approx([-1.0, -0.5, 0.0, 1.5])  # 0.5 -> level 0; 1.0, 2.0 -> 1.5


def test_update_every_and_frozen_codebook():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(10, 10, generator=gen)
    q = CodebookWeightQuantizer(10, 10, 3, decay=0.5, update_every=3)
    q.initialize(w)
    shifted = w * 1.5
    before = q.levels().clone()
    assert not q.ema_update(shifted) and not q.ema_update(shifted)
    assert torch.equal(q.levels(), before)
    assert q.ema_update(shifted)
    assert not torch.equal(q.levels(), before) and q.drift() > 0
    q.freeze_codebook()
    frozen = q.levels().clone()
    for _ in range(6):
        assert not q.ema_update(shifted * 3)
    assert torch.equal(q.levels(), frozen)


def test_dead_level_is_reseeded_from_the_quantiles():
    w = torch.cat([torch.full((50,), 0.3), torch.full((50,), 0.5), -torch.full((50,), 0.3), -torch.full((50,), 0.5)])
    q = CodebookWeightQuantizer(1, 200, 3, decay=0.1)
    q.set_magnitudes(torch.zeros(3), torch.tensor([0.3, 0.5, 5.0]), w)  # 5.0 is never used: dead at once
    assert float(q.pos_count[2]) == 0.0
    q.ema_update(w)
    assert int(q.reseeds) == 1
    quantile = initial_magnitudes(w, 3)[1][2]  # the rank-3 quantile of |w| = 0.5
    assert sorted(q.magnitudes()[1].tolist())[-1] == pytest.approx(float(quantile), rel=1e-5)
    assert float(q.magnitudes()[1].max()) < 1.0


def test_levels_stay_sorted_and_strictly_increasing_under_random_updates():
    gen = torch.Generator().manual_seed(3)
    for levels in ("symmetric", "full"):
        q = CodebookWeightQuantizer(16, 16, 4, levels=levels, decay=0.3)
        q.initialize(torch.randn(16, 16, generator=gen))
        for _ in range(30):
            w = torch.randn(16, 16, generator=gen) * torch.rand(1, generator=gen) * 3
            w[w.abs() < 0.5] = 0.0  # many weights at zero, some levels lose everything
            q.ema_update(w)
            lv = q.levels()
            assert bool((lv.diff() > 0).all()), lv
            codes = q.codebook_int()
            assert bool((codes.diff() >= 0).all()) and int(codes[q.index_offset()]) == 0


def test_strictly_increasing_fixes_ties_and_zeros():
    out = strictly_increasing(torch.tensor([0.0, 0.2, 0.2, 0.1]))
    assert bool((out.diff() > 0).all()) and float(out[0]) > 0


def test_set_bits_keeps_state_dict_shapes_and_requires_a_new_init():
    q = CodebookWeightQuantizer(4, 4, 4, max_bits=4)
    shapes = {k: v.shape for k, v in q.state_dict().items()}
    q.set_bits(2)
    assert {k: v.shape for k, v in q.state_dict().items()} == shapes
    assert not bool(q.initialized) and q.n_levels() == 3
    with pytest.raises(ConfigError, match="max_bits"):
        q.set_bits(5)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"bits": 1}, "codebook index bits"), ({"bits": 9}, "codebook index bits"), ({"levels": "odd"}, "levels"),
    ({"decay": 1.0}, "decay"), ({"update_every": 0}, "update_every"), ({"init": "kmeans"}, "init"),
    ({"channel_scale": "max"}, "channel_scale"), ({"ste": "soft"}, "ste"), ({"level_grad": "yes"}, "level_grad"),
    ({"level_grad_mode": "exact"}, "level_grad_mode"),
])
def test_bad_arguments_are_config_errors(kwargs, fragment):
    args = {"out_rows": 2, "fan_in": 2, "bits": 2, **kwargs}
    with pytest.raises(ConfigError, match=fragment):
        CodebookWeightQuantizer(**args)


def test_sensitivity_quantizer_error_falls_with_bits():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(64, 64, generator=gen) * 0.05
    for init in ("quantile", "uniform"):
        errors = [float(((codebook_fake_quant(w, b, init=init) - w) ** 2).sum()) for b in (2, 3, 4, 6)]
        assert errors == sorted(errors, reverse=True)
        assert errors[-1] < 0.05 * errors[0]


@pytest.mark.slow
def test_quantile_init_works_beyond_torch_quantile_size_limit():
    w = torch.linspace(-1, 1, 17_000_001)
    neg, pos = initial_magnitudes(w, 2)
    assert float(pos[0]) == pytest.approx(0.5, abs=1e-6)


# ------------------------------------------------------------------------------------------ channel scale


def _uneven_rows() -> torch.Tensor:
    """One row at magnitudes 1e-3 .. 10 (what BatchNorm folding does to a conv's channels)."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(1, 50, generator=gen, dtype=torch.float64).repeat(6, 1)
    return base * torch.tensor([1e-3, 1e-2, 0.1, 1.0, 3.0, 10.0], dtype=torch.float64).reshape(-1, 1)


def test_a_per_layer_ternary_codebook_zeroes_small_rows_and_a_per_channel_one_does_not():
    w = _uneven_rows()
    layer = CodebookWeightQuantizer(6, 50, 2)
    layer.initialize(w)
    assert (layer.integer_codes(w)[:2] == 0).all()          # the small channels vanish
    rows = CodebookWeightQuantizer(6, 50, 2, channel_scale="absmean")
    rows.initialize(w)
    codes = rows.integer_codes(w)
    assert ((codes != 0).float().mean(dim=1) > 0.3).all()   # every channel keeps its sign pattern
    # the same error relative to each row's size: the rows differ only by their scale
    rel = ((rows(w) - w) ** 2).sum(1) / (w**2).sum(1)
    assert float(rel.max() - rel.min()) < 1e-3 * float(rel.max())  # (the row scales are snapped to 16 bits)


def test_channel_scale_forward_is_codes_times_dyadic_row_scales():
    w = _uneven_rows()
    q = CodebookWeightQuantizer(6, 50, 3, channel_scale="absmean")
    q.initialize(w)
    scale = q.scale()
    assert scale.shape == (6, 1)
    mult, exp = dyadic_parts(scale.reshape(-1))
    assert torch.equal(torch.ldexp(mult.double(), -exp), scale.reshape(-1)) and int(mult.max()) < 2**16
    assert torch.equal(q(w).detach(), q.integer_codes(w) * scale)
    assert torch.equal(q.indices(w), assign_rows(w, q.codebook_int().double(), scale))
    # a 4-D conv kernel is assigned row by row like its 2-D view
    kernel = w.reshape(6, 2, 5, 5)
    assert torch.equal(q.indices(kernel).reshape(6, -1), q.indices(w))
    assert torch.equal(codebook_fake_quant(w, 3, channel_scale="absmean"), q(w).detach())


def test_channel_scale_ema_follows_the_row_magnitudes():
    w = _uneven_rows()
    q = CodebookWeightQuantizer(6, 50, 2, decay=0.5, channel_scale="absmean")
    q.initialize(w)
    before = q.row_scale.clone()
    q.ema_update(2 * w)                                    # every row doubles: r_o moves halfway
    assert torch.allclose(q.row_scale, 1.5 * before)
    q.freeze_codebook()
    q.ema_update(4 * w)
    assert torch.allclose(q.row_scale, 1.5 * before)       # frozen: the row scales stay too


def test_old_checkpoints_without_row_scales_still_load():
    q = CodebookWeightQuantizer(6, 50, 2)
    q.initialize(_uneven_rows())
    state = q.state_dict()
    del state["row_scale"]
    fresh = CodebookWeightQuantizer(6, 50, 2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.row_scale, torch.ones(6, dtype=torch.float64))
    assert torch.equal(fresh.levels(), q.levels())


def test_clipped_ste_stops_the_gradient_half_a_gap_beyond_the_outermost_levels():
    w = torch.tensor([[-3.0, -0.1, 0.2, 1.0], [0.5, -0.6, 2.5, 0.05]], requires_grad=True)
    identity = CodebookWeightQuantizer(2, 4, 2)
    clipped = CodebookWeightQuantizer(2, 4, 2, ste="clipped")
    identity.initialize(w)
    clipped.initialize(w)
    c = float(clipped.levels()[-1])                      # ternary {-c, 0, c}: the bound is 1.5 c
    y = clipped(w)
    assert torch.equal(y.detach(), identity(w).detach())  # the same forward
    y.sum().backward()
    assert torch.equal(w.grad, (w.detach().abs() <= 1.5 * c).float())
    assert 0 < float(w.grad.sum()) < w.numel()


# ------------------------------------------------------------------------------------------ learned levels


def _learned(rows: int, fan_in: int, bits: int, pos, neg=None, **kwargs) -> CodebookWeightQuantizer:
    q = CodebookWeightQuantizer(rows, fan_in, bits, level_grad=True, **kwargs)
    pos = torch.tensor(pos, dtype=torch.float64)
    q.set_magnitudes(pos if neg is None else torch.tensor(neg, dtype=torch.float64), pos)
    return q


def test_ternary_level_gradient_is_the_signed_sum_of_the_output_gradients_by_hand():
    w = torch.tensor([[-0.9, -0.2, 0.1, 0.6], [0.8, -0.7, 0.05, 1.2]], requires_grad=True)
    u = torch.tensor([[0.3, 5.0, -7.0, -0.5], [2.0, 0.25, 9.0, -1.0]])      # dL/dw_q of L = sum(u * w_q)
    q = _learned(2, 4, 2, [0.5])                                             # {-0.5, 0, 0.5}, mid-points +-0.25
    y = q(w)
    plain = CodebookWeightQuantizer(2, 4, 2)
    plain.set_magnitudes(torch.tensor([0.5]), torch.tensor([0.5]))
    assert torch.equal(y.detach(), plain(w).detach())                        # the same forward values
    (u * y).sum().backward()
    # at +c: 0.6, 0.8, 1.2 -> -0.5 + 2.0 - 1.0; at -c: -0.9, -0.7 -> 0.3 + 0.25; zero: the rest
    by_hand = ((-0.5 + 2.0 - 1.0) - (0.3 + 0.25)) / math.sqrt(8 * 1)        # LSQ scale 1/sqrt(numel * Q), Q = 1
    assert q.pos_levels.grad[0].item() == pytest.approx(by_hand, rel=1e-6)       # (u is float32)
    assert torch.equal(q.pos_levels.grad[1:], torch.zeros_like(q.pos_levels.grad[1:]))  # unused slots
    assert torch.equal(w.grad, u)                                            # the weights keep the identity STE
    assert not isinstance(q.neg_levels, torch.nn.Parameter)                  # symmetric: one set of magnitudes


def test_multi_level_gradients_per_level_full_layout_and_channel_scale():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 16, generator=gen, dtype=torch.float64) * torch.tensor([[0.5], [1.0], [2.0], [4.0]],
                                                                              dtype=torch.float64)
    u = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    cases = [
        (dict(bits=3), [0.3, 0.9, 1.8], None),
        (dict(bits=3, levels="full"), [0.4, 1.0, 2.0], [0.2, 0.7, 1.4, 2.5]),
        (dict(bits=3, channel_scale="absmean"), [0.3, 0.9, 1.8], None),
    ]
    for kwargs, pos, neg in cases:
        bits = kwargs.pop("bits")
        q = CodebookWeightQuantizer(4, 16, bits, level_grad=True, **kwargs)
        q.initialize(w)                                                      # row magnitudes for absmean
        pos_t = torch.tensor(pos, dtype=torch.float64)
        q.set_magnitudes(pos_t if neg is None else torch.tensor(neg, dtype=torch.float64), pos_t)
        (u * q(w)).sum().backward()
        rel = q.indices(w) - q.index_offset()                                # signed level rank of every weight
        r = q.row_scale.reshape(-1, 1) if kwargs.get("channel_scale") else torch.ones(4, 1, dtype=torch.float64)
        g = 1 / math.sqrt(64 * 3)
        k_neg, k_pos = q.sizes()
        expect_pos = [float((u * r)[rel == j].sum()) * g for j in range(1, k_pos + 1)]
        expect_neg = [-float((u * r)[rel == -j].sum()) * g for j in range(1, k_neg + 1)]
        if neg is None:                                                      # symmetric: both signs pooled
            expect_pos = [a + b for a, b in zip(expect_pos, expect_neg, strict=True)]
        else:
            assert q.neg_levels.grad[:k_neg].tolist() == pytest.approx(expect_neg, rel=1e-9)
        assert q.pos_levels.grad[:k_pos].tolist() == pytest.approx(expect_pos, rel=1e-9), kwargs
        assert all((rel == j).any() for j in range(-k_neg, k_pos + 1))      # every level is used here


def test_lsq_mode_on_a_ternary_codebook_is_lsqs_step_gradient():
    w = torch.tensor([[-0.9, -0.2, 0.1, 0.6], [0.8, -0.7, 0.05, 1.2]], dtype=torch.float64)
    u = torch.tensor([[0.3, 5.0, -7.0, -0.5], [2.0, 0.25, 9.0, -1.0]], dtype=torch.float64)
    q = _learned(2, 4, 2, [0.5], level_grad_mode="lsq")
    (u * q(w)).sum().backward()
    c = 0.5
    v = w / c                                          # LSQ: d w_q / d s = round(v) - v inside [-1, 1], sign(v) beyond
    inside = v.abs() <= 1
    lsq = torch.where(inside, torch.round(v) - v, torch.sign(v))
    assert q.pos_levels.grad[0].item() == pytest.approx(float((u * lsq).sum()) / math.sqrt(8), rel=1e-12)
    # by hand, c = 0.5: beyond c -> sign: -0.9 (-1 * 0.3), 0.6 (1 * -0.5), 0.8 (1 * 2), -0.7 (-1 * 0.25),
    # 1.2 (1 * -1); zero cell -> -w/c: -0.2 (0.4 * 5), 0.1 (-0.2 * -7), 0.05 (-0.1 * 9)
    by_hand = -0.3 - 0.5 + 2.0 - 0.25 - 1.0 + 2.0 + 1.4 - 0.9
    assert q.pos_levels.grad[0].item() == pytest.approx(by_hand / math.sqrt(8), rel=1e-12)


def test_lsq_mode_per_level_attribution_on_a_3_bit_codebook():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    u = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    mags = [0.3, 0.9, 1.8]
    q = _learned(4, 16, 3, mags, level_grad_mode="lsq")
    (u * q(w)).sum().backward()
    rel = (q.indices(w) - q.index_offset()).reshape(-1)
    expect = [0.0, 0.0, 0.0]
    for wi, ui, ri in zip(w.reshape(-1).tolist(), u.reshape(-1).tolist(), rel.tolist(), strict=True):
        sign = 1.0 if wi >= 0 else -1.0
        if ri == 0:
            expect[0] += ui * (-wi / mags[0])                      # zero cell: -w / c_1
        elif abs(wi) > mags[-1]:
            expect[2] += ui * sign                                 # beyond the outermost level: sign
        else:
            expect[abs(ri) - 1] += ui * (sign - wi / mags[abs(ri) - 1])
    g = 1 / math.sqrt(64 * 3)
    assert q.pos_levels.grad[:3].tolist() == pytest.approx([e * g for e in expect], rel=1e-9)
    assert (w.abs() > mags[-1]).any() and (rel == 0).any()


def test_learned_levels_grow_on_a_task_that_wants_a_larger_level():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen)
    q = CodebookWeightQuantizer(32, 64, 2, level_grad=True)
    q.initialize(w)                                                          # quantile init: median |w| ~ 0.67
    start = float(q.levels()[-1])
    opt = torch.optim.Adam([q.pos_levels], lr=0.02)
    for _ in range(300):                                                     # the task: reproduce 1.5 w
        loss = ((q(w) - 1.5 * w) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        q.project_levels()
    end = float(q.levels()[-1])
    assert end > 1.5 * start
    # near the least-squares level of its own assignment: mean |1.5 w| over the weights assigned to +-c
    picked = q.indices(w) != q.index_offset()
    assert end == pytest.approx(float(1.5 * w[picked].abs().mean()), rel=0.05)


def test_frozen_or_eval_codebooks_get_no_level_gradient():
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
    q = _learned(3, 5, 2, [0.5])
    q.freeze_codebook()
    q(w).sum().backward()
    assert q.pos_levels.grad is None and w.grad is not None
    q.freeze_codebook(False)
    with torch.no_grad():
        q(w)
    q.eval()
    assert torch.equal(q(w).detach(), (q.integer_codes(w) * q.scale()).float())


def test_project_levels_sorts_keeps_positive_and_leaves_valid_levels_alone():
    q = _learned(1, 8, 3, [0.2, 0.5, 1.0])
    before = q.levels().clone()
    assert not q.project_levels() and torch.equal(q.levels(), before)       # valid: untouched, bit for bit
    with torch.no_grad():
        q.pos_levels[:3] = torch.tensor([0.7, -0.1, 0.4], dtype=torch.float64)
        q.pos_count[:3] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert q.project_levels()
    mags = q.magnitudes()[1]
    assert bool((mags > 0).all()) and bool((mags[1:] > mags[:-1]).all())
    assert mags[1:].tolist() == [0.4, 0.7] and q.pos_count[:3].tolist() == [2.0, 3.0, 1.0]  # counts follow
    assert torch.equal(q.neg_levels[:3], q.pos_levels[:3].detach())          # mirrored
    full = _learned(1, 8, 2, [0.5], neg=[0.3, 0.9], levels="full")
    with torch.no_grad():
        full.neg_levels[:2] = torch.tensor([1.2, 0.6], dtype=torch.float64)
    assert full.project_levels() and full.levels().tolist() == [-1.2, -0.6, 0.0, 0.5]


def test_ema_on_learned_levels_pulls_from_the_current_levels():
    w = torch.tensor([[0.6, -0.8, 0.05, 1.0]], dtype=torch.float64)
    q = _learned(1, 4, 2, [0.5], decay=0.5)
    q.set_magnitudes(torch.tensor([0.5]), torch.tensor([0.5]), w)           # counts: 3 weights at +-c, sum 1.5
    with torch.no_grad():
        q.pos_levels[0] = 0.7                                                # a gradient step moved c
    q.project_levels()
    q.ema_update(w)
    # N = .5*3 + .5*3 = 3, M = .5*(0.7*3) + .5*(0.6+0.8+1.0) -> c = (1.05 + 1.2) / 3
    assert q.levels()[-1].item() == pytest.approx((1.05 + 1.2) / 3, rel=1e-12)
    plain = CodebookWeightQuantizer(1, 4, 2, decay=0.5)                      # without level_grad: from 0.5
    plain.set_magnitudes(torch.tensor([0.5]), torch.tensor([0.5]), w)
    plain.ema_update(w)
    assert plain.levels()[-1].item() == pytest.approx((0.75 + 1.2) / 3, rel=1e-12)


def test_learned_levels_keep_the_state_dict_keys_and_load_older_checkpoints():
    w = _uneven_rows()
    old = CodebookWeightQuantizer(6, 50, 3)
    old.initialize(w)
    learned = CodebookWeightQuantizer(6, 50, 3, level_grad=True)
    assert isinstance(learned.pos_levels, torch.nn.Parameter)
    assert set(learned.state_dict()) == set(old.state_dict())                  # parameters replace buffers, same keys
    learned.load_state_dict(old.state_dict())                                # a checkpoint from before level_grad
    assert torch.equal(learned.levels(), old.levels()) and isinstance(learned.pos_levels, torch.nn.Parameter)
    back = CodebookWeightQuantizer(6, 50, 3)
    back.load_state_dict(learned.state_dict())
    assert torch.equal(back.levels(), old.levels())
