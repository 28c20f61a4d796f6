"""Figures as PNG files with nothing but NumPy: line plots (layer profiles with CI bands) and heatmaps.

The project has no plotting library, and these two figures are most of what a scan report needs. Each
figure is drawn on an RGB canvas (uint8 [height, width, 3]) and written as a PNG with zlib and struct.
Text uses an embedded 5×7 pixel font (with descenders) drawn at ×2. Output is deterministic: the same call gives the
same bytes.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import MlxscanError

__all__ = ["Plot", "line_plot", "heatmap", "viridis", "write_png", "SERIES_COLORS"]

# The classic 5×7 LCD font, ASCII 32–126: five column bytes a glyph, bit 0 the top row, baseline
# on row 6; g j p q y are redrawn with an eighth row (bit 7) so they descend and stay legible.
_FONT_HEX = """
0000000000 00005f0000 0007000700 147f147f14 242a7f2a12 2313086462 3649552250 0005030000
001c224100 0041221c00 142a1c2a14 08083e0808 0050300000 0808080808 0060600000 2010080402
3e5149453e 00427f4000 4261514946 2141454b31 1814127f10 2745454539 3c4a494930 0171090503
3649494936 064949291e 0036360000 0056360000 0814224100 1414141414 0041221408 0201510906
324979413e 7e1111117e 7f49494936 3e41414122 7f4141221c 7f49494941 7f09090901 3e41415132
7f0808087f 00417f4100 2040413f01 7f08142241 7f40404040 7f020c027f 7f0408107f 3e4141413e
7f09090906 3e4151215e 7f09192946 4649494931 01017f0101 3f4040403f 1f2040201f 3f4038403f
6314081463 0708700807 6151494543 007f414100 0204081020 0041417f00 0402010204 4040404040
0001020400 2054545478 7f48444438 3844444420 384444487f 3854545418 087e090102 18a4a4a47c
7f08040478 00447d4000 4080847d00 007f102844 00417f4000 7c04180478 7c08040478 3844444438
fc24242418 18242424fc 7c08040408 4854545420 043f444020 3c4040207c 1c2040201c 3c4030403c
4428102844 1ca0a0a07c 4464544c44 0008364100 00007f0000 0041360800 0804081008
"""
_GLYPHS = np.unpackbits(np.frombuffer(bytes.fromhex("".join(_FONT_HEX.split())), np.uint8).reshape(95, 5, 1),
                        axis=2, bitorder="little").transpose(0, 2, 1).astype(bool)  # [95, 8 rows, 5 cols]
TEXT_SCALE = 2
TEXT_HEIGHT = 8 * TEXT_SCALE

# Distinct hues in the order series get them (Tableau 10, which readers know from matplotlib).
SERIES_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
REFERENCE_COLORS = ((60, 60, 60), (150, 150, 150), (0, 0, 0))  # dashed reference lines
WHITE, INK, FRAME, GRID = (255, 255, 255), (20, 20, 20), (90, 90, 90), (232, 232, 232)
MISSING = (215, 215, 215)  # NaN cells of a heatmap
# Viridis at nine evenly spaced points; the colormap interpolates between them.
_VIRIDIS = np.array([(68, 1, 84), (72, 36, 117), (59, 82, 139), (44, 114, 142), (33, 145, 140),
                     (40, 174, 128), (94, 201, 98), (173, 220, 48), (253, 231, 37)], dtype=np.float64)


@dataclass(frozen=True)
class Plot:
    """A written figure; the boxes say where things landed, for overlays and tests."""

    path: Path
    size: tuple[int, int]  # (width, height) in pixels
    data_box: tuple[int, int, int, int]  # (left, top, right, bottom), inclusive pixels of the data area
    x_range: tuple[float, float]  # the data values at the left and right edges of data_box
    y_range: tuple[float, float]  # the data values at the bottom and top edges of data_box


# ---------------------------------------------------------------- PNG and colors


def write_png(path, canvas: np.ndarray) -> Path:
    """Write an RGB canvas (uint8 [height, width, 3]) as an 8-bit truecolor PNG."""
    canvas = np.ascontiguousarray(canvas, dtype=np.uint8)
    if canvas.ndim != 3 or canvas.shape[2] != 3:
        raise MlxscanError(f"a PNG canvas must be [height, width, 3]; got shape {canvas.shape}")
    height, width = canvas.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.concatenate([np.zeros((height, 1), np.uint8), canvas.reshape(height, -1)], axis=1)  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))
    return path


def viridis(fraction) -> np.ndarray:
    """uint8 [..., 3] colors for fractions in [0, 1] (clipped; NaN gets the color of 0)."""
    position = np.clip(np.nan_to_num(np.asarray(fraction, dtype=np.float64)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(_VIRIDIS) - 2)
    weight = (position - low)[..., None]
    return np.round(_VIRIDIS[low] * (1 - weight) + _VIRIDIS[low + 1] * weight).astype(np.uint8)


# ---------------------------------------------------------------- text


def _text_width(text: str, scale: int = TEXT_SCALE) -> int:
    return max(0, 6 * len(text) - 1) * scale


def _text_mask(text: str, scale: int) -> np.ndarray:
    """bool [8·scale, _text_width]: the pixels of `text` (characters outside ASCII 32–126 show as '?')."""
    codes = np.array([ord(c) - 32 if 32 <= ord(c) <= 126 else ord("?") - 32 for c in text], dtype=int)
    glyphs = np.pad(_GLYPHS[codes], ((0, 0), (0, 0), (0, 1)))  # [k, 8, 6], a blank column after each
    mask = glyphs.transpose(1, 0, 2).reshape(8, -1)[:, :-1]  # [8, 6k − 1]
    return np.kron(mask, np.ones((scale, scale), dtype=bool)).astype(bool)


def _fit(text: str, max_width: int, scale: int = TEXT_SCALE) -> str:
    """The text, cut with '...' when it would be wider than max_width."""
    if _text_width(text, scale) <= max_width:
        return text
    keep = max(0, (max_width // scale + 1) // 6 - 3)
    return text[:keep] + "..."


def _draw_text(canvas, text: str, x: int, y: int, *, color=INK, align: str = "left", valign: str = "top",
               vertical: bool = False, scale: int = TEXT_SCALE) -> None:
    """Draw text at (x, y); align/valign say which point of its box that is. vertical reads bottom to top."""
    if not text:
        return
    mask = _text_mask(text, scale)
    if vertical:
        mask = np.rot90(mask)
    height, width = mask.shape
    left = x - {"left": 0, "center": width // 2, "right": width}[align]
    top = y - {"top": 0, "middle": height // 2, "bottom": height}[valign]
    rows, cols = np.nonzero(mask)
    rows, cols = rows + top, cols + left
    keep = (rows >= 0) & (rows < canvas.shape[0]) & (cols >= 0) & (cols < canvas.shape[1])
    canvas[rows[keep], cols[keep]] = color


# ---------------------------------------------------------------- lines, bands, ticks


def _polyline(canvas, xs, ys, color, *, thickness: int = 2, dash: tuple[int, int] | None = None,
              clip: tuple[int, int, int, int] | None = None) -> None:
    """Draw through the pixel points (xs, ys); a NaN point breaks the line. dash = (on, off) in pixels."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    left, top, right, bottom = clip or (0, 0, canvas.shape[1] - 1, canvas.shape[0] - 1)
    points, travelled = [], 0.0
    for i in range(len(xs) - 1):
        if not np.isfinite([xs[i], ys[i], xs[i + 1], ys[i + 1]]).all():
            continue
        length = math.hypot(xs[i + 1] - xs[i], ys[i + 1] - ys[i])
        t = np.linspace(0.0, 1.0, int(math.ceil(length * 2)) + 2)  # two samples a pixel: no gaps
        segment = np.stack([xs[i] + t * (xs[i + 1] - xs[i]), ys[i] + t * (ys[i + 1] - ys[i]), travelled + t * length])
        points.append(segment)
        travelled += length
    if len(xs) == 1 and np.isfinite([xs[0], ys[0]]).all():
        points.append(np.array([[xs[0]], [ys[0]], [0.0]]))  # a lone point still shows
    if not points:
        return
    x, y, along = np.concatenate(points, axis=1)
    if dash is not None:
        on = (along % sum(dash)) < dash[0]
        x, y = x[on], y[on]
    offsets = np.arange(thickness) - (thickness - 1) // 2
    rows = (np.round(y).astype(int)[:, None, None] + offsets[None, :, None]).repeat(thickness, 2).ravel()
    cols = (np.round(x).astype(int)[:, None, None] + offsets[None, None, :]).repeat(thickness, 1).ravel()
    keep = (rows >= top) & (rows <= bottom) & (cols >= left) & (cols <= right)
    canvas[rows[keep], cols[keep]] = color


def _band(canvas, xs, lows, highs, color, clip, alpha: float = 0.22) -> None:
    """Shade between two curves (pixel coordinates), blended over what is drawn, column by column.

    Like a line, the band breaks where a point is NaN rather than bridging the gap.
    """
    left, top, right, bottom = clip
    order = np.argsort(xs, kind="stable")
    xs, lows, highs = xs[order], lows[order], highs[order]
    finite = np.isfinite(xs) & np.isfinite(lows) & np.isfinite(highs)
    if len(xs) < 2 or not (finite[:-1] & finite[1:]).any():
        return
    columns = np.arange(max(left, int(math.ceil(np.nanmin(xs)))), min(right, int(math.floor(np.nanmax(xs)))) + 1)
    segment = np.clip(np.searchsorted(xs, columns, side="right") - 1, 0, len(xs) - 2)  # [c] the x interval
    shown = finite[segment] & finite[segment + 1]  # [c] both ends of the column's interval are known
    upper = np.interp(columns, xs[finite], np.minimum(lows, highs)[finite])  # [c] smaller row = higher
    lower = np.interp(columns, xs[finite], np.maximum(lows, highs)[finite])
    rows = np.arange(top, bottom + 1)[:, None]  # [r, 1]
    inside = (rows >= np.round(upper)) & (rows <= np.round(lower)) & shown  # [r, c]
    region = canvas[top:bottom + 1, columns[0]:columns[-1] + 1].astype(np.float64)
    tinted = region * (1 - alpha) + np.asarray(color, dtype=np.float64) * alpha
    canvas[top:bottom + 1, columns[0]:columns[-1] + 1] = np.where(inside[..., None], np.round(tinted), region)


def _nice_step(span: float, max_ticks: int, integer: bool = False) -> float:
    raw = span / max(1, max_ticks)
    magnitude = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    return max(1.0, round(step)) if integer else step


def _ticks(low: float, high: float, max_ticks: int, integer: bool = False) -> tuple[np.ndarray, list[str]]:
    """Round tick values inside [low, high] and their labels."""
    step = _nice_step(high - low, max_ticks, integer)
    first = math.ceil(low / step - 1e-9) * step
    values = first + step * np.arange(int(math.floor((high - first) / step + 1e-9)) + 1)
    values[np.abs(values) < step * 1e-6] = 0.0  # a rounded zero, not "-0.00"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    big = max(abs(low), abs(high)) >= 1e5
    return values, [f"{v:.3g}" if big else f"{v:.{decimals}f}" for v in values]


def _frame(canvas, box) -> None:
    left, top, right, bottom = box
    canvas[top, left:right + 1] = canvas[bottom, left:right + 1] = FRAME
    canvas[top:bottom + 1, left] = canvas[top:bottom + 1, right] = FRAME


def _x_axis(canvas, box, positions, labels, xlabel: str) -> None:
    """Tick marks and labels under the box, then the axis label."""
    left, top, right, bottom = box
    for position, label in zip(positions, labels):
        canvas[bottom + 1:bottom + 6, position - 1:position + 1] = FRAME
        _draw_text(canvas, label, position, bottom + 9, align="center")
    _draw_text(canvas, _fit(xlabel, canvas.shape[1] - 20), (left + right) // 2, bottom + 33, align="center")


def _y_axis(canvas, box, positions, labels, ylabel: str) -> None:
    left, top, right, bottom = box
    for position, label in zip(positions, labels):
        canvas[position - 1:position + 1, left - 5:left] = FRAME
        _draw_text(canvas, label, left - 9, position, align="right", valign="middle")
    _draw_text(canvas, _fit(ylabel, bottom - top + 60), 8, (top + bottom) // 2, vertical=True,
               align="left", valign="middle")


def _title(canvas, title: str) -> None:
    _draw_text(canvas, _fit(title, canvas.shape[1] - 16), canvas.shape[1] // 2, 12, align="center")


# ---------------------------------------------------------------- line plots


@dataclass(frozen=True)
class _Curve:
    name: str
    y: np.ndarray  # [n_points]
    low: np.ndarray | None  # [n_points] lower edge of the shaded band
    high: np.ndarray | None


def _check_series(series: Mapping, n_points: int) -> list[_Curve]:
    """Each value is (y, (low, high)) or (y, None); a bare array means no band."""
    if not series:
        raise MlxscanError("line_plot needs at least one series")
    curves = []
    for name, value in series.items():
        if isinstance(value, np.ndarray):
            value = (value, None)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise MlxscanError(f"series {name!r} must be (y, (low, high)) or (y, None)")
        y, band = value
        arrays = [np.asarray(a, dtype=np.float64) for a in (y, *(band or ()))]
        if band is not None and len(band) != 2:
            raise MlxscanError(f"series {name!r}: the band must be (low, high)")
        if any(a.shape != (n_points,) for a in arrays):
            raise MlxscanError(f"series {name!r}: y and its band need {n_points} values, one per x; "
                               f"got shapes {[a.shape for a in arrays]}")
        curves.append(_Curve(str(name), arrays[0], *(arrays[1:] if band is not None else (None, None))))
    return curves


def _auto_range(curves: list[_Curve], hlines: Mapping[str, float]) -> tuple[float, float]:
    values = np.concatenate([np.concatenate([c.y] + ([c.low, c.high] if c.low is not None else []))
                             for c in curves] + [np.asarray(list(hlines.values()), dtype=np.float64)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    pad = (high - low) * 0.05 if high > low else max(abs(low) * 0.1, 0.5)
    return low - pad, high + pad


def _fitting_ticks(low, high, length_px: int, integer: bool, vertical: bool):
    """Ticks as dense as their labels allow without touching (at most one every 40 px)."""
    max_ticks = max(1, length_px // 40)
    while True:
        values, labels = _ticks(low, high, max_ticks, integer)
        needed = TEXT_HEIGHT + 16 if vertical else max(map(_text_width, labels)) + 16
        if max_ticks == 1 or len(values) < 2 or length_px * (values[1] - values[0]) / (high - low) >= needed:
            return values, labels
        max_ticks -= 1


def _legend_entries(curves, hlines):
    entries = [(c.name, SERIES_COLORS[i % len(SERIES_COLORS)], None) for i, c in enumerate(curves)]
    return entries + [(name, REFERENCE_COLORS[i % len(REFERENCE_COLORS)], (6, 4)) for i, name in enumerate(hlines)]


@dataclass(frozen=True)
class _LegendLayout:
    width: int
    height: int
    offsets: tuple[tuple[int, int], ...]  # (x, y) of each entry's line sample, from the box's corner


def _legend_layout(entries, max_width: int | None = None) -> _LegendLayout:
    """One entry a row; with max_width, as many aligned columns as fit in that width."""
    widths = [46 + _text_width(name) for name, _, _ in entries]
    for n_columns in range(1 if max_width is None else len(entries), 0, -1):
        columns = [max(widths[i::n_columns]) for i in range(n_columns)]  # entry i sits in column i % n
        if n_columns == 1 or sum(columns) + 24 * (n_columns - 1) + 16 <= max_width:
            break
    starts = np.cumsum([10] + [width + 24 for width in columns[:-1]])
    offsets = tuple((int(starts[i % n_columns]), 16 + (i // n_columns) * 22) for i in range(len(entries)))
    return _LegendLayout(16 + sum(columns) + 24 * (n_columns - 1), offsets[-1][1] + 16, offsets)


def _draw_legend(canvas, entries, layout: _LegendLayout, left: int, top: int) -> None:
    canvas[top:top + layout.height, left:left + layout.width] = WHITE
    _frame(canvas, (left, top, left + layout.width - 1, top + layout.height - 1))
    for (name, color, dash), (x, y) in zip(entries, layout.offsets):
        _polyline(canvas, [left + x, left + x + 28], [top + y] * 2, color, thickness=3 if dash is None else 2,
                  dash=dash)
        _draw_text(canvas, name, left + x + 36, top + y - 7)


def _place_legend(canvas, box, size) -> tuple[int, int, float]:
    """Where inside the data area the legend hides the least drawn data: (left, top, fraction hidden).

    Corners are tried first, so they win ties; then a grid of positions in between.
    """
    left, top, right, bottom = box
    width, height = size
    lefts = np.linspace(right - 7 - width, left + 8, 5).astype(int)
    tops = np.linspace(top + 8, bottom - 7 - height, 5).astype(int)
    corners = [(lefts[i], tops[j]) for j in (0, -1) for i in (0, -1)]
    best = None
    for corner_left, corner_top in corners + [(x, y) for y in tops for x in lefts]:
        patch = canvas[corner_top:corner_top + height, corner_left:corner_left + width]
        drawn = ~((patch == WHITE).all(axis=2) | (patch == GRID).all(axis=2))
        if best is None or drawn.mean() < best[2]:
            best = (int(corner_left), int(corner_top), float(drawn.mean()))
    return best


def _scale(data_range, start: float, end: float):
    """The map from data values to pixel coordinates taking data_range onto [start, end]."""
    low, high = data_range
    return lambda values: start + (np.asarray(values, dtype=np.float64) - low) / (high - low) * (end - start)


def _draw_data(canvas, box, x, curves, hlines, px, py) -> None:
    """Bands under reference lines under series lines, all clipped to the data area."""
    left, _, right, _ = box
    for i, curve in enumerate(curves):
        if curve.low is not None:
            _band(canvas, px(x), py(curve.low), py(curve.high), SERIES_COLORS[i % len(SERIES_COLORS)], box)
    for i, value in enumerate(hlines.values()):
        _polyline(canvas, [left, right], [py(value)] * 2, REFERENCE_COLORS[i % len(REFERENCE_COLORS)],
                  dash=(10, 6), clip=box)
    for i, curve in enumerate(curves):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        _polyline(canvas, px(x), py(curve.y), color, thickness=3, clip=box)
        if len(x) <= 40:  # markers show where the measured points are (layers, not a continuum)
            for xp, yp in zip(px(x), py(curve.y)):
                _polyline(canvas, [xp - 2, xp + 2], [yp, yp], color, thickness=5, clip=box)


def _render_lines(x, curves, hlines, labels, x_range, y_range, size, legend_below: bool):
    """Draw the whole line figure; returns (canvas, data box, fraction of data the legend hides)."""
    width, height = size
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    entries = _legend_entries(curves, hlines)
    layout = _legend_layout(entries, width - 40 if legend_below else None)
    top, bottom = 40, height - 58 - (layout.height + 8 if legend_below else 0)
    y_values, y_labels = _fitting_ticks(*y_range, bottom - top, False, vertical=True)
    left, right = 48 + max(map(_text_width, y_labels)), width - 25  # left: y label, gap, tick labels, ticks
    integer = bool(np.all(np.round(x) == x))
    x_values, x_labels = _fitting_ticks(*x_range, right - left, integer, vertical=False)
    box = (left, top, right, bottom)
    px, py = _scale(x_range, left, right), _scale(y_range, bottom, top)
    x_ticks, y_ticks = np.round(px(x_values)).astype(int), np.round(py(y_values)).astype(int)
    canvas[top:bottom + 1, x_ticks] = GRID
    canvas[y_ticks, left:right + 1] = GRID
    _draw_data(canvas, box, x, curves, hlines, px, py)
    _frame(canvas, box)
    _x_axis(canvas, box, x_ticks, x_labels, labels[1])
    _y_axis(canvas, box, y_ticks, y_labels, labels[2])
    _title(canvas, labels[0])
    if legend_below:
        _draw_legend(canvas, entries, layout, (width - layout.width) // 2, height - layout.height - 8)
        return canvas, box, 0.0
    if layout.height > bottom - top - 16 or layout.width > right - left - 16:
        return canvas, box, 1.0  # larger than the data area: it has to go below
    legend_left, legend_top, hidden = _place_legend(canvas, box, (layout.width, layout.height))
    _draw_legend(canvas, entries, layout, legend_left, legend_top)
    return canvas, box, hidden


def line_plot(path, x, series: Mapping[str, tuple], *, title: str, xlabel: str, ylabel: str,
              hlines: Mapping[str, float] | None = None, ylim: tuple[float, float] | None = None,
              size: tuple[int, int] = (800, 500)) -> Plot:
    """Lines over x with optional shaded bands, dashed reference lines and a legend, as a PNG.

    x: [n_points]; series: {name: (y [n_points], (low [n_points], high [n_points]) or None)}, a NaN
    breaks a line; hlines: {name: y} drawn dashed (e.g. chance); ylim: (bottom, top), else fitted to
    everything drawn. The legend goes inside the data area where it hides the least data (corners
    first), or below the plot when every place would hide some.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise MlxscanError(f"x must be a non-empty 1-D array of finite numbers; got shape {x.shape}")
    curves = _check_series(series, x.size)
    hlines = dict(hlines or {})
    width, height = _check_size(size, (320, 240))
    low, high = float(x.min()), float(x.max())
    pad = (high - low) * 0.02 if high > low else 0.5  # end points (and their markers) clear the frame
    x_range = (low - pad, high + pad)
    y_range = tuple(map(float, ylim)) if ylim is not None else _auto_range(curves, hlines)
    if not y_range[1] > y_range[0]:
        raise MlxscanError(f"ylim must be (bottom, top) with bottom < top; got {ylim}")
    labels = (title, xlabel, ylabel)
    canvas, box, hidden = _render_lines(x, curves, hlines, labels, x_range, y_range, (width, height), False)
    if hidden > 0.02:
        canvas, box, _ = _render_lines(x, curves, hlines, labels, x_range, y_range, (width, height), True)
    return Plot(write_png(path, canvas), (width, height), box, x_range, y_range)


def _check_size(size, minimum: tuple[int, int]) -> tuple[int, int]:
    width, height = (int(v) for v in size)
    if width < minimum[0] or height < minimum[1]:
        raise MlxscanError(f"a figure needs at least {minimum[0]}×{minimum[1]} pixels; got {width}×{height}")
    return width, height


# ---------------------------------------------------------------- heatmaps


def _index_ticks(count: int, cell_px: float) -> np.ndarray:
    """Indices to label: every 1, 2, 5, 10, … cells, as dense as the labels allow."""
    label_px = _text_width(str(count - 1)) + 12
    step = next(s * 10 ** e for e in range(12) for s in (1, 2, 5) if s * 10 ** e * cell_px >= label_px)
    return np.arange(0, count, step)


def _color_limits(matrix: np.ndarray, vmin, vmax) -> tuple[float, float]:
    finite = matrix[np.isfinite(matrix)]
    low = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    high = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if high > low:
        return low, high
    return (low - 0.5, high + 0.5) if vmin is None and vmax is None else (low, low + 1.0)


def _cells_size(shape: tuple[int, int], available_w: int, available_h: int) -> tuple[int, int]:
    """Pixel size of the cell area: whole-pixel cells when they fit (square for a square matrix, such
    as layer × layer), so every cell is drawn the same size; otherwise all the room there is."""
    n_rows, n_cols = shape
    cell_w, cell_h = available_w // n_cols, available_h // n_rows
    if n_rows == n_cols:
        cell_w = cell_h = min(cell_w, cell_h)
    return (n_cols * cell_w if cell_w >= 1 else available_w), (n_rows * cell_h if cell_h >= 1 else available_h)


def heatmap(path, matrix, *, title: str, xlabel: str, ylabel: str, vmin: float | None = None,
            vmax: float | None = None, size: tuple[int, int] = (600, 560), origin: str = "lower") -> Plot:
    """A matrix [rows, cols] as viridis-colored cells with index ticks and a colorbar, as a PNG.

    Columns run along x (xlabel), rows along y (ylabel); origin "lower" puts row 0 at the bottom (layer
    0 in the corner, as in a layer × layer plot), "upper" at the top like a printed matrix. vmin/vmax
    default to the finite extremes; NaN cells are light grey. With more cells than pixels, each pixel
    shows the cell under it.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise MlxscanError(f"heatmap needs a non-empty 2-D matrix; got shape {matrix.shape}")
    if origin not in ("lower", "upper"):
        raise MlxscanError(f"origin must be 'lower' or 'upper'; got {origin!r}")
    width, height = _check_size(size, (240, 200))
    low, high = _color_limits(matrix, vmin, vmax)
    n_rows, n_cols = matrix.shape
    scale_labels = [f"{v:.3g}" for v in (high, (low + high) / 2, low)]
    top, left = 40, 48 + _text_width(str(n_rows - 1))
    box_w, box_h = _cells_size(matrix.shape, width - left - 58 - max(map(_text_width, scale_labels)),
                               height - top - 58)
    right, bottom = left + box_w + 1, top + box_h + 1  # +1: the frame sits outside the cells
    rows = np.arange(box_h) * n_rows // box_h  # [box_h] the matrix row under each pixel row
    cols = np.arange(box_w) * n_cols // box_w  # [box_w]
    if origin == "lower":
        rows = n_rows - 1 - rows
    values = matrix[rows][:, cols]  # [box_h, box_w]
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[top + 1:bottom, left + 1:right] = np.where(np.isfinite(values)[..., None],
                                                      viridis((values - low) / (high - low)), MISSING)
    box = (left, top, right, bottom)
    _frame(canvas, box)
    x_index, y_index = _index_ticks(n_cols, box_w / n_cols), _index_ticks(n_rows, box_h / n_rows)
    y_cells = (n_rows - 1 - y_index) if origin == "lower" else y_index
    _x_axis(canvas, box, np.round(left + 1 + (x_index + 0.5) * box_w / n_cols).astype(int),
            [str(i) for i in x_index], xlabel)
    _y_axis(canvas, box, np.round(top + 1 + (y_cells + 0.5) * box_h / n_rows).astype(int),
            [str(i) for i in y_index], ylabel)
    _title(canvas, title)
    _colorbar(canvas, (right + 16, top, right + 34, bottom), scale_labels)
    y_range = (n_rows - 0.5, -0.5) if origin == "upper" else (-0.5, n_rows - 0.5)
    return Plot(write_png(path, canvas), (width, height), box, (-0.5, n_cols - 0.5), y_range)


def _colorbar(canvas, box, labels: Sequence[str]) -> None:
    """A vertical viridis gradient, high at the top, labelled at top, middle and bottom."""
    left, top, right, bottom = box
    fractions = 1.0 - np.arange(bottom - top - 1) / max(1, bottom - top - 2)  # [h] 1 at the top
    canvas[top + 1:bottom, left + 1:right] = viridis(fractions)[:, None, :]
    _frame(canvas, box)
    rows = (top, (top + bottom) // 2, bottom)
    if bottom - top < 3 * TEXT_HEIGHT + 8:  # too short for three labels: keep the extremes
        labels, rows = (labels[0], labels[-1]), (rows[0], rows[-1])
    for label, row in zip(labels, rows):
        canvas[row, right + 1:right + 5] = FRAME
        _draw_text(canvas, label, right + 8, row, valign="middle")
