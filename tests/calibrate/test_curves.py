"""Matmul curves of calibrate: the runtime's linear layers and heads, by kernel, width and rows."""

import torch

from roofline.calibrate import curves


def test_layer_shapes_are_llama_shaped():
    qkv, o, gate_up, down = curves.layer_shapes(512)
    assert qkv == (512, 512 + 2 * 128) and o == (512, 512)
    assert gate_up == (512, 2 * 1344) and down == (1344, 512)  # 8/3 x 512, rounded to 64
    assert curves.intermediate_size(2048) == 5440


def test_quick_curves_cover_every_kernel_and_row_count():
    layers, heads = curves.measure_curves("cpu", torch.float32, 4 << 20, lambda: None, repeats=1, budget_s=0.5,
                                          widths=curves.QUICK_CURVE_WIDTHS)
    assert set(layers) == {"float", "int8", "int4"} and set(heads) == {"float", "int8"}
    for by_width in [*layers.values(), *heads.values()]:
        assert [width for width, _ in by_width] == list(curves.QUICK_CURVE_WIDTHS)
        for _, points in by_width:
            assert [rows for rows, _ in points] == [float(r) for r in curves.CURVE_ROWS]
            assert all(rate > 0 for _, rate in points)
