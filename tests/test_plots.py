"""PNG figures: decoded back to pixels and checked where the planted content must be."""

import struct
import zlib

import numpy as np
import pytest

from mlxscan.errors import MlxscanError
from mlxscan.plots import REFERENCE_COLORS, SERIES_COLORS, heatmap, line_plot, viridis, write_png


def read_png(path) -> np.ndarray:
    """Decode the PNGs plots.py writes (8-bit RGB, filter 0), checking every chunk's CRC: [h, w, 3]."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind, body = data[position + 4:position + 8], data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        position += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color_type, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def is_color(image, color) -> np.ndarray:
    return (image == np.asarray(color, dtype=np.uint8)).all(axis=-1)


def dark(image) -> np.ndarray:
    return (image < 100).all(axis=-1)


def flat_plot(path, title="Probe accuracy", **options):
    x = np.arange(12)
    return line_plot(path, x, {"flat": (np.full(12, 0.5), None)}, title=title, xlabel="layer",
                     ylabel="accuracy", ylim=(0.0, 1.0), **options)


def test_write_png_round_trips_a_canvas(tmp_path):
    canvas = np.random.default_rng(0).integers(0, 256, size=(7, 13, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_png(write_png(tmp_path / "c.png", canvas)), canvas)


def test_line_plot_is_a_png_of_the_requested_size(tmp_path):
    plot = flat_plot(tmp_path / "line.png", size=(640, 400))
    assert read_png(plot.path).shape == (400, 640, 3)
    assert plot.size == (640, 400)


def test_a_constant_series_is_drawn_on_its_row(tmp_path):
    plot = flat_plot(tmp_path / "line.png")
    image = read_png(plot.path)
    left, top, right, bottom = plot.data_box
    row = round(bottom - 0.5 * (bottom - top))  # y = 0.5 with ylim (0, 1)
    blue = is_color(image, SERIES_COLORS[0])
    line = blue[row - 2:row + 3, left + 1:right].any(axis=0)
    assert line.mean() > 0.95  # the whole width, legend or not
    column = (left + right) // 2
    rows = np.flatnonzero(blue[top:bottom, column]) + top
    assert rows.size and np.abs(rows - row).max() <= 3  # and nowhere else in that column


def test_bands_and_dashed_reference_lines(tmp_path):
    x = np.arange(20)
    plot = line_plot(tmp_path / "band.png", x, {"probe": (np.full(20, 0.6), (np.full(20, 0.5), np.full(20, 0.7)))},
                     title="t", xlabel="layer", ylabel="acc", hlines={"chance": 0.25}, ylim=(0, 1))
    image = read_png(plot.path)
    left, top, right, bottom = plot.data_box

    def row(value):
        return round(bottom - value * (bottom - top))

    column = left + (right - left) // 3
    tint = image[row(0.65), column].astype(int)  # inside the band, off the line: a pale blue
    assert (tint < 255).any() and tint[2] > tint[0] and tint.min() > 150
    above = image[row(0.85), column]
    assert above[0] == above[1] == above[2]  # above the band: white or grid grey, no tint
    dashes = is_color(image, REFERENCE_COLORS[0])[row(0.25) - 1:row(0.25) + 2, left + 1:right].any(axis=0)
    assert 0.4 < dashes.mean() < 0.9  # drawn, and dashed


def test_text_renders_in_the_title_area(tmp_path):
    titled = read_png(flat_plot(tmp_path / "a.png").path)
    untitled_plot = flat_plot(tmp_path / "b.png", title="")
    top = untitled_plot.data_box[1]
    title_band = slice(0, top - 10)  # above the top tick label, which straddles the frame
    assert dark(titled[title_band]).sum() > 100
    assert dark(read_png(untitled_plot.path)[title_band]).sum() == 0
    left, _, _, bottom = untitled_plot.data_box
    image = read_png(untitled_plot.path)
    assert dark(image[bottom + 6:]).sum() > 100  # tick labels and the x label
    assert dark(image[:, :left - 6]).sum() > 100  # tick labels and the vertical y label


def test_the_legend_leaves_the_data_visible(tmp_path):
    x = np.linspace(0, 1, 30)
    plot = line_plot(tmp_path / "diag.png", x, {"rising": (x, None), "falling": (1 - x, None)},
                     title="Crossing", xlabel="x", ylabel="y", hlines={"chance": 0.5})
    image = read_png(plot.path)
    left, top, right, bottom = plot.data_box
    (x_left, x_right), width = plot.x_range, right - left
    first = round(left + (0 - x_left) / (x_right - x_left) * width)  # where x = 0 and x = 1 land
    last = round(left + (1 - x_left) / (x_right - x_left) * width)
    for color in SERIES_COLORS[:2]:
        # Every column the lines span still shows each of them: the legend hides none of it.
        assert is_color(image[top:bottom, first:last + 1], color).any(axis=0).all()


def test_a_legend_too_big_for_the_data_area_goes_below(tmp_path):
    x = np.arange(10)
    many = {f"series {i}": (np.sin(x + i), None) for i in range(8)}
    plot = line_plot(tmp_path / "many.png", x, many, title="Eight", xlabel="layer", ylabel="y", size=(600, 400))
    image = read_png(plot.path)
    below = image[plot.data_box[3] + 50:]
    assert all(is_color(below, color).any() for color in SERIES_COLORS[:8])


def test_output_is_deterministic(tmp_path):
    assert flat_plot(tmp_path / "a.png").path.read_bytes() == flat_plot(tmp_path / "b.png").path.read_bytes()


def test_viridis_runs_from_dark_purple_to_yellow():
    colors = viridis(np.linspace(0, 1, 50)).astype(float)
    luminance = colors @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(luminance) > 0)
    np.testing.assert_array_equal(viridis(0.0), (68, 1, 84))
    np.testing.assert_array_equal(viridis(1.0), (253, 231, 37))


@pytest.mark.parametrize("origin", ["lower", "upper"])
def test_heatmap_cells_follow_the_colormap(origin, tmp_path):
    matrix = np.arange(16, dtype=float).reshape(4, 4)  # [0, 0] smallest, [3, 3] largest
    matrix[1, 2] = np.nan
    plot = heatmap(tmp_path / "heat.png", matrix, title="CKA", xlabel="layer", ylabel="layer", origin=origin)
    image = read_png(plot.path)
    assert image.shape == (560, 600, 3)
    left, top, right, bottom = plot.data_box

    def center(row, col):  # pixel at the middle of cell [row, col]
        y_fraction = (row + 0.5) / 4 if origin == "upper" else 1 - (row + 0.5) / 4
        return image[round(top + y_fraction * (bottom - top)), round(left + (col + 0.5) / 4 * (right - left))]

    np.testing.assert_array_equal(center(0, 0), viridis(0.0))
    np.testing.assert_array_equal(center(3, 3), viridis(1.0))
    np.testing.assert_array_equal(center(2, 1), viridis(9 / 15))
    assert (center(1, 2) == center(1, 2)[0]).all()  # NaN: grey
    luminance = [center(i, i).astype(float) @ [0.2126, 0.7152, 0.0722] for i in range(4)]
    assert np.all(np.diff(luminance) > 0)
    # The colorbar to the right: yellow at its top, dark purple at its bottom.
    bar = image[top:bottom + 1, right + 1:]
    yellow_rows = np.flatnonzero(is_color(bar, viridis(1.0)).any(axis=1))
    purple_rows = np.flatnonzero(is_color(bar, viridis(0.0)).any(axis=1))
    assert yellow_rows.max() < 5 and purple_rows.min() > bottom - top - 5
    assert dark(image[:top]).sum() > 50  # the title


def test_heatmap_of_many_cells_and_fixed_limits(tmp_path):
    matrix = np.random.default_rng(0).random((3, 900))  # more columns than pixels
    plot = heatmap(tmp_path / "wide.png", matrix, title="neurons", xlabel="neuron", ylabel="layer",
                   vmin=-1, vmax=2, size=(500, 300))
    image = read_png(plot.path)
    left, top, right, bottom = plot.data_box
    cells = image[top + 1:bottom, left + 1:right].reshape(-1, 3)
    allowed = viridis(np.linspace(1 / 3, 2 / 3, 2001))  # values in [0, 1] use only the middle third
    assert np.isin(cells.astype(int) @ [65536, 256, 1], allowed.astype(int) @ [65536, 256, 1]).all()


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(MlxscanError, match="one per x"):
        line_plot(tmp_path / "x.png", np.arange(5), {"a": (np.arange(4), None)}, title="", xlabel="", ylabel="")
    with pytest.raises(MlxscanError, match="at least one series"):
        line_plot(tmp_path / "x.png", np.arange(5), {}, title="", xlabel="", ylabel="")
    with pytest.raises(MlxscanError, match="2-D"):
        heatmap(tmp_path / "x.png", np.arange(5), title="", xlabel="", ylabel="")
    with pytest.raises(MlxscanError, match="ylim"):
        line_plot(tmp_path / "x.png", np.arange(3), {"a": (np.ones(3), None)}, title="", xlabel="", ylabel="",
                  ylim=(1, 0))


def test_a_nan_breaks_the_line_and_its_band(tmp_path):
    x = np.arange(20)
    y = np.full(20, 0.5)
    y[8:12] = np.nan
    plot = line_plot(tmp_path / "gap.png", x, {"gappy": (y, (y - 0.1, y + 0.1))}, title="", xlabel="", ylabel="",
                     ylim=(0, 1))
    image = read_png(plot.path)
    left, top, right, bottom = plot.data_box
    gap = round(left + (9.5 - plot.x_range[0]) / (plot.x_range[1] - plot.x_range[0]) * (right - left))
    column = image[top + 1:bottom, gap + 3]  # beside the grid line at x = 10
    assert (column[:, 0] == column[:, 2]).all()  # nothing blue: neither line nor band bridges the gap
