"""Index maps: composition, carrying weights, carrying Adam moments."""

import torch

from mgrow.ops import AxisMap, Kind, TensorMap, apply_to_optimizer_state, carry, compose

F64 = torch.float64


def axis(src, scale=None, grad_scale=None) -> AxisMap:
    src = torch.tensor(src)
    scale = torch.ones(len(src), dtype=F64) if scale is None else torch.tensor(scale, dtype=F64)
    grad = 1.0 / scale if grad_scale is None else torch.tensor(grad_scale, dtype=F64)
    return AxisMap(src, scale, grad)


def tensor_map(old_name, rows: AxisMap, columns: AxisMap, new_kinds: dict) -> TensorMap:
    """A 2-D map whose new entries get kinds by (row new?, column new?) -> Kind."""
    kind = torch.zeros(len(rows), len(columns), dtype=torch.uint8)
    for i, r in enumerate(rows.src.tolist()):
        for j, c in enumerate(columns.src.tolist()):
            if r < 0 or c < 0:
                kind[i, j] = new_kinds[(r < 0, c < 0)]
    return TensorMap(old_name, (rows, columns), kind)


# old [2, 3] -> first [2, 4] (a free column inserted at 1, columns scaled) -> second [3, 5]
FIRST = {"w": tensor_map("w", axis([0, 1]), axis([0, -1, 1, 2], [2.0, 1.0, 1.0, 0.5]),
                         {(False, True): Kind.FREE})}
SECOND = {"w": tensor_map("w", axis([1, 0, -1], [3.0, 1.0, 1.0]), axis([3, 0, 1, 2, -1]),
                          {(True, False): Kind.ZERO, (True, True): Kind.ZERO, (False, True): Kind.MEAN})}


def test_carry_copies_and_scales_old_entries_and_zeroes_new_ones():
    old = torch.arange(6, dtype=torch.float32).view(2, 3) + 1  # [[1,2,3],[4,5,6]]
    assert torch.equal(carry(FIRST["w"], old), torch.tensor([[2.0, 0, 2, 1.5], [8, 0, 5, 3]]))


def test_composed_map_equals_the_two_maps_in_turn():
    old = torch.randn(2, 3)
    composed = compose(FIRST, SECOND)["w"]
    torch.testing.assert_close(carry(composed, old), carry(SECOND["w"], carry(FIRST["w"], old)), rtol=0, atol=1e-6)
    assert composed.old_name == "w"
    assert composed.axes[0].src.tolist() == [1, 0, -1]
    assert composed.axes[1].src.tolist() == [2, 0, -1, 1, -1]
    assert composed.axes[1].scale.tolist() == [0.5, 2.0, 1.0, 1.0, 1.0]
    assert composed.axes[0].scale.tolist() == [3.0, 1.0, 1.0]


def test_composed_kinds_keep_the_first_maps_free_entries_and_take_the_seconds_new_ones():
    composed = compose(FIRST, SECOND)["w"]
    expected = torch.tensor([
        [0, 0, Kind.FREE, 0, Kind.MEAN],  # column 2 reads first's free column 1
        [0, 0, Kind.FREE, 0, Kind.MEAN],
        [Kind.ZERO] * 5,
    ], dtype=torch.uint8)
    assert torch.equal(composed.kind, expected)
    assert torch.equal(composed.new_mask(), composed.kind != Kind.OLD)


def test_compose_follows_renames_and_passes_new_tensors_through():
    first = {"b1": TensorMap.identity("a1", (3,)), "b2": TensorMap.identity("a2", (3,))}
    second = {"c": TensorMap.identity("b2", (3,)), "n": TensorMap.new_tensor((2,), Kind.FREE)}
    composed = compose(first, second)
    assert composed["c"].old_name == "a2"
    assert composed["n"].old_name is None and composed["n"].axes[0].src.tolist() == [-1, -1]
    assert torch.equal(carry(composed["n"], None), torch.zeros(2))


def test_optimizer_state_follows_the_gradient_factor():
    # weight x c -> gradient / c: m / c, v / c^2; new entries 0; grad_scale overrides 1/c
    rows = axis([0, -1, 1, 1], scale=[2.0, 1.0, 4.0, 0.5], grad_scale=[0.5, 1.0, 0.25, 1.0])
    columns = axis([1, 0])
    tmap = tensor_map("w", rows, columns, {(True, False): Kind.FREE})
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v = torch.tensor([[1.0, 4.0], [9.0, 16.0]])
    new_m, new_v = apply_to_optimizer_state(tmap, m, v)
    assert torch.equal(new_m, torch.tensor([[2.0 * 0.5, 1.0 * 0.5], [0, 0], [4 * 0.25, 3 * 0.25], [4.0, 3.0]]))
    assert torch.equal(new_v, torch.tensor([[4.0 * 0.25, 1.0 * 0.25], [0, 0], [16 / 16, 9 / 16], [16.0, 9.0]]))


def test_optimizer_state_of_a_scaled_copy_is_m_over_c_and_v_over_c_squared():
    c = 3.0
    tmap = tensor_map("w", axis([0, 1], [c, 1.0]), axis([0, -1]), {(False, True): Kind.ZERO})
    m, v = torch.tensor([[0.3, 0.7], [0.2, 0.1]]), torch.tensor([[0.09, 0.49], [0.04, 0.01]])
    new_m, new_v = apply_to_optimizer_state(tmap, m, v)
    torch.testing.assert_close(new_m, torch.tensor([[0.3 / c, 0.0], [0.2, 0.0]]), rtol=1e-7, atol=0)
    torch.testing.assert_close(new_v, torch.tensor([[0.09 / c**2, 0.0], [0.04, 0.0]]), rtol=1e-7, atol=0)
