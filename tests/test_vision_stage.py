"""The vision stage (vision_stage.py): SigLIP's sigmoid loss by hand, the batches' pairs, the probe's
labels against the pixels, resume after a Ctrl-C."""
import json
import math

import numpy as np
import pytest
import torch

import data
from model import small_config
from setting import base
from setting import synthetic
from setting import vision_stage as vs
from test_data import read_grid


def test_sigmoid_loss_by_hand():
    """Every (image, text) pair its own binary question, scored t x.y + b with t = exp(t'): the sum of
    -log sigmoid(+-logit) over all pairs, divided by the images; several positives per row allowed;
    and its gradient reaches t' and b."""
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(2, 4, generator=g, dtype=torch.float64), dim=-1)
    match = torch.tensor([[True, False], [False, True], [True, False]])  # text 0 matches two images
    t_prime = torch.tensor(math.log(7.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    want = 0.0
    for i in range(3):
        for j in range(2):
            logit = 7.0 * float(img[i] @ txt[j]) - 3.0
            z = 1 if match[i, j] else -1
            want += -math.log(1 / (1 + math.exp(-z * logit)))
    got = vs.sigmoid_loss(img, txt, match, t_prime, bias)
    assert got.item() == pytest.approx(want / 3, rel=1e-12)
    got.backward()
    # d/db of -log sigmoid(z l) is -z (1 - sigmoid(z l)): summed over the pairs, over 3
    sign = lambda i, j: 1 if match[i, j] else -1
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    dbias = sum(-sign(i, j) * (1 - sigmoid(sign(i, j) * (7.0 * float(img[i] @ txt[j]) - 3.0)))
                for i in range(3) for j in range(2)) / 3
    assert bias.grad.item() == pytest.approx(dbias, rel=1e-10) and t_prime.grad.item() != 0


def test_batch_pairs_by_unit():
    """unit image: a description per image, matched on the diagonal; unit cell: the batch's distinct
    phrases, each of the 9 tokens of each image matching its own cell's phrase."""
    rng = np.random.default_rng(0)
    grids = [vs.random_grid(rng) for _ in range(3)]
    texts, match = vs.batch_texts(grids, "image")
    assert texts == [synthetic.in_words(g) for g in grids]
    assert torch.equal(match, torch.eye(3, dtype=torch.bool))
    texts, match = vs.batch_texts(grids, "cell")
    assert len(texts) == len(set(texts)) and match.shape == (27, len(texts)) and (match.sum(1) == 1).all()
    said = [texts[int(j)] for j in match.int().argmax(1)]
    assert said == [synthetic.describe(c) for g in grids for r in g for c in r]


def test_probe_labels_are_the_pixels(tmp_path):
    """The probe's eval grids (the eval set's text version, through base.cells_to_grid) and their labels
    are what the rendered images show, cell by cell (read back from the pixels), and the pixels the
    probe feeds the tower are the eval images' own."""
    synthetic.make_synthetic(str(tmp_path), 2, 6, seed=3, image_size=192)  # (read_grid wants 192 px)
    images = [r for r in map(json.loads, open(tmp_path / "eval.jsonl")) if "twin_of" not in r]
    words = {r["id"]: r for r in map(json.loads, open(tmp_path / "eval_text.jsonl"))}
    proc = data.new_processor(["a small red circle"] * 20, tile=96, image_seq_len=9, vocab_size=280)
    for r in images:
        grid = base.cells_to_grid(base.cells_in_words(words[r["id"]]["question"]))
        pixels = read_grid(tmp_path / r["image"])
        labels = [vs.cell_labels(c) for c in vs.cells(grid)]
        colours, kinds = list(synthetic.COLOURS), synthetic.KINDS
        assert labels == [(0, -1, -1, -1) if p is None else (1, colours.index(p[0]), kinds.index(p[1]),
                                                            int(p[2] == "large")) for p in pixels], r["id"]
        on_disk = proc.image_processor.arrays(data.load_image(str(tmp_path / r["image"])))[0][-1]
        assert torch.equal(vs.pixels_of(proc, [grid], 192)[0], torch.from_numpy(on_disk))


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    proc = data.new_processor([synthetic.in_words(vs.random_grid(rng)) for i in range(30)], tile=96,
                              image_seq_len=9, vocab_size=300)
    return proc, small_config(proc.tokenizer.get_vocab_size(), proc.image_token_id)


def test_pretraining_lowers_the_loss_below_where_the_bias_alone_takes_it(tiny, tmp_path):
    """The first steps only move t and b (the loss falls from its start at b = -10 to where a blind tower
    sits); the tower learning shows after: per cell, the loss halves again within 120 steps of 8."""
    proc, config = tiny
    cfg = vs.VisionStageConfig(unit="cell", steps=120, batch_size=8, pairs=64, lr=3e-3)
    vs.pretrain(cfg, proc, config, str(tmp_path), log=lambda s: None)
    losses = json.load(open(tmp_path / "summary.json"))["losses"]
    assert len(losses) == 120 and sum(losses[-20:]) < 0.5 * sum(losses[20:40])


@pytest.mark.parametrize("unit", vs.UNITS)
def test_pretraining_resumes_where_it_stopped(tiny, tmp_path, monkeypatch, unit):
    """A Ctrl-C at step 12 saves a checkpoint, exits 130, and running the stage again ends on the tower
    an unbroken run gives, bit for bit; a finished stage is read back, not trained."""
    proc, config = tiny
    cfg = vs.VisionStageConfig(unit=unit, steps=20, batch_size=8, pairs=64)
    straight = vs.pretrain(cfg, proc, config, str(tmp_path / "a"), log=lambda s: None)
    real, calls = vs.sigmoid_loss, []

    def dies_at_step_12(*a):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(vs, "sigmoid_loss", dies_at_step_12)
    with pytest.raises(SystemExit, match="130"):
        vs.pretrain(cfg, proc, config, str(tmp_path / "b"), log=lambda s: None)
    monkeypatch.setattr(vs, "sigmoid_loss", real)
    said = []
    resumed = vs.pretrain(cfg, proc, config, str(tmp_path / "b"), log=said.append)
    assert said[0].endswith("at step 12")  # saved by the Ctrl-C
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    losses = [json.load(open(tmp_path / d / "summary.json"))["losses"] for d in ("a", "b")]
    assert len(losses[1]) == 20 and losses[0] == losses[1]  # the whole history, not the steps after resuming
    monkeypatch.setattr(vs, "sigmoid_loss", lambda *a: pytest.fail("a finished stage trained again"))
    again = vs.pretrain(cfg, proc, config, str(tmp_path / "a"), log=lambda s: None)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), again.state_dict().values()))


class FixedEmbeddings:
    """Stands in for SigLIP in retrieval: given image and text embeddings, whatever the pixels."""
    def __init__(self, unit, img, txt):
        self.unit, self.img, self.txt = unit, img, txt

    def image_embeddings(self, pixels):
        return self.img

    def text_embeddings(self, ids, mask):
        return self.txt


def test_retrieval_scores_each_image_by_its_best_text(tiny):
    """Image i counts when its likeliest text is its own: images 0 and 1 pick their own, image 2 picks
    text 0 (which image 0 also likes best): 2/3; read the other way (each text's best image) it would
    be 3/3 here, so the direction shows."""
    proc, config = tiny
    rng = np.random.default_rng(1)
    grids = [vs.random_grid(rng) for _ in range(3)]
    img = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.9, 0, 0.1]])
    txt = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.5, 0, 0.6]])
    assert vs.retrieval(FixedEmbeddings("image", img, txt), proc, grids, config) == pytest.approx(2 / 3)


def test_probe_scores_each_attribute_and_the_whole_cell(tiny, monkeypatch):
    """Features that hold each cell's emptiness, colour and size but not its kind: the probe reads those
    three perfectly, the kind near chance, and a whole cell is right when empty or when its kind is:
    cell = p_empty + (1 - p_empty) * kind, from the same guesses."""
    proc, config = tiny
    rng = np.random.default_rng(2)
    train, held = [vs.random_grid(rng) for _ in range(60)], [vs.random_grid(rng) for _ in range(30)]

    def features(tower, proc, grids, model_config):
        rows = []
        for g in grids:
            for c in vs.cells(g):
                empty, colour, _, size = vs.cell_labels(c)
                rows.append([float(empty), *(float(colour == k) for k in range(len(synthetic.COLOURS))),
                             float(size == 1), *np.random.default_rng(len(rows)).normal(size=4)])
        return torch.tensor(rows, dtype=torch.float32)
    monkeypatch.setattr(vs, "token_features", features)
    torch.manual_seed(0)
    out = vs.probe(None, proc, config, train, held)
    assert out["empty"] == out["colour"] == out["size"] == 1.0 and out["kind"] < 0.7
    p_empty = sum(c is None for g in held for c in vs.cells(g)) / (9 * len(held))
    assert out["cell"] == pytest.approx(p_empty + (1 - p_empty) * out["kind"], abs=1e-6)
