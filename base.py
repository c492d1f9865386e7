"""
The papers' setting in miniature: a pretrained base model, then each method fine-tuned from it.

Every model the papers study starts from a pretrained multimodal model, which has mostly been taught
to answer an image question directly, to describe images, and (through its language model) to reason
step by step in text, but never to reason in words about an image. The stand-in here is the small
model trained from scratch on such a mix (BASE_SHARES, fixed before any result was seen); a small
image chain-of-thought set (the papers' CoT-SFT data, far smaller than the base's) then fine-tunes
it with each method, and every model is measured on the same eval set, asked both ways.

    python nanoattcot.py               # the base (reused if out/base holds it), Att-CoT from it, the report
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
import synthetic
from config import ConfigError, arg
from model import VLM, atomic_write, pick_device
from records import read_records

# the base's training mix: image + question -> the answer alone (most of what real MLLMs are tuned on);
# image -> the grid in words (alignment / caption data); text only: the grid in words and the question,
# asked to think step by step -> rationale and answer (the language model's reasoning habit). No record
# pairs an image with a rationale; the questions keep the training split's text prior.
BASE_SHARES = {"answer": 0.60, "caption": 0.15, "text_cot": 0.25}
CAPTION = "Describe the image."
# fine-tuning the base: a third of its peak rate (it ended its own cosine at a tenth), every part alike
# (all of it was trained from scratch together), nanoVLM's 3% warmup; the fine-tune's own steps.
BASE_FINETUNE_LR, FINETUNE_STEPS = 1e-3, 400


@dataclass
class StageConfig:
    """The stages' own flags (nanoattcot.py's command line has them beside TrainConfig's)."""
    from_scratch: bool = arg(False, "the earlier experiment: the objective from random weights on the 20,000 "
                             "image CoT records, no base (default: fine-tune the base)")
    base: str = arg("", "the base's run folder (trained there unless it holds one); empty: OUT/base")
    base_seed: int = arg(0, "the base's seed, and its mix's, fine-tuning set's and eval set's (--seed: each "
                         "fine-tune's batch order)")
    base_steps: int = arg(800, "the base's training steps")
    base_records: int = arg(20000, "the base mix's records (base.BASE_SHARES)")
    cot_records: int = arg(3000, "the image CoT set the base is fine-tuned on")

    def __post_init__(self):
        config.check(self, [*config.at_least(self, 1, ("base_records", "cot_records")),
                            *config.at_least(self, 0, ("base_steps",))])


# the flags a base takes from the command line; the rest are the base's own (sft, from scratch)
BASE_FLAGS = ("device", "family", "log_every", "save_every", "resume", "strict",
              "skip_nonfinite", "compile", "activation_checkpointing", "eval_limit", "n_eval")
# what makes two bases the same base (a finished one in OUT/base is reused only if these match)
BASE_IDENTITY = ("seed", "family", "batch_size", "max_steps", "n_train")


def make_base_mix(out_dir, n, seed=0, family="grid", image_size=96):
    """Writes out_dir/base_N_sSEED.jsonl (so a stale mix of other settings is never read): n records,
    BASE_SHARES of each kind (exactly, rounded), in a seeded order, with their images in a folder of
    their own, out_dir/images_N_sSEED/ (another mix never draws over them) -> its path. Questions
    follow the family's training split (skewed answers)."""
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
        lines.append(json.dumps({**rec, "kind": str(kind)}) + "\n")
    path = os.path.join(out_dir, f"base_{n}_s{seed}.jsonl")
    write_text(path, "".join(lines))
    return path


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


def write_text(path, text):  # whole or not at all (model.atomic_write)
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
    said = [cells_in_words(t)[:9] for t in eval_mod.generate_answers(
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


def base_config(args, st, make_config):
    """The base's TrainConfig: sft from scratch on the mix, args' BASE_FLAGS and --base-steps,
    --base-records. args: TrainConfig's settings from the command line (a dict); st: the
    StageConfig; make_config: TrainConfig."""
    mix_dir, cot_dir, run_dir = folders(args, st)
    return make_config(**{k: args[k] for k in BASE_FLAGS}, seed=st.base_seed, objective="sft", out=run_dir,
                       data=os.path.join(mix_dir, f"base_{st.base_records}_s{st.base_seed}.jsonl"),
                       eval_data=synthetic.paths(cot_dir)[1], max_steps=st.base_steps,
                       n_train=st.base_records, prompt="cot")


def finetune_config(args, st, make_config, base_model):
    """A fine-tune's TrainConfig: args as given, from base_model, on the image CoT set (its text-only
    version with --text-only), the learning rate and steps of a fine-tune from the base where args
    leave them unset, measured with the step-by-step prompt."""
    _, cot_dir, _ = folders(args, st)
    cot_train, text_train, eval_path = make_finetune_set(cot_dir, st.cot_records, args["n_eval"],
                                                         st.base_seed, args["family"])
    unset = {k: v for k, v in (("lr", BASE_FINETUNE_LR), ("lr_vision", BASE_FINETUNE_LR),
                               ("lr_connector", BASE_FINETUNE_LR), ("max_steps", FINETUNE_STEPS),
                               ("prompt", "cot")) if args[k] is None}
    text = args["text_only"]  # its own folder, so a text-only sft never overwrites the image one
    return make_config(**{**args, **unset, "init": base_model, "data": text_train if text else cot_train,
                          "eval_data": eval_path, "text_only": False,
                          "out": os.path.join(args["out"], "text_only") if text else args["out"]})


def ensure_base(args, st, train_and_report, make_config, log=print):
    """The base model's folder, trained (and reported) unless run_dir/model holds a finished base with
    the same identity; another base there is an error, never overwritten. Its row is measured again
    when it was measured on other eval records than this run's (evaluate's eval_key), and finished
    (the caption check) when a run was killed before that. The eval set is there already (the
    pipeline made it checking the flags). -> (model folder, its eval results, seconds spent)."""
    cfg = base_config(args, st, make_config)
    mix_dir = folders(args, st)[0]
    summary_path, eval_json = os.path.join(cfg.out, "summary.json"), os.path.join(cfg.out, "eval.json")
    folder, t0 = os.path.join(cfg.out, "model"), time.time()
    eval_records = read_records(cfg.eval_data, data.Skips(cfg.strict))[:cfg.eval_limit or None]
    if os.path.exists(summary_path):
        done = data.read_json(summary_path)
        differ = [k for k in BASE_IDENTITY if done["config"][k] != getattr(cfg, k)]
        if differ:
            raise ConfigError(f"{cfg.out} holds a base trained with other settings ("
                              + ", ".join(f"{k} {done['config'][k]} there, {getattr(cfg, k)} now"
                                          for k in differ)
                              + "): use another --out or --base, or delete that folder to train this one")
        ev = data.read_json(eval_json) if os.path.exists(eval_json) else \
            {k: v for k, v in done.items() if k != "config"}  # killed after its eval: finish it
        if ev.get("eval_key") != eval_mod.records_key(eval_records):
            log(f"base: measuring {folder} again (its row was measured on other eval records than "
                f"{cfg.eval_data}, --eval-limit {cfg.eval_limit})")
            ev = measure(cfg, folder, eval_records)
        elif "caption" in ev:
            log(f"base: reusing {folder} (trained {cfg.max_steps} steps, seed {cfg.seed})")
            return folder, ev, 0.0
    else:
        if not os.path.exists(cfg.data):
            make_base_mix(mix_dir, cfg.n_train, cfg.seed, cfg.family)
        ev = next(iter(train_and_report(cfg).values()))
    model = VLM.from_pretrained(folder, dtype=torch.float32).to(pick_device(cfg.device))
    ev["caption"] = caption_check(model, data.Processor.from_pretrained(folder), cfg.eval_data)
    log("base: its captions name {cells_right:.2f} of the cells right ({kind_right:.2f} the shape kind, "
        "{colour_right:.2f} the colour), n = {n} images".format(**ev["caption"]))
    # the base's row in later reports
    write_text(eval_json, json.dumps({k: v for k, v in ev.items() if k != "config"}))
    meta = {"model": "the base", "steps": cfg.max_steps, "seed": cfg.seed}
    eval_mod.write_report({"base": ev}, cfg.out, meta, [("Training curves", "curves.png")])  # + captions
    return folder, ev, time.time() - t0


def measure(cfg, folder, eval_records):
    """The base's row, measured anew on eval_records (its text prior and candidates from its own mix)."""
    model = VLM.from_pretrained(folder, dtype=torch.float32).to(pick_device(cfg.device))
    layers = config.layer_set(cfg.layers, len(model.layers), "--layers")
    return eval_mod.evaluate(model, data.Processor.from_pretrained(folder), eval_records,
                             read_records(cfg.data, data.Skips()), layers, cot=cfg.prompt)


def pipeline(args, st, compare, train_and_report, make_config, base_only=False, log=print):
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
    cfg = finetune_config(args, st, make_config, args["out"])
    base_model, base_eval, seconds = ensure_base(args, st, train_and_report, make_config, log)
    if base_only:
        return {"base": base_eval}
    cfg = replace(cfg, init=base_model)
    t0 = time.time()
    summaries = train_and_report(cfg, list(compare) or [cfg.objective], before={"base": base_eval})
    log(f"stages: base {seconds:.0f} s (0: reused), fine-tunes and report {time.time() - t0:.0f} s")
    return summaries
