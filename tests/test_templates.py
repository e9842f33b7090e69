"""Templates against docs/design.md section 1, computed by hand or by a plain loop."""
import math

import pytest
import torch

import ecloss_fast as ef


@pytest.mark.parametrize("height, width, expected", [
    (14, 14, 19_307), (7, 7, 1_226), (1, 1, 2), (2, 3, 6 + 15 + 1), (3, 5, 15 + 105 + 1),
])
def test_num_templates(height, width, expected):
    assert ef.num_templates(height, width) == expected
    assert ef.make_templates(height, width).shape == (expected, height, width)


def test_square_default_width():
    assert ef.num_templates(7) == ef.num_templates(7, 7)


def _one_peak(u, v, i, j, r):
    return max(1 - math.hypot(u - i, v - j) / r, -1.0)


def test_one_peak_values_by_hand():
    t = ef.make_templates(14, 14, dtype=torch.float64)
    peak = 3 * 14 + 5  # (i, j) = (3, 5)
    assert t[peak, 3, 5] == 1.0
    assert t[peak, 3, 7] == pytest.approx(0.5)           # distance 2, r = 4
    assert t[peak, 6, 9] == pytest.approx(1 - 5 / 4)      # 3-4-5 triangle: -0.25
    assert t[peak, 13, 0] == -1.0                         # clamped far away
    assert t[peak, 4, 6] == pytest.approx(1 - math.sqrt(2) / 4)


def test_order_and_pairs_against_loop():
    h, w, r = 3, 4, 2.5
    t = ef.make_templates(h, w, radius=r, dtype=torch.float64)
    p = h * w
    expected = []
    for a in range(p):
        expected.append([[_one_peak(u, v, a // w, a % w, r) for v in range(w)] for u in range(h)])
    for a in range(p):
        for b in range(a + 1, p):
            expected.append([[max(_one_peak(u, v, a // w, a % w, r), _one_peak(u, v, b // w, b % w, r))
                              for v in range(w)] for u in range(h)])
    expected.append([[-1.0] * w for _ in range(h)])
    torch.testing.assert_close(t, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def test_pair_is_max_of_its_peaks_14x14():
    t = ef.make_templates(14, dtype=torch.float64)
    p = 196
    # Pair (0, 1) comes right after the one-peak block, pair (1, 2) after the P-1 pairs of 0.
    torch.testing.assert_close(t[p], torch.maximum(t[0], t[1]))
    torch.testing.assert_close(t[p + (p - 1)], torch.maximum(t[1], t[2]))
    torch.testing.assert_close(t[-2], torch.maximum(t[p - 2], t[p - 1]))
    assert (t[-1] == -1).all()


def test_subset_of_400():
    full = ef.make_templates(14)
    sub = ef.make_templates(14, subset=400)
    idx = [round(i * (19_306) / 399) for i in range(400)]
    assert idx[0] == 0 and idx[-1] == 19_306
    torch.testing.assert_close(sub, full[idx], rtol=0, atol=0)
    assert (sub[-1] == -1).all()


def test_dtype_device_and_fresh_copy():
    a = ef.make_templates(5, dtype=torch.float64)
    assert a.dtype == torch.float64 and a.device.type == "cpu"
    a.zero_()
    assert ef.make_templates(5, dtype=torch.float64).abs().sum() > 0


@pytest.mark.parametrize("kwargs, error", [
    (dict(height=0), ValueError), (dict(height=2.0), TypeError), (dict(height=3, subset=0), ValueError),
    (dict(height=3, subset=10_000), ValueError), (dict(height=3, radius=-1.0), ValueError),
    (dict(height=3, dtype=torch.int32), TypeError),
])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        ef.make_templates(**kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_prepared_templates_cast_pad_and_cache(dtype):
    from ecloss_fast._templates import prepared_templates

    source = torch.randn(121, 15, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    prepared = prepared_templates(source, dtype, 16, 32)
    assert prepared.shape == (128, 16) and prepared.dtype == dtype and prepared.is_contiguous()
    # Every value is the source's, rounded once to dtype; the padding is exactly 0.
    assert torch.equal(prepared[:121, :15], source.to(dtype))
    assert not prepared[121:].any() and not prepared[:, 15:].any()
    assert prepared_templates(source, dtype, 16, 32) is prepared
    assert prepared_templates(source, dtype, 16, 16).shape == (128, 16)
    assert prepared_templates(source, dtype, 32, 64).shape == (128, 32)
    source.mul_(2)  # an in-place change makes a new copy
    again = prepared_templates(source, dtype, 16, 32)
    assert again is not prepared and torch.equal(again[:121, :15], source.to(dtype))
    with torch.inference_mode():
        frozen = source.clone()
    assert torch.equal(prepared_templates(frozen, dtype, 16, 32), again)


def test_prepared_templates_go_with_their_source():
    import gc
    import weakref

    from ecloss_fast._templates import prepared_templates

    source = torch.randn(7, 5)
    copy = weakref.ref(prepared_templates(source, torch.bfloat16, 8, 4))
    assert copy() is not None
    del source
    gc.collect()
    assert copy() is None


def test_prepared_templates_of_template_matrix_and_bad_arguments():
    from ecloss_fast._templates import prepared_templates, template_matrix

    matrix = template_matrix(14, 14, 4.0, None, torch.device("cpu"), torch.float32)
    prepared = prepared_templates(matrix, torch.bfloat16, 208, 32)
    assert prepared.shape == (19_328, 208)  # 19,307 rows to whole 32-row tiles; 196 -> 208
    assert prepared.shape[1] * prepared.element_size() % 16 == 0
    assert torch.equal(prepared[:19_307, :196], matrix.bfloat16())
    with pytest.raises(ValueError, match="padded_k"):
        prepared_templates(matrix, torch.bfloat16, 195, 32)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        prepared_templates(matrix[0], torch.bfloat16, 208, 32)
