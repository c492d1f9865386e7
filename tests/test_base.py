"""The base model and the pipeline built on it (base.py): the mix, the prompts, the stage chain."""
import collections
import json
import os
import re

import pytest
import safetensors.torch
import torch

import checkpoint
import data
import nanoattcot
import train as trainer
import train_config
from model import VLM
from setting import base
from setting import synthetic
from test_data import grid_answer, read_grid


def cells_in_words(text):
    """'Row 1: a small red circle, nothing, ... Row 3: ...' -> read_grid's cells."""
    found = re.findall(r"(nothing|a (small|large) (\w+) (\w+))", text)
    return [None if f[0] == "nothing" else (f[2], f[3], f[1]) for f in found]


def test_caption_check_reads_the_cells(tmp_path, monkeypatch):
    """Cell by cell against the pixels (read_grid): a caption read off the image scores 1; one cell's
    kind changed costs that cell (its colour still right); a caption that stops early loses the rest."""
    synthetic.make_synthetic(str(tmp_path), 2, 4, seed=4, image_size=192)
    evals = [r for r in map(json.loads, open(tmp_path / "eval.jsonl")) if "twin_of" not in r][:3]
    words = lambda cells: "Row 1: " + ", ".join("nothing" if c is None else f"a {c[2]} {c[0]} {c[1]}"
                                                 for c in cells) + "."
    grids = [read_grid(tmp_path / r["image"]) for r in evals]
    other = {"circle": "square", "square": "triangle", "triangle": "circle"}
    i = next(i for i, c in enumerate(grids[1]) if c)
    changed = [*grids[1][:i], (grids[1][i][0], other[grids[1][i][1]], grids[1][i][2]), *grids[1][i + 1:]]
    j = next(j for j, c in enumerate(grids[0]) if c)  # one cell's size changed: kind and colour still right
    resized = [*grids[0][:j], (*grids[0][j][:2], {"small": "large", "large": "small"}[grids[0][j][2]]),
               *grids[0][j + 1:]]
    asked = []

    def generate(model, proc, recs, *a, **kw):
        asked.extend(r["question"] for r in recs)
        return [words(resized), words(changed), words(grids[2][:4])]
    monkeypatch.setattr(base, "generate_answers", generate)
    got = base.caption_check(None, None, str(tmp_path / "eval.jsonl"), n=3)
    assert asked == [base.CAPTION] * 3 and got["n"] == 3
    assert got["cells_right"] == pytest.approx((8 + 8 + 4) / 27)
    assert got["kind_right"] == pytest.approx((9 + 8 + 4) / 27)
    assert got["colour_right"] == pytest.approx((9 + 9 + 4) / 27)


def test_base_mix(tmp_path):
    """Each kind in its share; no record pairs an image with a rationale; the answer-alone records
    are asked for the answer alone and answered as the pixels say; a caption says what the pixels
    show, cell by cell; a text-only record carries the grid in words, enough to solve its question,
    and asks for the steps; the questions keep the training split's text prior."""
    path = base.make_base_mix(str(tmp_path), 160, seed=3, image_size=192)
    recs = [json.loads(line) for line in open(path)]
    kinds = collections.Counter(r["kind"] for r in recs)
    assert kinds == {k: round(160 * s) for k, s in base.BASE_SHARES.items()}
    assert [r["kind"] for r in recs[:20]] != sorted(r["kind"] for r in recs[:20])  # mixed, not in blocks
    for r in recs:
        assert not ("image" in r and r["rationale"]), r["id"]
        if r["kind"] == "answer":
            question = r["question"].removesuffix(data.DIRECT)
            assert question != r["question"]
            assert grid_answer(read_grid(tmp_path / r["image"]), question)[0] == r["answer"], r["id"]
        elif r["kind"] == "caption":
            assert r["question"] == base.CAPTION
            assert cells_in_words(r["answer"]) == read_grid(tmp_path / r["image"]), r["id"]
        else:
            question = r["question"].rsplit(". ", 1)[1].removesuffix(data.COT)
            assert "image" not in r and r["question"].endswith(data.COT)
            cells = cells_in_words(r["question"].removesuffix(question + data.COT))
            assert len(cells) == 9 and grid_answer(cells, question)[0] == r["answer"], r["id"]
            assert r["rationale"].startswith("Row 1:"), r["id"]
    compare = [r["answer"] for r in recs if r["type"] == "compare"]
    assert compare.count("yes") / len(compare) > 0.65
    wording = [json.loads(line) for line in open(base.make_base_mix(str(tmp_path / "w"), 30,
                                                                    family="wording"))]
    assert {r["type"] for r in wording} == {*synthetic.WORDING_TYPES, "caption"}


def test_two_mixes_in_one_folder_keep_their_own_images(tmp_path):
    """A second mix in the base's data folder (another seed or size, allowed while the first base is
    unfinished) draws its images elsewhere: every caption of the first still says what its image shows."""
    first = base.make_base_mix(str(tmp_path), 40, seed=3, image_size=192)
    base.make_base_mix(str(tmp_path), 40, seed=4, image_size=192)
    base.make_base_mix(str(tmp_path), 41, seed=3, image_size=192)
    captions = [r for r in map(json.loads, open(first)) if r["kind"] == "caption"]
    assert captions and all(cells_in_words(r["answer"]) == read_grid(tmp_path / r["image"]) for r in captions)


def test_finetune_set_and_its_config(tmp_path):
    """The fine-tuning set is the synthetic train split asked to think step by step, with images, and
    its text version the same in words; a fine-tune's config takes the base's rate and steps where
    the command line leaves them unset, and the user's where it sets them; a set made with other
    settings is refused."""
    cot, text, ev = base.make_finetune_set(str(tmp_path / "d"), 12, 3)
    train, words = ([json.loads(line) for line in open(tmp_path / "d" / f)] for f in ("train.jsonl",
                                                                                    "train_text.jsonl"))
    for made, src in ((cot, train), (text, words)):
        got = [json.loads(line) for line in open(made)]
        assert got == [{**r, "question": r["question"] + data.COT} for r in src]
    assert all("image" in r for r in map(json.loads, open(cot))) and not any("image" in r for r in map(
        json.loads, open(text)))
    with pytest.raises(trainer.ConfigError, match="holds a synthetic set made with"):
        base.make_finetune_set(str(tmp_path / "d"), 13, 3)

    def config(*flags):
        args = vars(nanoattcot.parser().parse_args(["--out", str(tmp_path), "--cot-records", "12", "--n-eval",
                                                    "3", *flags]))
        args.pop("compare")
        st = base.StageConfig(**{f: args.pop(f) for f in base.StageConfig.__dataclass_fields__})
        return base.finetune_config(args, st, str(tmp_path))
    cfg = config()
    assert (cfg.max_steps, cfg.lr, cfg.lr_vision, cfg.lr_connector, cfg.prompt, cfg.init) == (
        train_config.FINETUNE_STEPS, *[train_config.BASE_FINETUNE_LR] * 3, "cot", str(tmp_path))
    assert (cfg.data, cfg.eval_data, cfg.out) == (str(tmp_path / "data_cot" / "cot_train.jsonl"),
                                                  str(tmp_path / "data_cot" / "eval.jsonl"), str(tmp_path))
    cfg = config("--max-steps", "7", "--lr", "0.5", "--prompt", "bare", "--text-only")
    assert (cfg.max_steps, cfg.lr, cfg.lr_vision, cfg.prompt) == (7, 0.5, train_config.BASE_FINETUNE_LR,
                                                                  "bare")
    assert (cfg.data, cfg.out, cfg.text_only) == (str(tmp_path / "data_cot" / "text_cot_train.jsonl"),
                                                  str(tmp_path / "text_only"), False)


def test_prompt_builders():
    assert data.asked("How many?", "bare") == "How many?"
    assert data.asked("How many?", "direct") == "How many?\nGive the answer alone, without reasoning."
    assert data.asked("How many?", "cot") == "How many?\nThink step by step."
    with pytest.raises(KeyError):
        data.asked("How many?", "reason")


TINY = ["--base-records", "60", "--cot-records", "24", "--n-eval", "3", "--batch-size", "4",
        "--vision-steps", "4", "--align-steps", "2", "--text-steps", "2", "--device", "cpu",
        "--log-every", "100"]


def weights(folder):
    return safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))


def test_stage_chain(tmp_path, capsys, monkeypatch):
    """The default run in small: the base made stage by stage in OUT/base (the vision tower, the
    assembled VLM, the alignment stage, the mix) and reported; CoT-SFT and Att-CoT each start from its
    weights and tokenizer (0 steps: the same weights), the report has the base's row first, then both,
    and each method's CoT prompt asks for the steps; a second run reuses every stage; another base's
    settings (any stage's) are refused, the finished base untouched; --resume picks up each stage
    where it stopped."""
    out = tmp_path / "out"
    nanoattcot.main(["--out", str(out), "--base-steps", "3", "--max-steps", "0", *TINY])
    assert {"sft", "attcot", "base", "data_cot", "report.md", "report.html"} <= set(os.listdir(out))
    assert {"vision", "init", "align", "text", "model", "stages.json"} <= set(os.listdir(out / "base"))
    for name in ("model.safetensors", "tokenizer.json"):
        assert os.path.exists(out / "base" / "model" / name) and os.path.exists(out / "base" / "report.md")
    start, tuned = weights(out / "base" / "model"), weights(out / "attcot" / "model")
    assert start.keys() == tuned.keys() and all(torch.equal(start[k], tuned[k]) for k in start)
    tower = safetensors.torch.load_file(out / "base" / "vision" / "tower.safetensors")
    vision = VLM.from_pretrained(str(out / "base" / "model")).vision.state_dict()  # the stage's, frozen since
    assert tower.keys() == vision.keys() and all(torch.equal(tower[k], vision[k]) for k in tower)
    # each stage starts from the one before: init -> align -> text -> the mix
    stage_init = lambda stage: checkpoint.load_trainer_state(
        out / "base" / stage / "checkpoint")["config"]["init"]
    assert stage_init("align") == str(out / "base" / "init" / "model")
    assert stage_init("text") == str(out / "base" / "align" / "model")
    mix = json.load(open(out / "base" / "summary.json"))["config"]
    assert mix["init"] == str(out / "base" / "text" / "model")
    connector = "model.connector.modality_projection.proj.weight"  # trained by the alignment stage
    assert not torch.equal(weights(out / "base" / "align" / "model")[connector],
                           weights(out / "base" / "init" / "model")[connector])
    assert (out / "base" / "model" / "tokenizer.json").read_text() == \
        (out / "attcot" / "model" / "tokenizer.json").read_text()
    report = json.load(open(out / "report.json"))
    assert list(report["results"]) == ["base", "sft", "attcot"] and report["meta"]["CoT prompt"] == "cot"
    head = (out / "report.md").read_text().split("\n- ")[0]  # the lines before the settings
    assert "**The base**" in head and "CoT-SFT" in head and "Att-CoT" in head
    assert 0 <= report["results"]["base"]["caption"]["cells_right"] <= 1  # the caption check, in the table
    assert "captions: cells / kind / colour right" in (out / "report.md").read_text()
    assert report["results"]["attcot"]["examples"][0]["question"].endswith(data.COT)
    assert report["results"]["base"]["examples"][0]["question"].endswith(data.COT)
    summary = json.load(open(out / "attcot" / "summary.json"))["config"]
    assert summary["init"] == str(out / "base" / "model") and summary["lr"] == train_config.BASE_FINETUNE_LR
    assert summary["data"] == str(out / "data_cot" / "cot_train.jsonl")
    examples = lambda name: [e["question"] for e in report["results"][name]["examples"]]
    assert examples("base") == examples("attcot")  # the same eval items, asked the same way
    capsys.readouterr()

    stages = ("model/model.safetensors", "vision/tower.safetensors", "align/model/model.safetensors",
              "init/model/model.safetensors")
    made = {f: os.path.getmtime(out / "base" / f) for f in stages}
    mtime = made["model/model.safetensors"]
    # another fine-tuning seed, more objectives, the same base
    nanoattcot.main(["--out", str(out), "--base-steps", "3", "--max-steps", "1", "--compare",
                     "sft,attcot,avar", "--seed", "1", *TINY])
    assert "base: reusing" in capsys.readouterr().out
    assert {f: os.path.getmtime(out / "base" / f) for f in made} == made
    assert list(json.load(open(out / "report.json"))["results"]) == ["base", "sft", "attcot", "avar"]
    refused = [(["--base-steps", "4"], r"a base trained with other settings \(max_steps 3 there, 4 now"),
               (["--base-seed", "1"], "holds a synthetic set made with"),
               (["--base-records", "61"], "n_train 60 there, 61 now"),
               (["--vision-steps", "5"], "vision_steps 4 there, 5 now"),
               (["--align-steps", "3"], "align_steps 2 there, 3 now"),
               (["--text-steps", "3"], "text_steps 2 there, 3 now")]
    for flags, why in refused:
        with pytest.raises(SystemExit, match=why):
            nanoattcot.main(["--out", str(out), "--base-steps", "3", *TINY, *flags])
    with pytest.raises(SystemExit, match="--difficulty '0.5': must be lo:hi"):  # a fine-tune's flag:
        nanoattcot.main(["--out", str(tmp_path / "fresh"), "--difficulty", "0.5", *TINY])  # checked first
    assert not os.path.exists(tmp_path / "fresh" / "base" / "summary.json")
    assert os.path.getmtime(out / "base" / "model" / "model.safetensors") == mtime
    os.remove(out / "base" / "eval.json")  # killed after the base's eval, before its caption check
    capsys.readouterr()
    nanoattcot.main(["--out", str(out), "--base-steps", "3", "--max-steps", "0", *TINY])
    assert os.path.getmtime(out / "base" / "model" / "model.safetensors") == mtime
    assert "caption" in json.load(open(out / "base" / "eval.json"))
    assert "measuring" not in capsys.readouterr().out  # finished, its row as measured
    # other eval records (--eval-limit): the base measured again on them, not retrained, never its old
    # row under the new key, also when eval.json is gone and summary.json holds the old row
    for limit, remove in (("2", True), ("0", False)):
        if remove:
            os.remove(out / "base" / "eval.json")
        nanoattcot.main(["--out", str(out), "--base-steps", "3", "--max-steps", "0", "--eval-limit", limit,
                         *TINY])
        row = json.load(open(out / "base" / "eval.json"))
        assert "base: measuring" in capsys.readouterr().out and row["n"] == (int(limit) or 6)
        assert row["eval_key"] == json.load(open(out / "attcot" / "summary.json"))["eval_key"]
        assert os.path.getmtime(out / "base" / "model" / "model.safetensors") == mtime

    real, calls = trainer.train_step, []

    def dies_at_step_3(*a, **kw):  # Ctrl-C in step 3
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(trainer, "train_step", dies_at_step_3)
    stages = [("base", ["base", "--out", str(tmp_path / "b")]), ("sft", ["--out", str(tmp_path / "b"),
                                                                        "--objective", "sft"])]
    for name, flags in stages:  # (no alignment nor text stage: the Ctrl-C lands in the mix's step 3)
        calls.clear()
        args = [*flags, "--base-steps", "4", "--max-steps", "4", "--save-every", "2", *TINY,
                "--align-steps", "0", "--text-steps", "0"]
        with pytest.raises(SystemExit, match="130"):  # interrupted: the checkpoint saved, exit 130
            nanoattcot.main(args)
        capsys.readouterr()
        nanoattcot.main([*args, "--resume"])
        assert f"resumed from {tmp_path / 'b' / name / 'checkpoint'} at step 2" in capsys.readouterr().out
        assert len(calls) == 3 + 2  # the two steps left, not four
        assert len(open(tmp_path / "b" / name / "metrics.jsonl").readlines()) == 4
    assert os.path.exists(tmp_path / "b" / "sft" / "model") and not os.path.exists(tmp_path / "b" / "model")


def test_text_only_cold_start_is_measured_on_images(tmp_path):
    """--text-only from the base: trained on the CoT set in words (no image), in its own folder,
    evaluated on the image eval set (AVAR's cold-start comparison)."""
    out = tmp_path / "out"
    nanoattcot.main(["--out", str(out), "--base-steps", "2", "--max-steps", "1", "--text-only", "--objective",
                     "sft", *TINY])
    summary = json.load(open(out / "text_only" / "sft" / "summary.json"))
    assert summary["config"]["data"].endswith("text_cot_train.jsonl")
    assert summary["config"]["eval_data"] == str(out / "data_cot" / "eval.jsonl")
    assert summary["where_it_looks"]["gold"]["image_mass_by_layer"][0] > 0  # the eval has images
    assert not os.path.exists(out / "sft")


def test_a_broken_stage_marker_is_a_one_line_error(tmp_path):
    """A stage's marker the base reads (stages.json here) that is not JSON: an error naming the file,
    which the command line prints alone (config.one_line_errors)."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "stages.json").write_text("{bad")
    with pytest.raises(SystemExit, match=r"^error: .*stages.json: not valid JSON"):
        nanoattcot.main(["base", "--out", str(tmp_path), *TINY])
