"""
Pictures with Pillow and numpy alone (no plotting library): line charts, bar charts with their
intervals, attention laid over an image, and the training curves. Every chart has a title,
labelled axes with ticks, and a legend where there is more than one line; each returns a PIL
image, and `grid` puts several side by side.
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
INK, GRID, MUTED = (30, 30, 30), (225, 225, 225), (110, 110, 110)


def font(size=13):
    return ImageFont.load_default(size=size)  # Pillow's own TrueType font: no font file needed


def nice_ticks(lo, hi, n=5):
    """About n round values (1, 2 or 5 x 10^k apart) from lo to hi."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / n
    step = next(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)
                if m * 10 ** math.floor(math.log10(raw)) >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo, hi):
    """Powers of ten from lo to hi (with 2x and 5x between when the span is under two decades)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    mults = (1,) if math.log10(hi / lo) >= 2 else (1, 2, 5)
    ticks = [m * 10.0 ** e for e in decades for m in mults
             if lo * (1 - 1e-9) <= m * 10.0 ** e <= hi * (1 + 1e-9)]
    return ticks if len(ticks) >= 2 else [t for t in nice_ticks(lo, hi) if t > 0]


def label(v):
    return f"{int(v):,}" if float(v).is_integer() else f"{v:.3g}"


def vertical_text(text, size=13):
    """text rotated a quarter turn (for a y-axis label)."""
    w, h = int(font(size).getlength(text)) + 2, size + 4
    im = Image.new("RGBA", (w, h), (255, 255, 255, 0))
    ImageDraw.Draw(im).text((1, 0), text, fill=INK, font=font(size))
    return im.rotate(90, expand=True)


def chart(title, xlabel, ylabel, xlim, ylim, size=(520, 340), log_y=False, xticks=None, yticks=None):
    """A blank chart: title, frame, grid, ticks and axis labels. -> (image, draw, to_px) where
    to_px(x, y) gives the pixel of a data point."""
    W, H = size
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    left, top, right, bottom = 70, 34, W - 28, H - 50
    if log_y and ylim[1] <= ylim[0]:  # one value: a decade around it
        ylim = (ylim[0] / 3, ylim[1] * 3)
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    (x0, x1), (y0, y1) = xlim, (ty(ylim[0]), ty(ylim[1]))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (ty(y) - y0) / (y1 - y0) * (bottom - top))
    for y in yticks or (log_ticks(*ylim) if log_y else nice_ticks(*ylim)):
        py = to_px(x0, y)[1]
        if top - 1 <= py <= bottom + 1:
            draw.line([(left, py), (right, py)], fill=GRID)
            draw.text((left - 6, py), label(y), fill=INK, font=font(12), anchor="rm")
    for x in xticks or nice_ticks(*xlim, n=6):
        px = to_px(x, ylim[0])[0]
        if left - 1 <= px <= right + 1:
            draw.line([(px, bottom), (px, bottom + 4)], fill=INK)
            draw.text((px, bottom + 6), label(x), fill=INK, font=font(12), anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text((W / 2, 8), title, fill=INK, font=font(15), anchor="mt")
    draw.text(((left + right) / 2, H - 8), xlabel, fill=INK, font=font(13), anchor="mb")
    ylab = vertical_text(ylabel)
    im.paste(ylab, (4, int((top + bottom - ylab.height) / 2)), ylab)
    return im, draw, to_px


def legend(draw, names, x, y):
    """A box with one coloured swatch per name, its top-right corner at (x, y)."""
    if len(names) < 2:
        return
    w = max(font(12).getlength(n) for n in names) + 34
    draw.rectangle([x - w, y, x, y + 18 * len(names) + 6], fill="white", outline=MUTED)
    for i, name in enumerate(names):
        cy = y + 12 + 18 * i
        draw.line([(x - w + 6, cy), (x - w + 24, cy)], fill=COLOURS[i % len(COLOURS)], width=3)
        draw.text((x - w + 28, cy), name, fill=INK, font=font(12), anchor="lm")


def line_chart(series, title, xlabel, ylabel, ylim=None, log_y=False, xticks=None, size=(520, 340),
               corner="top"):
    """series: [(name, xs, ys)], a line per name (with a dot per point when there are few)."""
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy if y is not None and math.isfinite(y)
          and (y > 0 or not log_y)]
    if ylim is None:
        ylim = (min(ys), max(ys)) if ys else (0, 1)
        if not log_y:
            ticks = nice_ticks(*ylim)
            ylim = (min(ticks[0], ylim[0]), max(ticks[-1], ylim[1]))
    im, draw, to_px = chart(title, xlabel, ylabel, (min(xs), max(xs)) if xs else (0, 1), ylim, size, log_y,
                            xticks)
    for i, (_, sx, sy) in enumerate(series):
        pts = [to_px(x, y) for x, y in zip(sx, sy) if y is not None and math.isfinite(y)
               and (y > 0 or not log_y)]
        colour = COLOURS[i % len(COLOURS)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2, joint="curve")
        for px, py in pts if len(pts) <= 20 else []:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    legend(draw, [name for name, _, _ in series], size[0] - 20, 40 if corner == "top"
           else size[1] - 60 - 18 * len(series))
    return im


def bar_chart(groups, bars, values, intervals, title, ylabel, size=(520, 340)):
    """A cluster per group (a model), a bar per name in bars (direct, CoT) with its interval as a
    whisker. values[g][b] a number or None; intervals[g][b] (lo, hi) or None."""
    im, draw, to_px = chart(title, "", ylabel, (0, len(groups)), (0, 1), size, xticks=[-1])
    width = 0.8 / len(bars)
    for g, group in enumerate(groups):
        draw.text((to_px(g + 0.5, 0)[0], to_px(0, 0)[1] + 6), group, fill=INK, font=font(13), anchor="mt")
        for b in range(len(bars)):
            v, ci = values[g][b], intervals[g][b]
            if v is None:
                continue
            x = g + 0.1 + b * width
            (px0, py0), (px1, py1) = to_px(x, v), to_px(x + width * 0.9, 0)
            draw.rectangle([px0, py0, px1, py1], fill=COLOURS[b % len(COLOURS)])
            top_px = min(py0, to_px(x, ci[1])[1]) if ci else py0
            draw.text(((px0 + px1) / 2, top_px - 3), f"{v:.2f}", fill=INK, font=font(11), anchor="mb")
            if ci:
                cx, (_, lo), (_, hi) = (px0 + px1) / 2, to_px(x, ci[0]), to_px(x, ci[1])
                draw.line([(cx, lo), (cx, hi)], fill=INK, width=2)
                draw.line([(cx - 5, lo), (cx + 5, lo)], fill=INK, width=2)
                draw.line([(cx - 5, hi), (cx + 5, hi)], fill=INK, width=2)
    legend(draw, list(bars), size[0] - 20, size[1] - 70 - 18 * len(bars))
    return im


def heat_colour(v):
    """v (..., ) in [0, 1] -> RGB (..., 3): dark red through orange to pale yellow."""
    stops = np.array([[80, 0, 0], [200, 30, 0], [255, 140, 0], [255, 255, 160]], dtype=np.float32)
    t = np.clip(v, 0, 1) * (len(stops) - 1)
    i = np.minimum(t.astype(int), len(stops) - 2)
    return stops[i] + (stops[i + 1] - stops[i]) * (t - i)[..., None]


def attention_overlay(image, boxes, weights, size=160):
    """The image with each token's attention painted over the pixel box it covers (boxes in image
    pixels; overlapping boxes, tiles and the global image, add up as attention per pixel), scaled
    so the brightest pixel is 1. -> a size x size RGB image."""
    image = image.convert("RGB")
    heat = np.zeros((image.height, image.width), dtype=np.float64)
    for (x0, y0, x1, y1), w in zip(boxes, weights):
        x0, y0 = max(int(round(x0)), 0), max(int(round(y0)), 0)
        x1, y1 = min(int(round(x1)), image.width), min(int(round(y1)), image.height)
        if x1 > x0 and y1 > y0:
            heat[y0:y1, x0:x1] += w / ((x1 - x0) * (y1 - y0))
    heat /= heat.max() if heat.max() > 0 else 1
    base = np.asarray(image, dtype=np.float32)
    blend = 0.35 * base + 0.65 * heat_colour(heat) * (0.25 + 0.75 * heat[..., None])
    return Image.fromarray(blend.astype(np.uint8)).resize((size, size * image.height // image.width),
                                                          Image.NEAREST)


def wrap(text, width, size=12):
    """Words into lines no wider than width pixels."""
    lines = [""]
    for word in text.split():
        if lines[-1] and font(size).getlength(lines[-1] + " " + word) > width:
            lines.append(word)
        else:
            lines[-1] = (lines[-1] + " " + word).strip()
    return lines


def captioned(image, caption, lines=4, size=12):
    """image with caption's first `lines` wrapped lines under it."""
    text = wrap(caption, image.width - 4, size)
    text = text[:lines - 1] + [" ".join(text[lines - 1:])[:40] + "..."] if len(text) > lines else text
    out = Image.new("RGB", (image.width, image.height + lines * (size + 3) + 6), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(text):
        draw.text((2, image.height + 4 + i * (size + 3)), line, fill=INK, font=font(size))
    return out


def grid(images, cols, pad=10, title=None, row_labels=None):
    """Images in rows of `cols` on white, with an optional title above and a label left of each row."""
    rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    cw, ch = max(im.width for im in images), max(im.height for im in images)
    lw = int(max(font(13).getlength(l) for l in row_labels)) + 12 if row_labels else 0
    th = 30 if title else 0
    out = Image.new("RGB", (lw + cols * (cw + pad) + pad, th + len(rows) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((out.width / 2, 8), title, fill=INK, font=font(15), anchor="mt")
    for r, row in enumerate(rows):
        y = th + pad + r * (ch + pad)
        if row_labels:
            draw.text((6, y + ch / 2), row_labels[r], fill=INK, font=font(13), anchor="lm")
        for c, im in enumerate(row):
            out.paste(im, (lw + pad + c * (cw + pad), y))
    return out


# drawn on a log axis; anything else (vas, a mass, sys < 0) linear
LOSS_TERMS = ("loss", "ce", "vis", "ans", "img")


def curves(metrics, path, keys=("loss", "ce", "vis", "ans", "vas", "img", "sys")):
    """The training curves as one PNG: a panel per logged term against the step, losses on a log axis."""
    panels = []
    for key in [k for k in keys if any(k in m for m in metrics)]:
        pts = [(m["step"], m[key]) for m in metrics if key in m and math.isfinite(m[key])]
        log_y = key in LOSS_TERMS and all(y > 0 for _, y in pts)
        panels.append(line_chart([(key, [p[0] for p in pts], [p[1] for p in pts])], key, "step", key,
                                 log_y=log_y, size=(520, 260)))
    grid(panels, cols=2, title="training curves").save(path)
