"""
Pixel boxes for the occlusion control: as much area as the evidence boxes hide, placed elsewhere,
off the evidence and off each other (eval.occlusion paints them grey).
"""
import numpy as np


def painted(boxes, width, height):
    """(height, width) bool: the pixels that occluded() paints for integer boxes."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return mask


def disjoint_boxes(mask):
    """A mask -> boxes that cover it exactly and do not overlap: each run of set pixels in a row,
    grown down while the rows below have the same run."""
    boxes, growing = [], {}  # (x0, x1) -> the row it started in
    for y in range(mask.shape[0] + 1):
        row = np.concatenate([[False], mask[y] if y < mask.shape[0] else np.zeros(mask.shape[1], bool),
                              [False]])
        edges = np.flatnonzero(row[1:] != row[:-1])
        runs = set(zip(edges[::2].tolist(), edges[1::2].tolist()))
        for run in [r for r in growing if r not in runs]:
            boxes.append((run[0], growing.pop(run), run[1], y))
        for run in runs:
            growing.setdefault(run, y)
    return boxes


def split_box(box, k):
    """A box cut into k x k boxes (integer edges, so their areas add up to the box's)."""
    x0, y0, x1, y1 = box
    xs = [x0 + (x1 - x0) * i // k for i in range(k + 1)]
    ys = [y0 + (y1 - y0) * i // k for i in range(k + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(k) for i in range(k)
            if xs[i + 1] > xs[i] and ys[j + 1] > ys[j]]


def place_boxes(sizes, taken, rng, restarts=20):
    """Boxes of the (w, h) sizes at random places where `taken` (H, W bool) is False, overlapping it
    and each other nowhere -> a list of boxes, or None. Largest first; the places tried lie on a
    lattice of a quarter of the box's shorter side (so grid-aligned places are among them), and a
    dead end starts over."""
    H, W = taken.shape
    for _ in range(restarts):
        occupied, out = taken.copy(), []
        for w, h in sorted(sizes, key=lambda s: -s[0] * s[1]):
            if w > W or h > H:
                return None
            step = max(1, min(w, h) // 4)
            xs = sorted(set(range(0, W - w + 1, step)) | {W - w})
            ys = sorted(set(range(0, H - h + 1, step)) | {H - h})
            cum = np.pad(occupied.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table
            y, x = np.array(ys)[:, None], np.array(xs)[None, :]
            free = (cum[y + h, x + w] - cum[y, x + w] - cum[y + h, x] + cum[y, x]) == 0
            if not free.any():
                break
            j, i = np.argwhere(free)[rng.integers(int(free.sum()))]
            out.append((xs[i], ys[j], xs[i] + w, ys[j] + h))
            occupied[ys[j]:ys[j] + h, xs[i]:xs[i] + w] = True
        else:
            return out
    return None


CONTROL_RULES = ((1, "the evidence's boxes"), (2, "each box cut in 2 x 2"), (4, "each box cut in 4 x 4"))


def control_boxes(boxes, width, height, rng):
    """The control of occlusion: boxes elsewhere that hide as much area as the evidence boxes, off
    the evidence and off each other -> (boxes, rule) or (None, "no room"). The first rule that can be
    placed wins: boxes of the evidence boxes' sizes (overlapping evidence boxes are first made
    disjoint), else each cut in 2 x 2, else in 4 x 4 (smaller pieces fit around the evidence). The
    painted area equals the evidence's exactly (integer boxes)."""
    evidence = painted(boxes, width, height)
    if 2 * int(evidence.sum()) > width * height:
        return None, "no room"  # the evidence covers more than half the image: no equal area elsewhere
    pieces = list(boxes) if int(evidence.sum()) == sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) \
        else disjoint_boxes(evidence)
    for k, rule in CONTROL_RULES:
        cut = [p for b in pieces for p in split_box(b, k)]
        placed = place_boxes([(b[2] - b[0], b[3] - b[1]) for b in cut], evidence, rng)
        if placed is not None:
            return placed, rule
    return None, "no room"
