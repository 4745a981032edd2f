"""Observers: the int8 formulas, the range searches, and the statistics they keep (mergeable)."""

import math

import pytest
import torch

from qpass.core.errors import QpassError
from qpass.core.int8 import affine_qparams, fake_quant, sqnr_db
from qpass.core.observers import ANGLE_BINS, Observer, pair_angle_reach
from qpass.core.ranges import CLIP_GRID, REACH_WINDOWS, channel_qparams, extreme_range, mse_range, rotary_range


def test_asymmetric_qparams_follow_the_design_formulas():
    lo, hi = torch.tensor([-1.0, 0.5, -3.0]), torch.tensor([3.0, 2.0, -1.0])
    scale, offset = affine_qparams(lo, hi, symmetric=False)
    # range widened to include 0: [0, 2] for the second channel, [-3, 0] for the third
    torch.testing.assert_close(scale, torch.tensor([4.0, 2.0, 3.0]) / 255)
    torch.testing.assert_close(offset, torch.round(-torch.tensor([-1.0, 0.0, -3.0]) / scale) - 128)
    # min and max land on the ends of the int8 range
    q_lo = torch.round(torch.tensor([-1.0, 0.0, -3.0]) / scale) + offset
    assert q_lo.tolist() == [-128, -128, -128]


def test_symmetric_qparams():
    scale, offset = affine_qparams(torch.tensor([-2.0, -0.5]), torch.tensor([1.0, 4.0]), symmetric=True)
    torch.testing.assert_close(scale, torch.tensor([2.0, 4.0]) / 127)
    assert offset.abs().sum() == 0


def test_constant_channel_gets_a_usable_scale():
    scale, offset = affine_qparams(torch.zeros(2), torch.zeros(2), symmetric=False)
    assert torch.all(scale > 0) and torch.all(torch.isfinite(offset))
    assert torch.equal(fake_quant(torch.zeros(2), scale, offset), torch.zeros(2))


def test_fake_quant_error_is_at_most_half_a_step_inside_the_range():
    x = torch.linspace(-1, 3, 1001)
    scale, offset = affine_qparams(x.min(), x.max(), symmetric=False)
    assert (fake_quant(x, scale, offset) - x).abs().max() <= scale / 2 + 1e-6


def _brute_force_best_t(v, symmetric):
    lo, hi = v.min().clamp(max=0), v.max().clamp(min=0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    errs = [(fake_quant(v, *affine_qparams(lo * t, hi * t, symmetric)) - v).pow(2).sum() for t in CLIP_GRID]
    return torch.stack(errs)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_is_near_the_brute_force_optimum(symmetric):
    torch.manual_seed(1)
    sample = torch.randn(4000, 6) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    sample[:, 3] = torch.distributions.StudentT(1.5).sample((4000,))  # heavy tails: clipping pays
    sample[:, 5] = sample[:, 5].abs()  # one-sided
    lo, hi = mse_range(sample, sample.min(0).values, sample.max(0).values, symmetric)
    for c in range(6):
        errs = _brute_force_best_t(sample[:, c], symmetric)
        ours = (fake_quant(sample[:, c], *affine_qparams(lo[c], hi[c], symmetric)) - sample[:, c]).pow(2).sum()
        # within 10% of the best error on the grid, and far better than min-max for the heavy-tailed channel
        assert ours <= errs.min() * 1.10, (c, ours, errs.min())
    full = (
        (fake_quant(sample[:, 3], *affine_qparams(sample[:, 3].min(), sample[:, 3].max(), symmetric)) - sample[:, 3])
        .pow(2)
        .sum()
    )
    ours3 = (fake_quant(sample[:, 3], *affine_qparams(lo[3], hi[3], symmetric)) - sample[:, 3]).pow(2).sum()
    assert ours3 < full  # the search clipped, and it paid


def test_observer_collects_per_channel_ranges_and_strided_samples():
    obs = Observer(stride=2, max_tokens=10)
    x = torch.randn(16, 12)  # [tokens, channels]
    obs.update(x)
    obs.update(x * 2)
    assert obs.channels == 12
    torch.testing.assert_close(obs.max, torch.maximum(x.amax(0), (2 * x).amax(0)))
    sample = obs.sample()
    assert sample.shape == (10, 12)  # capped at max_tokens
    torch.testing.assert_close(sample[:8], x[::2])  # every second token of the first update, then the second's
    torch.testing.assert_close(sample[8:], 2 * x[:4:2])
    assert obs.count == 32
    torch.testing.assert_close(obs.mean_abs, torch.cat([x, 2 * x]).abs().mean(0))


def test_merged_observers_equal_one_that_saw_everything():
    a, b, whole = (
        Observer(stride=3, max_tokens=50),
        Observer(stride=3, max_tokens=50),
        Observer(stride=3, max_tokens=50),
    )
    x, y = torch.randn(30, 5), torch.randn(60, 5) * 3
    a.update(x)
    b.update(y)
    whole.update(x)
    whole.update(y)
    a.merge(b)
    for name in ("min", "max", "abs_sum"):
        torch.testing.assert_close(getattr(a, name), getattr(whole, name))
    assert (a.count, a.total, a.total_sq) == (whole.count, whole.total, whole.total_sq)
    assert torch.equal(a.sample(), whole.sample())
    assert a.range_ratio() == whole.range_ratio()


def test_an_observer_that_saw_nothing_says_so():
    with pytest.raises(QpassError, match="saw no data"):
        Observer().sample()


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_qparams_shapes_and_sqnr(method):
    obs = Observer()
    obs.update(torch.randn(128, 12))
    scale, offset = channel_qparams(obs, method, symmetric=False)
    assert scale.shape == offset.shape == (12,)
    assert sqnr_db(obs.sample(), scale, offset) > 30


def test_percentile_clips_outliers():
    obs = Observer()
    x = torch.randn(10000, 1)
    x[0, 0] = 100.0
    obs.update(x)
    scale, _ = channel_qparams(obs, "percentile", symmetric=False, percentile=99.9)
    minmax_scale, _ = channel_qparams(obs, "minmax", symmetric=False)
    assert scale.item() < minmax_scale.item() / 5


def test_window_extremes_are_kept_per_window_and_merge():
    x = torch.arange(24.0).view(6, 4)  # three windows of two tokens, four channels
    x[3, 1] = -50.0
    whole, a, b = Observer(window=2), Observer(window=2), Observer(window=2)
    whole.update(x)
    a.update(x[:4])
    b.update(x[4:])
    a.merge(b)
    for obs in (whole, a):
        lo, hi = obs.window_extremes()
        torch.testing.assert_close(lo, x.view(3, 2, 4).amin(1))
        torch.testing.assert_close(hi, x.view(3, 2, 4).amax(1))
        torch.testing.assert_close(obs.min, x.amin(0))
        torch.testing.assert_close(obs.max, x.amax(0))
    with pytest.raises(ValueError, match="not whole windows"):
        whole.update(x[:3])
    unwindowed = Observer()
    unwindowed.update(x)
    assert unwindowed.window_extremes()[0].shape == (0, 4)


def test_extreme_range_predicts_the_maximum_of_more_windows():
    """Window maxima drawn from a Gumbel law: the range fitted on 64 windows reaches about as far as the
    largest of 100x as many windows, for every channel, and channels with steadier maxima get less headroom."""
    gen = torch.Generator().manual_seed(0)
    beta = torch.tensor([0.05, 0.5, 2.0])

    def maxima(n):  # [n, 3] Gumbel(mu=10, beta)
        return 10.0 - beta * torch.log(-torch.log(torch.rand(n, 3, generator=gen).clamp(1e-12, 1 - 1e-12)))

    obs = Observer(window=1)
    obs.update(maxima(64))
    lo, hi = extreme_range(obs, windows=6400.0)
    truth = torch.stack([maxima(6400).amax(0) for _ in range(20)]).mean(0)  # the expected maximum of 6,400
    assert torch.all(hi >= obs.max)
    torch.testing.assert_close(hi, truth, rtol=0.0, atol=float(beta.max()) * 1.5)
    headroom = hi - obs.max
    assert headroom[0] < headroom[1] < headroom[2]
    assert torch.all(lo <= obs.min)


def test_extreme_range_with_one_window_is_the_observed_range():
    obs = Observer(window=4)
    obs.update(torch.randn(4, 3))
    lo, hi = extreme_range(obs, windows=100.0)
    assert torch.equal(lo, obs.min) and torch.equal(hi, obs.max)
    no_windows = Observer()
    no_windows.update(torch.randn(8, 3))
    assert torch.equal(extreme_range(no_windows, 100.0)[1], no_windows.max)


def test_reach_sets_the_range_for_a_fixed_number_of_windows():
    """``reach`` fits as ``extreme`` does but for ``REACH_WINDOWS`` windows whatever the calibration's size: with
    7 windows that is ``extreme``'s 100x, with 64 it is less headroom than ``extreme``'s 6,400 windows."""
    gen = torch.Generator().manual_seed(1)
    for windows in (7, 64):
        obs = Observer(window=8)
        obs.update(torch.randn(windows * 8, 4, generator=gen) * torch.tensor([0.1, 1.0, 3.0, 10.0]))
        reach = channel_qparams(obs, "reach", symmetric=False)
        assert all(torch.equal(a, b) for a, b in zip(reach, affine_qparams(*extreme_range(obs, REACH_WINDOWS), False)))
        extreme = channel_qparams(obs, "extreme", symmetric=False)
        if windows * 100 == REACH_WINDOWS:
            assert all(torch.equal(a, b) for a, b in zip(reach, extreme))
        else:
            assert torch.all(reach[0] < extreme[0])  # a finer step: less headroom


def _rotate_half(x: torch.Tensor, positions: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """``x [T, heads * head_dim]`` after RoPE at ``positions [T]`` (rotate-half layout, all channels turned)."""
    t, c = x.shape
    head_dim = 2 * freq.numel()
    x = x.view(t, -1, head_dim)
    angle = positions[:, None, None] * torch.cat([freq, freq])
    half = torch.cat([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], dim=-1)
    return (x * angle.cos() + half * angle.sin()).reshape(t, c)


def test_rotary_range_holds_at_positions_the_calibration_never_reached():
    """Keys with a large steady component in every pair (what RoPE's slow pairs carry in real models), turned by RoPE:
    ranges observed over positions 0-63 clip the same keys further on, the widened ones do not; a pair that turned a
    full circle within the window keeps its range (the same keys at other angles stay within it but for a few). The
    widening reaches where the seen tokens go and no further: every slow channel's range is at least a tenth
    narrower than the bound from each channel's extremes that the widening replaced."""
    gen = torch.Generator().manual_seed(0)
    head_dim, window, context = 16, 64, 1024
    freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [8]
    base = torch.randn(4096, 2 * head_dim, generator=gen, dtype=torch.float64) * 0.3 + 2.0  # 2 heads
    seen = _rotate_half(base[:2048], torch.arange(2048) % window, freq)
    later = _rotate_half(base[:2048], torch.randint(window, context, (2048,), generator=gen), freq)
    obs = Observer(window=window, pairs=(head_dim, head_dim // 2))
    obs.update(seen)
    lo, hi = obs.min, obs.max
    wide_lo, wide_hi = rotary_range(obs, lo, hi, head_dim, freq, context)
    assert bool((wide_lo <= lo).all() and (wide_hi >= hi).all())
    outside = lambda a, b: ((later < a.double() - 1e-6) | (later > b.double() + 1e-6)).double().mean(0)  # noqa: E731
    fast = (window * freq >= 2 * torch.pi).repeat(4)  # per channel: pairs that turned a full circle in the window
    assert bool(fast.any()) and not bool(fast.all())
    assert float(outside(lo, hi)[~fast].mean()) > 0.3  # the slow pairs' calibrated ranges do not hold further on
    assert float(outside(wide_lo, wide_hi)[~fast].max()) == 0.0  # the widened ones hold everywhere
    assert float(outside(wide_lo, wide_hi)[fast].max()) < 0.01
    assert torch.equal(wide_lo[fast], lo[fast]) and torch.equal(wide_hi[fast], hi[fast])
    mag = torch.maximum(lo.abs(), hi.abs()).view(2, head_dim).double()
    norm = (mag**2 + mag.roll(head_dim // 2, 1) ** 2).sqrt()
    turn = (context * torch.cat([freq, freq])).clamp(max=torch.pi)
    old_lo = torch.maximum(-norm, lo.view(2, head_dim) - norm * turn).reshape(-1)
    old_hi = torch.minimum(norm, hi.view(2, head_dim) + norm * turn).reshape(-1)
    assert bool((wide_hi.double() <= old_hi + 1e-5).all() and (wide_lo.double() >= old_lo - 1e-5).all())
    assert bool(((wide_hi - wide_lo).double() <= 0.9 * (old_hi - old_lo))[~fast].all())
    assert rotary_range(obs, lo, hi, head_dim, freq, window) == (lo, hi)  # calibrated over the whole context
    grown = rotary_range(obs, lo * 1.5, hi * 1.5, head_dim, freq, context)  # headroom over the observed extremes
    assert bool((grown[1][~fast] >= 1.4 * wide_hi[~fast]).all())
    with pytest.raises(ValueError, match="needs an observer given the RoPE pairs"):
        rotary_range(Observer(window=window), lo, hi, head_dim, freq, context)


def test_pair_angle_reach_keeps_the_largest_norm_per_angle_and_merges():
    """Each pair's norm lands in the bin of its angle (cosine channel d, sine channel d + turned); merging two
    observers keeps the larger norm per bin, as one observer of both would."""
    x = torch.tensor([[3.0, 0.0, 0.0, 4.0], [0.0, 1.0, -2.0, 0.0]])  # one head, head_dim 4, two pairs
    reach = pair_angle_reach(x, 4, 2)
    assert reach.shape == (2, ANGLE_BINS)
    expect = torch.zeros(2, ANGLE_BINS)
    expect[0, ANGLE_BINS // 2] = 3.0  # pair (0, 2): (3, 0) at angle 0, then (0, -2) at -pi/2
    expect[0, ANGLE_BINS // 4] = 2.0
    expect[1, 3 * ANGLE_BINS // 4] = 4.0  # pair (1, 3): (0, 4) at pi/2, then (1, 0) at 0
    expect[1, ANGLE_BINS // 2] = 1.0
    assert torch.equal(reach, expect)
    one, two, both = (Observer(pairs=(4, 2)) for _ in range(3))
    one.update(x[:1])
    two.update(x[1:])
    both.update(x)
    one.merge(two)
    assert torch.equal(one.pair_reach, both.pair_reach)


def test_frontends_read_the_rotary_frequencies_of_rotate_half_models_only():
    """The torch frontend reads a rotate-half model's RoPE frequencies; GPT-2 has none."""
    from qpass.models.tiny import tiny_model
    from tests.helpers.frontend_cases import frontend

    llama = tiny_model("llama", num_layers=1)
    freq = frontend(llama, 16).rotary()
    head_dim = llama.config.hidden_size // llama.config.num_attention_heads
    expected = 1.0 / llama.config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2) / head_dim)
    assert torch.allclose(freq, expected.double(), rtol=1e-6)
    assert frontend(tiny_model("gpt2", num_layers=1), 16).rotary() is None


def test_max_context_widens_only_rope_q_and_k_and_is_refused_where_no_rope_is_read(tmp_path):
    """``--max-context``: C8's K ranges widen (V's do not), FAQuant's Q and K too; without it the ranges are as
    calibrated; a model whose RoPE qpass cannot read is refused in one line rather than left unwidened."""
    from qpass.core.calibrate import calibrate
    from qpass.core.config import QuantConfig
    from qpass.models.tiny import tiny_model
    from tests.helpers.frontend_cases import frontend

    fe = frontend(tiny_model("llama", num_layers=1), 16)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))

    def ranges(recipe, kind):
        scale, offset = recipe.get(0, kind)
        return (-128 - offset) * scale, (127 - offset) * scale, scale

    plain = calibrate(fe, ids, QuantConfig(kv_cache="static", fa_quant=True))
    wide = calibrate(fe, ids, QuantConfig(kv_cache="static", fa_quant=True, max_context=512))
    for kind in ("kv_k", "fa_q", "fa_k"):
        (lo, hi, step), (wlo, whi, _) = ranges(plain, kind), ranges(wide, kind)  # within a step: the offset rounds
        assert bool((wlo <= lo + step).all() and (whi >= hi - step).all()) and bool(
            ((whi - wlo) > (hi - lo) * 1.01).any()
        )
    for kind in ("kv_v", "fa_v"):
        assert torch.equal(plain.get(0, kind)[0], wide.get(0, kind)[0])
    gpt2 = frontend(tiny_model("gpt2", num_layers=1), 16)
    with pytest.raises(QpassError, match="--max-context 512: qpass reads no RoPE frequencies from this model"):
        calibrate(gpt2, ids, QuantConfig(kv_cache="static", max_context=512))
    with pytest.raises(ValueError, match="max_context=512 widens calibrated q/k ranges"):
        QuantConfig(kv_cache="dynamic", max_context=512)


def test_a_light_tailed_range_is_within_the_gaussian_reach_and_an_outlier_channel_is_not():
    """``gaussian_reach`` is sqrt(2 ln N) for the N values seen: Gaussian values stay within it (the bulk sets the
    range); one channel 20x the others does not (an outlier sets it): what `auto`'s light-tail rule reads."""
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    light, heavy = Observer(), Observer()
    light.update(x)
    heavy.update(x * torch.where(torch.arange(64) == 7, 20.0, 1.0))
    assert light.gaussian_reach() == heavy.gaussian_reach() == pytest.approx(math.sqrt(2 * math.log(4096 * 64)))
    assert light.range_ratio() <= light.gaussian_reach() < heavy.range_ratio()
