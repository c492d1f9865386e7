"""
The papers' setting in miniature: a pretrained base model, then each method fine-tuned from it.

Every model the papers study starts from a pretrained multimodal model, which has mostly been taught
to answer an image question directly, to describe images, and (through its language model) to reason
step by step in text, but never to reason in words about an image. The stand-in here is the small
model trained from scratch on such a mix (BASE_SHARES, fixed before any result was seen); a small
image chain-of-thought set (the papers' CoT-SFT data, far smaller than the base's) then fine-tunes
it with each method, and every model is measured on the same eval set, asked both ways.

    python nanoattcot.py               # the base (reused once made), CoT-SFT and Att-CoT, the report
    python nanoattcot.py base          # the base alone, with its report
    python nanoattcot.py --compare     # CoT-SFT and Att-CoT from the same base (or --compare sft,attcot,avar)
    python nanoattcot.py --text-only --objective sft   # a text-only cold start (AVAR's comparison)
    python nanoattcot.py --from-scratch   # the earlier experiment: each objective from random weights
"""
import json
import os
import re
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

import config
import data
import eval as eval_mod
import train
from analysis import report
from config import ConfigError, arg
from device import pick_device
from files import atomic_write, read_json
from generate import generate_answers
from model import VLM, small_config
from records import read_records
from setting import synthetic
from setting import vision_stage
from train_config import BASE_FINETUNE_LR, FINETUNE_STEPS, SCRATCH_LR, SCRATCH_WARMUP, TrainConfig

# the base's training mix: image + question -> the answer alone (most of what real MLLMs are tuned on);
# image -> the grid in words (alignment / caption data); text only: the grid in words and the question,
# asked to think step by step -> rationale and answer (the language model's reasoning habit). No record
# pairs an image with a rationale; the questions keep the training split's text prior.
BASE_SHARES = {"answer": 0.60, "caption": 0.15, "text_cot": 0.25}
CAPTION = "Describe the image."


@dataclass
class StageConfig:
    """The stages' own flags (nanoattcot.py's command line has them beside TrainConfig's)."""
    from_scratch: bool = arg(False, "the earlier experiment: the objective from random weights on the 20,000 "
                             "image CoT records, no base (default: fine-tune the base)")
    base: str = arg("", "the base's run folder (trained there unless it holds one); empty: OUT/base")
    base_seed: int = arg(0, "the base's seed, and its mix's, fine-tuning set's and eval set's (--seed: each "
                         "fine-tune's batch order)")
    vision_steps: int = arg(400, "the vision stage's steps (SigLIP's sigmoid loss, 64 images a step)")
    vision_unit: str = arg("image", "the vision stage's pairs: image (an image and its description) or cell "
                           "(an image token and its cell's phrase)", choices=vision_stage.UNITS)
    align_steps: int = arg(250, "the alignment stage: steps on the mix's captions (the tower frozen)")
    text_steps: int = arg(300, "the text stage, after the alignment: steps on the mix's text-only records, "
                          "where the language model learns to reason in words (0: none)")
    base_steps: int = arg(400, "the last stage: steps on the whole mix")
    base_records: int = arg(20000, "the base mix's records (base.BASE_SHARES)")
    cot_records: int = arg(3000, "the image CoT set the base is fine-tuned on")

    def __post_init__(self):
        config.check(self, [*config.at_least(self, 1, ("base_records", "cot_records")),
                            *config.at_least(self, 0, ("base_steps", "vision_steps", "text_steps",
                                                       "align_steps")),
                            ("vision_unit", self.vision_unit in vision_stage.UNITS,
                             f"one of {', '.join(vision_stage.UNITS)}")])


# the flags a base takes from the command line; the rest are the base's own (sft on the mix)
BASE_FLAGS = ("device", "family", "log_every", "save_every", "resume", "strict",
              "skip_nonfinite", "compile", "activation_checkpointing", "eval_limit", "n_eval")
# what makes two bases the same base (a finished one in OUT/base is reused only if these match)
BASE_IDENTITY = ("seed", "family", "batch_size", "max_steps", "n_train")
STAGE_IDENTITY = ("vision_steps", "vision_unit", "align_steps", "text_steps")
# the base's stages, in order: (name, the mix's records they train on, StageConfig's steps field)
VLM_STAGES = (("align", "caption", "align_steps"), ("text", "text_cot", "text_steps"))


def make_base_mix(out_dir, n, seed=0, family="grid", image_size=96):
    """Writes out_dir/base_N_sSEED.jsonl (so a stale mix of other settings is never read): n records,
    BASE_SHARES of each kind (exactly, rounded), in a seeded order, with their images in a folder of
    their own, out_dir/images_N_sSEED/ (another mix never draws over them) -> its path; beside it the
    captions and the text-only records alone (stage_data), what the alignment and text stages train
    on. Questions follow the family's training split (skewed answers)."""
    rng = np.random.default_rng(seed)
    images = f"images_{n}_s{seed}"
    os.makedirs(os.path.join(out_dir, images), exist_ok=True)
    counts = [round(n * s) for s in BASE_SHARES.values()]
    counts[0] += n - sum(counts)
    kinds = rng.permutation(np.repeat(list(BASE_SHARES), counts))
    lines = []
    for i, kind in enumerate(kinds):
        grid, q = synthetic.sample(rng, family, synthetic.FAMILIES[family][i % 3], skewed=True)
        name = f"base{i:05d}"
        if kind == "text_cot":  # no image is rendered
            answer, rationale, _ = synthetic.solve(grid, q)
            rec = {"id": name, "question": synthetic.question_text(q), "rationale": rationale,
                   "answer": answer, "type": q["type"]}
            rec = synthetic.text_record(rec, grid)
            rec["question"] = data.asked(rec["question"], "cot")
        else:
            rec = synthetic.image_record(out_dir, name, grid, q, image_size, images)
            if kind == "answer":
                rec.update(question=data.asked(rec["question"], "direct"), rationale="")
            else:
                rec = {"id": name, "image": rec["image"], "question": CAPTION, "rationale": "",
                       "answer": synthetic.in_words(grid), "type": "caption"}
        lines.append((str(kind), json.dumps({**rec, "kind": str(kind)}) + "\n"))
    path = os.path.join(out_dir, f"base_{n}_s{seed}.jsonl")
    for kind in ("caption", "text_cot"):  # the earlier stages' data: the mix's captions, its text
        write_text(stage_data(path, kind), "".join(line for k, line in lines if k == kind))
    write_text(path, "".join(line for _, line in lines))  # last: the mix is made once it is there
    return path


def stage_data(mix_path, kind):  # the mix's records of one kind, for the stage that trains on them
    return mix_path.replace(".jsonl", f"_{kind}.jsonl")


def make_finetune_set(out_dir, n, n_eval, seed=0, family="grid"):
    """The image chain-of-thought set (the papers' CoT-SFT data) and the eval set, in out_dir: the
    synthetic set of n training records (made once), written again as cot_train.jsonl (each question
    asked to think step by step) and text_cot_train.jsonl (the same records in words, no image: a
    text-only cold start). -> (cot_train, text_cot_train, eval) paths. The eval questions stay bare:
    eval asks them both ways. seed: the base's (every fine-tune of one base sees the same data). A
    folder made with other settings is an error, never remade under the runs that trained on it."""
    made_now = synthetic.make_once(out_dir, n, n_eval, seed, family=family,
                                   flags="--cot-records, --n-eval, --base-seed")
    out = []
    for src, dst in ((synthetic.paths(out_dir)[0], "cot_train.jsonl"),
                     (synthetic.paths(out_dir, text_only=True)[0], "text_cot_train.jsonl")):
        out.append(os.path.join(out_dir, dst))
        if made_now or not os.path.exists(out[-1]):
            with open(src) as f:
                recs = [json.loads(line) for line in f]
            write_text(out[-1], "".join(json.dumps({**r, "question": data.asked(r["question"], "cot")}) + "\n"
                                        for r in recs))
    return out[0], out[1], synthetic.paths(out_dir)[1]


def write_text(path, text):  # whole or not at all (files.atomic_write)
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def cells_in_words(text):
    """'Row 1: a small red circle, nothing, ...' -> the cells it names, in order: (colour, kind, size) or
    None for "nothing"."""
    found = re.findall(r"\b(nothing|a (small|large) (\w+) (\w+))", text)
    return [None if f[0] == "nothing" else (f[2], f[3], f[1]) for f in found]


def caption_check(model, proc, eval_path, n=100, log=None):
    """Does the base see? It describes the first n eval images (the caption prompt) and each of the 9
    cells it names is compared with the truth (the eval set's text version) -> the share of cells
    right, and the shares with the right shape kind and the right colour (a missing cell is wrong)."""
    images = [r for r in read_records(eval_path) if "twin_of" not in r][:n]  # a twin differs in one cell
    words = {r["id"]: r for r in read_records(synthetic.paths(os.path.dirname(eval_path), text_only=True)[1])}
    truth = [cells_in_words(words[r["id"]]["question"])[:9] for r in images]
    said = [cells_in_words(t)[:9] for t in generate_answers(
        model, proc, [{**r, "question": CAPTION} for r in images], max_new_tokens=96, log=log)]
    pairs = [(s[i] if i < len(s) else "missing", t[i]) for s, t in zip(said, truth) for i in range(9)]
    part = lambda a, b, k: a == b if a is None or b is None or a == "missing" else a[k] == b[k]
    return {"n": len(images), "cells_right": sum(a == b for a, b in pairs) / len(pairs),
            "kind_right": sum(part(a, b, 1) for a, b in pairs) / len(pairs),
            "colour_right": sum(part(a, b, 0) for a, b in pairs) / len(pairs),
            "example": {"said": said[0], "truth": truth[0]}}


def folders(args, st):
    """-> the base's mix (BASE/data), the fine-tuning and eval sets (OUT/data_cot) and the base's run
    folder (--base, else OUT/base); per family."""
    tag = "" if args["family"] == "grid" else f"_{args['family']}"
    base_dir = st.base or os.path.join(args["out"], f"base{tag}")
    return os.path.join(base_dir, "data"), os.path.join(args["out"], f"data_cot{tag}"), base_dir


def stage_config(args, st, name, init, data_path, steps):
    """A VLM stage's TrainConfig: sft from init on data_path, the tower frozen (trained at this rate by
    the generative loss, a random tower's captions fall from 0.59 to 0.06 of the cells right: measured),
    args' BASE_FLAGS."""
    _, cot_dir, run_dir = folders(args, st)
    return TrainConfig(**{k: args[k] for k in BASE_FLAGS}, seed=st.base_seed, objective="sft", init=init,
                       out=run_dir if name == "mix" else os.path.join(run_dir, name), data=data_path,
                       eval_data=synthetic.paths(cot_dir)[1], max_steps=steps, n_train=st.base_records,
                       prompt="cot", lr=SCRATCH_LR, lr_vision=SCRATCH_LR, lr_connector=SCRATCH_LR,
                       warmup=SCRATCH_WARMUP, freeze_vision=True)


def finetune_config(args, st, base_model):
    """A fine-tune's TrainConfig: args as given, from base_model, on the image CoT set (its text-only
    version with --text-only), the learning rate and steps of a fine-tune from the base where args
    leave them unset, measured with the step-by-step prompt."""
    _, cot_dir, _ = folders(args, st)
    cot_train, text_train, eval_path = make_finetune_set(cot_dir, st.cot_records, args["n_eval"],
                                                         st.base_seed, args["family"])
    unset = {k: v for k, v in (("lr", BASE_FINETUNE_LR), ("lr_vision", BASE_FINETUNE_LR),
                               ("lr_connector", BASE_FINETUNE_LR), ("max_steps", FINETUNE_STEPS),
                               ("prompt", "cot"), ("freeze_vision", True)) if args[k] is None}
    text = args["text_only"]  # its own folder, so a text-only sft never overwrites the image one
    return TrainConfig(**{**args, **unset, "init": base_model, "data": text_train if text else cot_train,
                          "eval_data": eval_path, "text_only": False,
                          "out": os.path.join(args["out"], "text_only") if text else args["out"]})


def identity(args, st):
    """What makes two bases the same base: its seed, family, batch, mix and every stage's settings."""
    return {"seed": st.base_seed, "family": args["family"], "batch_size": args["batch_size"],
            "n_train": st.base_records, "max_steps": st.base_steps,
            **{k: getattr(st, k) for k in STAGE_IDENTITY}}


def check_identity(run_dir, want):
    """run_dir/stages.json names the base being made there: another base's folder is an error (never
    overwritten); a fresh folder gets the marker."""
    marker = os.path.join(run_dir, "stages.json")
    older = os.path.exists(os.path.join(run_dir, "summary.json"))  # a base from before the stages
    made = read_json(marker, data.DataError) if os.path.exists(marker) \
        else {"made": "before stages"} if older else {}
    differ = [k for k in {**made, **want} if made and made.get(k) != want.get(k)]
    if differ:
        raise ConfigError(f"{run_dir} holds a base trained with other settings ("
                          + ", ".join(f"{k} {made.get(k)} there, {want.get(k)} now" for k in differ)
                          + "): use another --out or --base, or delete that folder to train this one")
    os.makedirs(run_dir, exist_ok=True)
    write_text(marker, json.dumps(want))


def stage_done(folder):  # a stage is done once its marker is written, after its model
    path = os.path.join(folder, "done.json")
    return read_json(path, data.DataError) if os.path.exists(path) else None


def vision_and_init(args, st, mix_path, eval_path, log):
    """The tokenizer (trained on the mix's texts), the vision stage (vision_stage.pretrain) and its
    linear probe, then the VLM assembled: the pretrained tower, a new connector and language model
    (seeded) -> its folder, BASE/init/model."""
    run_dir = folders(args, st)[2]
    folder = os.path.join(run_dir, "init", "model")
    if stage_done(os.path.dirname(folder)):
        return folder
    records = read_records(mix_path, data.Skips(args["strict"]))
    proc = data.new_processor([r["question"] + " " + r["reply"] for r in records], tile=96, image_seq_len=9,
                              vocab_size=600)
    model_config = small_config(proc.tokenizer.get_vocab_size(), proc.image_token_id)
    torch.manual_seed(st.base_seed)
    model = VLM(model_config)
    if st.vision_steps:
        cfg = vision_stage.VisionStageConfig(unit=st.vision_unit, steps=st.vision_steps, seed=st.base_seed)
        tower = vision_stage.pretrain(cfg, proc, model_config, os.path.join(run_dir, "vision"), log)
        eval_grids = [cells_to_grid(cells_in_words(r["question"])) for r in read_records(
            synthetic.paths(os.path.dirname(eval_path), text_only=True)[1]) if "twin_of" not in r]
        rng = np.random.default_rng(st.base_seed + 1)
        train_grids = [vision_stage.random_grid(rng) for _ in range(500)]
        probes = {name: vision_stage.probe(t, proc, model_config, train_grids, eval_grids)
                  for name, t in (("pretrained", tower), ("untrained", model.vision))}
        done = read_json(os.path.join(run_dir, "vision", "summary.json"), data.DataError)
        unit, text = ("image", "description") if st.vision_unit == "image" else ("token", "phrase")
        log(f"vision: {done['seconds']:.0f} s; each unseen {unit} retrieves its own {text} first "
            f"{done['retrieval']:.2f} of the time")
        for name, p in probes.items():
            log(f"vision: a linear probe of the {name} tower's tokens on the {len(eval_grids)} eval images: "
                + ", ".join(f"{k} {v:.2f}" for k, v in p.items()))
        vision_stage.write_json(os.path.join(run_dir, "vision", "probe.json"), probes)
        model.vision.load_state_dict(tower.state_dict())
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    write_text(os.path.join(os.path.dirname(folder), "done.json"), json.dumps({"vision": st.vision_steps}))
    return folder


def cells_to_grid(cells):  # cells_in_words' 9 cells -> the renderer's 3 x 3 grid of (colour, kind, large)
    item = lambda c: None if c is None else (c[0], c[1], c[2] == "large")
    return [[item(c) for c in cells[r * 3:r * 3 + 3]] for r in range(3)]


def ensure_base(args, st, log=print):
    """The base model's folder, made stage by stage (each reused once done, resumable with --resume):
    the vision tower and the assembled VLM (vision_and_init), the alignment stage, the text stage,
    then the whole mix, trained and reported; the seconds each took are logged. run_dir/stages.json
    names the base: another one there is an error, never overwritten. The base's row is measured again
    when it was measured on other eval records than this run's (evaluate's eval_key), and finished
    (the caption check) when a run was killed before that. The eval set is there already (the
    pipeline made it checking the flags).
    -> (model folder, its eval results, seconds spent)."""
    mix_dir, cot_dir, run_dir = folders(args, st)
    check_identity(run_dir, identity(args, st))
    mix = os.path.join(mix_dir, f"base_{st.base_records}_s{st.base_seed}.jsonl")
    eval_path, t0, took = synthetic.paths(cot_dir)[1], time.time(), {}
    clock = lambda stage: took.update({stage: round(time.time() - t0 - sum(took.values()), 1)})
    if not os.path.exists(mix):
        make_base_mix(mix_dir, st.base_records, st.base_seed, args["family"])
    clock("data")
    init = vision_and_init(args, st, mix, eval_path, log)
    clock("vision")
    for name, kind, steps in VLM_STAGES:  # each from the last one's model
        folder = os.path.join(run_dir, name)
        if getattr(st, steps) and not stage_done(folder):
            cfg = stage_config(args, st, name, init, stage_data(mix, kind), getattr(st, steps))
            result = train.train(cfg)
            done = {"steps": getattr(st, steps)}
            if name == "align":  # what it is for: describing the image
                done["caption"] = caption_check(result["model"], result["proc"], eval_path)
                log("align: the captions name {cells_right:.2f} of the cells right ({kind_right:.2f} the "
                    "shape kind, {colour_right:.2f} the colour)".format(**done["caption"]))
            write_text(os.path.join(folder, "done.json"), json.dumps(done))
        init = os.path.join(folder, "model") if getattr(st, steps) else init
        clock(name)
    cfg = stage_config(args, st, "mix", init, mix, st.base_steps)
    summary_path, eval_json = os.path.join(cfg.out, "summary.json"), os.path.join(cfg.out, "eval.json")
    folder = os.path.join(cfg.out, "model")
    eval_records = read_records(cfg.eval_data, data.Skips(cfg.strict))[:cfg.eval_limit or None]
    if os.path.exists(summary_path):
        ev = read_json(eval_json, data.DataError) if os.path.exists(eval_json) else \
            {k: v for k, v in read_json(summary_path, data.DataError).items()
             if k != "config"}  # killed after its eval
        if ev.get("eval_key") != eval_mod.records_key(eval_records):
            log(f"base: measuring {folder} again (its row was measured on other eval records than "
                f"{cfg.eval_data}, --eval-limit {cfg.eval_limit})")
            ev = measure(cfg, folder, eval_records)
        elif "caption" in ev:
            log(f"base: reusing {folder} (its stages: {identity(args, st)})")
            return folder, ev, 0.0
    else:
        ev = next(iter(train.run(cfg).values()))
    clock("mix and its eval")
    model = VLM.from_pretrained(folder, dtype=torch.float32).to(pick_device(cfg.device))
    ev["caption"] = caption_check(model, data.Processor.from_pretrained(folder), cfg.eval_data)
    log("base: its captions name {cells_right:.2f} of the cells right ({kind_right:.2f} the shape kind, "
        "{colour_right:.2f} the colour), n = {n} images".format(**ev["caption"]))
    clock("captions")
    ev["stage_seconds"] = took
    log("base: seconds per stage (0: reused): " + ", ".join(f"{k} {v:.0f}" for k, v in took.items()))
    # the base's row in later reports
    write_text(eval_json, json.dumps({k: v for k, v in ev.items() if k != "config"}))
    meta = {"model": "the base", "stages": identity(args, st)}
    report.write_report({"base": ev}, cfg.out, meta, [("Training curves", "curves.png")])  # + captions
    return folder, ev, time.time() - t0


def measure(cfg, folder, eval_records):
    """The base's row, measured anew on eval_records (its text prior and candidates from its own mix)."""
    model = VLM.from_pretrained(folder, dtype=torch.float32).to(pick_device(cfg.device))
    layers = config.layer_set(cfg.layers, len(model.layers), "--layers")
    return eval_mod.evaluate(model, data.Processor.from_pretrained(folder), eval_records,
                             read_records(cfg.data, data.Skips()), layers, cot=cfg.prompt)


def pipeline(args, st, compare, base_only=False, log=print):
    """The default run: the base (ensure_base), then each objective (compare, else --objective)
    fine-tuned from it, one report with the base's row first. -> the summaries."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("the base and its fine-tunes run on one process: under torchrun, train one stage "
                          "with 'train' (its --data, --eval-data and --init given)")
    if args["eval_data"]:
        raise ConfigError("--eval-data: given alone, the base and its fine-tunes are measured on their own "
                          "eval set; with --data (or --from-scratch) it is used")
    os.makedirs(args["out"], exist_ok=True)
    # every flag checked now, not after the base trains (OUT stands in for the base's model folder)
    cfg = finetune_config(args, st, args["out"])
    base_model, base_eval, seconds = ensure_base(args, st, log)
    if base_only:
        return {"base": base_eval}
    cfg = replace(cfg, init=base_model)
    t0 = time.time()
    summaries = train.run(cfg, list(compare) or [cfg.objective], before={"base": base_eval})
    log(f"stages: base {seconds:.0f} s (0: reused), fine-tunes and report {time.time() - t0:.0f} s")
    return summaries
