"""
A synthetic visual reasoning set: shapes in a 3x3 grid, and questions that need looking.

Each record has a rationale that walks the grid one cell per step with a running tally, an answer,
a question type, and the boxes of the cells the answer depends on. The training split carries a
text prior (answers skewed per question type: what a model can exploit without looking); the
evaluation split is balanced and gives each item a counterfactual twin (the same question on a
minimally edited image whose answer differs).

    python -c "import synthetic; synthetic.make_synthetic('out/data')"
"""
import collections
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from config import ConfigError
from files import atomic_write

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
KINDS, GRID = ("circle", "square", "triangle"), 3


def render(grid, size):
    """grid: GRID x GRID of None or (colour, kind, large) -> RGB image; cell boxes are size / GRID."""
    im = Image.new("RGB", (size, size), (235, 235, 235))
    draw, cell = ImageDraw.Draw(im), size / GRID
    for r in range(GRID):
        for c in range(GRID):
            if grid[r][c] is None:
                continue
            colour, kind, large = grid[r][c]
            half = cell * (0.4 if large else 0.22)
            cx, cy = (c + 0.5) * cell, (r + 0.5) * cell
            box = [cx - half, cy - half, cx + half, cy + half]
            if kind == "circle":
                draw.ellipse(box, fill=COLOURS[colour])
            elif kind == "square":
                draw.rectangle(box, fill=COLOURS[colour])
            else:
                draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)],
                             fill=COLOURS[colour])
    return im


def describe(item):
    return "nothing" if item is None else f"a {'large' if item[2] else 'small'} {item[0]} {item[1]}"


def _solve(grid, q):
    """(answer, rationale, cells the answer depends on) for question q on grid. The rationale walks
    the cells row by row (a cell question stops at its cell) and keeps a running tally of the shapes
    the question asks about, so each step is one look and the summary copies the latest one."""
    tally = collections.Counter()

    def tag(r, c):  # what this cell adds to the tally, if anything
        item = grid[r][c]
        if item and item[1] in q.get("kinds", ()):  # count and compare: the shape word just said decides
            key = item[1]
        elif q["type"] == "cell" and (r, c) == tuple(q["cell"]):
            return " (this one)"
        else:
            return ""
        tally[key] += 1
        return f" ({key} {tally[key]})"
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    # up to the asked cell
    walked = cells[:cells.index(tuple(q["cell"])) + 1] if q["type"] == "cell" else cells
    walk = " ".join(f"Row {r + 1}: " + ", ".join(describe(grid[r][c]) + tag(r, c) for rr, c in walked
                                                 if rr == r) + "."
                    for r in sorted({r for r, _ in walked}))
    if q["type"] == "count":
        hits = [(r, c) for r, c in cells if grid[r][c] and grid[r][c][1] == q["kinds"][0]]
        return str(len(hits)), f"{walk} So {len(hits)} {q['kinds'][0]}s.", hits
    if q["type"] == "compare":
        k1, k2 = q["kinds"]
        a, b = ([(r, c) for r, c in cells if grid[r][c] and grid[r][c][1] == k] for k in (k1, k2))
        ans = "yes" if len(a) > len(b) else "no"
        return ans, f"{walk} So {len(a)} {k1}s and {len(b)} {k2}s.", a + b
    r, c = q["cell"]
    return grid[r][c][0], f"{walk} So the colour is {grid[r][c][0]}.", [(r, c)]


def _question_text(q):
    if q["type"] == "count":
        return f"How many {q['kinds'][0]}s are there?"
    if q["type"] == "compare":
        return f"Are there more {q['kinds'][0]}s than {q['kinds'][1]}s?"
    return f"What colour is the shape in row {q['cell'][0] + 1}, column {q['cell'][1] + 1}?"


def random_item(rng, colours=tuple(COLOURS), kinds=KINDS):  # (colour, kind, large)
    return (colours[rng.integers(len(colours))], kinds[rng.integers(len(kinds))], bool(rng.integers(2)))


def _sample(rng, qtype, skewed):
    """A grid and question whose answer follows a skewed (training text prior) or uniform distribution."""
    grid = [[None if rng.random() < 0.35 else random_item(rng) for _ in range(GRID)] for _ in range(GRID)]
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    order = [cells[i] for i in rng.permutation(len(cells))]
    if qtype == "count":
        kind = KINDS[rng.integers(3)]
        n = int(rng.choice(5, p=[0.1, 0.6, 0.1, 0.1, 0.1] if skewed else None))
        others = tuple(k for k in KINDS if k != kind)
        for i, (r, c) in enumerate(order):  # exactly n shapes of that kind
            if i < n:
                grid[r][c] = random_item(rng, kinds=(kind,))
            elif grid[r][c] and grid[r][c][1] == kind:
                grid[r][c] = random_item(rng, kinds=others)
        q = {"type": "count", "kinds": (kind,)}
    elif qtype == "compare":
        k1, k2 = (KINDS[i] for i in rng.permutation(3)[:2])
        yes = rng.random() < (0.8 if skewed else 0.5)
        n1, n2 = sorted(rng.choice(4, 2, replace=False))[::-1] if yes else sorted(rng.choice(4, 2))
        for i, (r, c) in enumerate(order):
            kind = k1 if i < n1 else k2 if i < n1 + n2 else KINDS[3 - KINDS.index(k1) - KINDS.index(k2)]
            grid[r][c] = random_item(rng, kinds=(kind,)) if i < n1 + n2 or grid[r][c] else None
        q = {"type": "compare", "kinds": (k1, k2)}
    else:
        r, c = order[0]
        colour = "red" if skewed and rng.random() < 0.6 else list(COLOURS)[rng.integers(4)]
        grid[r][c] = random_item(rng, (colour,))
        q = {"type": "cell", "cell": (r, c)}
    return grid, q


def _twin(rng, grid, q):
    """The counterfactual: the same question on a minimally edited grid whose answer differs."""
    answer = solve(grid, q)[0]
    for _ in range(100):
        g = [row[:] for row in grid]
        r, c = int(rng.integers(GRID)), int(rng.integers(GRID))
        if q["type"] in ("cell", "is_cell"):
            r, c = q["cell"]
        g[r][c] = random_item(rng) if q["type"] not in ("count", "exists") or rng.random() < 0.7 else None
        if q["type"] == "which_more" and _ties(g, q["kinds"]):
            continue  # the twin must not tie either
        if solve(g, q)[0] != answer:
            return g
    return None


# -----------------------------------------------------------------------------
# the wording family: answers that hang on the question's words, rationales that only say what is seen

WORDING_TYPES = ("is_cell", "which_more", "exists")


def _wording_solve(grid, q):
    """(answer, rationale, cells the answer depends on) for a wording-family question. The rationale
    states what the image shows about the question (the cell's shape; the two counts; the shapes of
    that kind and their colours) and never the answer: that takes the question's words too (a "not",
    "more" or "fewer", which of two kinds was named first)."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    if q["type"] == "is_cell":
        (r, c), item = q["cell"], grid[q["cell"][0]][q["cell"][1]]
        said = f"Row {r + 1}, column {c + 1} holds {describe(item)}."
        return ("yes" if (item[1] == q["kind"]) != q["negated"] else "no"), said, [(r, c)]
    if q["type"] == "which_more":
        k1, k2 = q["kinds"]
        a, b = ([rc for rc in cells if grid[rc[0]][rc[1]] and grid[rc[0]][rc[1]][1] == k] for k in (k1, k2))
        more = k1 if len(a) > len(b) else k2
        answer = more if q["more"] else (k2 if more == k1 else k1)
        plural = lambda n, kind: f"{n} {kind}{'s' * (n != 1)}"
        return answer, f"I count {plural(len(a), k1)} and {plural(len(b), k2)}.", a + b
    colour, kind = q["colour"], q["kind"]
    seen = [rc for rc in cells if grid[rc[0]][rc[1]] and grid[rc[0]][rc[1]][1] == kind]
    colours = sorted({grid[r][c][0] for r, c in seen})
    said = f"The {kind}s are {' and '.join(colours)}." if seen else f"I count 0 {kind}s."
    there = colour in colours
    # absent: every shape of the kind
    looked_at = [rc for rc in seen if grid[rc[0]][rc[1]][0] == colour] or seen
    return ("yes" if there != q["negated"] else "no"), said, looked_at


def _ties(grid, kinds):  # as many shapes of each kind: a "which" question would have no answer
    return len({sum(1 for row in grid for it in row if it and it[1] == k) for k in kinds}) == 1


def _wording_text(q):
    if q["type"] == "is_cell":
        r, c = q["cell"]
        return f"Is the shape in row {r + 1}, column {c + 1} {'not ' * q['negated']}a {q['kind']}?"
    if q["type"] == "which_more":
        return f"Which are there {'more' if q['more'] else 'fewer'} of, {q['kinds'][0]}s or {q['kinds'][1]}s?"
    return f"Is there {'no' if q['negated'] else 'a'} {q['colour']} {q['kind']}?"


def _wording_sample(rng, qtype, skewed):
    """A grid and a wording-family question whose answer is drawn first: in training (skewed) one way
    per type 70% of the time, whatever the words ("yes"; for "which", the kind named first), the text
    prior a model can take without looking or reading; in eval half and half."""
    lean = rng.random() < (0.7 if skewed else 0.5)
    for _ in range(1000):
        grid = [[None if rng.random() < 0.35 else random_item(rng) for _ in range(GRID)]
                for _ in range(GRID)]
        negated = bool(rng.integers(2))
        if qtype == "is_cell":
            cells = [(r, c) for r in range(GRID) for c in range(GRID) if grid[r][c]]
            if not cells:
                continue  # an empty grid: no shape to ask about
            q = {"type": "is_cell", "cell": cells[rng.integers(len(cells))], "negated": negated,
                 "kind": KINDS[rng.integers(3)]}
        elif qtype == "which_more":
            q = {"type": "which_more", "kinds": tuple(KINDS[i] for i in rng.permutation(3)[:2]),
                 "more": bool(rng.integers(2))}
            if _ties(grid, q["kinds"]):
                continue
        else:
            q = {"type": "exists", "colour": list(COLOURS)[rng.integers(4)], "kind": KINDS[rng.integers(3)],
                 "negated": negated}
        leaning = "yes" if qtype != "which_more" else q["kinds"][0]
        if (_wording_solve(grid, q)[0] == leaning) == lean:
            return grid, q
    raise RuntimeError(f"no {qtype} question found")  # not with these rates


def solve(grid, q):
    """(answer, rationale, cells the answer depends on) for a question of either family."""
    return _wording_solve(grid, q) if q["type"] in WORDING_TYPES else _solve(grid, q)


def question_text(q):
    return _wording_text(q) if q["type"] in WORDING_TYPES else _question_text(q)


def in_words(grid):
    """The grid as text, for the text-only version of the set (DRIFT's reasoning prior never sees pixels)."""
    return " ".join(f"Row {r + 1}: " + ", ".join(describe(grid[r][c]) for c in range(GRID)) + "."
                    for r in range(GRID))


FAMILIES = {"grid": ("count", "compare", "cell"), "wording": WORDING_TYPES}


def sample(rng, family, qtype, skewed):
    """A grid and question of the family (grid or wording) and type, skewed: the training split's lean."""
    return (_sample if family == "grid" else _wording_sample)(rng, qtype, skewed)


def image_record(out_dir, name, grid, q, image_size=96, images="images", **extra):
    """The record of question q on grid, its image rendered to out_dir/IMAGES/NAME.png, with the boxes
    (pixels) of the cells its answer depends on."""
    render(grid, image_size).save(os.path.join(out_dir, images, f"{name}.png"))
    answer, rationale, cells = solve(grid, q)
    cell = image_size / GRID
    box = lambda rc: [round(rc[1] * cell), round(rc[0] * cell), round((rc[1] + 1) * cell),
                      round((rc[0] + 1) * cell)]
    return {"id": name, "image": f"{images}/{name}.png", "question": question_text(q), "rationale": rationale,
            "answer": answer, "type": q["type"], "boxes": [box(rc) for rc in cells], **extra}


def text_record(rec, grid):
    """The same record with the grid in words before its question, and no image."""
    return {**{k: v for k, v in rec.items() if k not in ("image", "boxes")},
            "question": f"The grid: {in_words(grid)} {rec['question']}"}


def make_synthetic(out_dir, n_train=2000, n_eval=300, seed=0, image_size=96, family="grid"):
    """Writes train.jsonl (answers skewed per question type: a text prior to exploit) and eval.jsonl
    (balanced, each item with a counterfactual twin: same question, edited image, other answer),
    with PNGs under images/. Each record keeps the boxes of the cells its answer depends on.
    Beside them, train_text.jsonl and eval_text.jsonl: the same records with the grid in words in the
    question and no image. family: "grid" (counts, comparisons and a cell's colour, rationales that
    walk the grid with a running tally and end on the answer's number) or "wording" (negations and
    "which" questions, rationales that say what is seen and never the answer)."""
    if family not in FAMILIES:
        raise ValueError(f"synthetic family {family!r}: one of {', '.join(FAMILIES)}")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for split, n in (("train", n_train), ("eval", n_eval)):
        with open(os.path.join(out_dir, f"{split}.jsonl"),
                  "w") as f, open(os.path.join(out_dir, f"{split}_text.jsonl"), "w") as t:
            i = 0
            while i < n:
                grid, q = sample(rng, family, FAMILIES[family][i % 3], skewed=split == "train")
                if split == "eval":
                    twin = _twin(rng, grid, q)
                    if twin is None:
                        continue
                    rec = image_record(out_dir, f"{split}{i:05d}b", twin, q, image_size,
                                       twin_of=f"{split}{i:05d}")
                    f.write(json.dumps(rec) + "\n")
                    t.write(json.dumps(text_record(rec, twin)) + "\n")
                rec = image_record(out_dir, f"{split}{i:05d}", grid, q, image_size)
                f.write(json.dumps(rec) + "\n")
                t.write(json.dumps(text_record(rec, grid)) + "\n")
                i += 1
    return paths(out_dir)


def make_once(out_dir, n_train=2000, n_eval=300, seed=0, family="grid", flags="--n-train, --n-eval, --seed"):
    """make_synthetic, unless out_dir holds the set made with these settings: made.json names them,
    written (whole or not at all) after the set's last file. A set made with other settings is an
    error naming both (flags: the command line's names for them), never used nor overwritten; a
    folder without the marker (a set cut short by Ctrl-C) is made again. -> True if made now."""
    made = {"n_train": n_train, "n_eval": n_eval, "seed": seed, "family": family}
    marker = os.path.join(out_dir, "made.json")
    if os.path.exists(marker):
        with open(marker) as f:
            found = json.load(f)
        if found != made:
            raise ConfigError(f"{out_dir} holds a synthetic set made with {found}, not {made} ({flags}, "
                              "--family): use another --out, or delete that folder")
        return False
    make_synthetic(out_dir, n_train, n_eval, seed, family=family)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(made, f)
    atomic_write(marker, write)
    return True


def paths(out_dir, text_only=False):
    """The train and eval files make_synthetic wrote in out_dir (their text versions with text_only)."""
    text = "_text" if text_only else ""
    return os.path.join(out_dir, f"train{text}.jsonl"), os.path.join(out_dir, f"eval{text}.jsonl")
