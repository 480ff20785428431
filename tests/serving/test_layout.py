"""Our 2:4 layout: exact round trips, the bytes it promises, and clear refusals."""

import pytest
import torch

from serving.layout import check_24, group_positions, pack_24, unpack_24

from .interpreter import sparse_weight


@pytest.mark.parametrize("k", [4, 28, 32, 36, 260])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pack_then_unpack_is_exact_on_odd_widths(k, dtype):
    w = sparse_weight(7, k, dtype, seed=k)
    packed = pack_24(w)
    assert packed.values.shape == (2, 7, k // 4) and packed.codes.shape == (7, -(-k // 32))
    assert torch.equal(unpack_24(packed), w)


def test_groups_with_fewer_than_two_nonzeros_still_name_two_slots():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0], [0.0, -2.0, 0.0, 3.0, 1.0, 0.0, 0.0, 0.0]])
    packed = pack_24(w)
    i0, i1 = group_positions(packed.codes, 2)
    assert (i0 < i1).all()
    assert i0.tolist() == [[0, 0], [1, 0]] and i1.tolist() == [[1, 2], [3, 1]]  # the largest |w|, ties left
    assert torch.equal(unpack_24(packed), w)


def test_every_one_of_the_six_pairs_round_trips():
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)] * 6  # 36 groups: codes span more than one word
    w = torch.zeros(1, 4 * len(pairs))
    for g, (a, b) in enumerate(pairs):
        w[0, 4 * g + a], w[0, 4 * g + b] = g + 1.0, -(g + 1.0)
    i0, i1 = group_positions(pack_24(w).codes, len(pairs))
    assert list(zip(i0[0].tolist(), i1[0].tolist())) == pairs
    assert torch.equal(unpack_24(pack_24(w)), w)


def test_the_layout_is_0_5625_of_the_dense_bytes_in_half_precision():
    w = sparse_weight(64, 256, torch.bfloat16)
    assert pack_24(w).nbytes() / w.nbytes == 0.5625


def test_a_weight_off_the_pattern_or_of_odd_width_is_refused_with_where():
    w = sparse_weight(4, 16)
    w[2, 8:12] = 1.0
    with pytest.raises(ValueError, match=r"row 2, columns 8\.\.11 \(4 non-zeros\)"):
        check_24(w)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_24(torch.zeros(3, 10))
