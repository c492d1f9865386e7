"""The command line, run as a user would, against transformers' greedy answer."""
import os
import subprocess
import sys

import torch

import data
from test_processor import IMAGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_prints_the_greedy_answer(checkpoints, tmp_path):
    path, hf = checkpoints["idefics3_gqa_untied_s2"]
    IMAGES[1].save(tmp_path / "photo.png")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", str(path),
                          "--image", str(tmp_path / "photo.png"), "--prompt", "How many circles?",
                          "--max-new-tokens", "6", "--device", "cpu"], capture_output=True, text=True,
                          timeout=300)
    assert run.returncode == 0, run.stderr
    proc = data.Processor.from_pretrained(path)
    text = proc.apply_chat_template([{"role": "user",
                                      "content": [{"type": "text", "text": "<image>How many circles?"}]}])
    # as trained
    assert text == data.record_prompt(proc, {"question": "How many circles?", "images": ["photo.png"]})
    b = proc(text, [[str(tmp_path / "photo.png")]])
    want = hf.generate(**b, max_new_tokens=6, do_sample=False, eos_token_id=proc.eos_token_id)
    answer = proc.decode(want[0, b["input_ids"].shape[1]:])
    assert answer and run.stdout.rstrip("\n") == answer
    assert "tokens in" in run.stderr
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", str(path),
                          "--prompt", "hi",
                          "--device", "cpu", "--visual-attn-scale", "2", "--visual-attn-layers", "7:"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr == "error: --visual-attn-layers 7:: names no layer of the model's 3\n"


def test_generate_names_a_missing_model(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model",
                          str(tmp_path / "nope"), "--prompt", "hi", "--device", "cpu"], capture_output=True,
                          text=True, timeout=120)
    assert run.returncode != 0 and "nope/config.json: not found" in run.stderr


# --- what a user sees for bad input: one line "error: ..." naming the file, key or flag, no traceback

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

import nanoattcot  # noqa: E402
import train as trainer

GOOD = {"question": "How many circles are there?", "rationale": "Row 1: a circle.", "answer": "1"}
TRAIN = ["--n-train", "8", "--batch-size", "2", "--max-steps", "1", "--log-every", "1", "--save-every", "0",
         "--device", "cpu"]


def jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return str(path)


def user_error(argv, main=nanoattcot.main):
    """Runs the command line in this process; returns the message it exits with."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    return e.value.code


def test_bad_training_data_is_one_line(tmp_path):
    ev = jsonl(tmp_path / "eval.jsonl", [GOOD])
    out = ["--out", str(tmp_path / "out")]
    empty = jsonl(tmp_path / "empty.jsonl", [])
    assert user_error(["train", "--data", empty, "--eval-data", ev, *out, *TRAIN]) == \
        f"error: {empty}: no usable training record (none skipped)"
    bad = jsonl(tmp_path / "bad.jsonl",
                ['{"question": "q"', {k: v for k, v in GOOD.items() if k != "question"}])
    msg = user_error(["train", "--data", bad, "--eval-data", ev, *out, *TRAIN])
    assert msg.startswith(f"error: {bad}: no usable training record (2 skipped (bad JSON: 1, no question: "
                          "1); "
                          f"first: {bad}:1: bad JSON")
    assert user_error(["train", "--data", bad, "--eval-data", ev, "--strict", *out, *TRAIN]).startswith(
        f"error: {bad}:1: bad JSON")
    assert user_error(["train", "--data", str(tmp_path / "nope.jsonl"), "--eval-data", ev, *out,
                       *TRAIN]) == \
        f"error: {tmp_path / 'nope.jsonl'}: data file not found"
    good = jsonl(tmp_path / "good.jsonl", [GOOD] * 4)
    assert user_error(["train", "--data", good, "--eval-data", empty, *out, *TRAIN]) == \
        f"error: {empty}: no usable evaluation record (none skipped)"
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Which?"}]}]))
    assert "llava.json:record 1: no user turn then assistant reply" in user_error(
        ["train", "--data", str(llava), "--eval-data", ev, *out, *TRAIN])


def test_a_malformed_line_is_skipped_and_counted(tmp_path, capsys):
    data_file = jsonl(tmp_path / "d.jsonl", [GOOD, "{oops", GOOD, GOOD])
    ev = jsonl(tmp_path / "eval.jsonl", [GOOD])
    nanoattcot.main(["train", "--data", data_file, "--eval-data", ev, "--out", str(tmp_path / "out"), *TRAIN,
                     "--eval-limit", "1"])
    said = f"data: 3 training records from {data_file}; 1 skipped (bad JSON: 1); first: {data_file}:2: " \
        "bad JSON"
    assert said in capsys.readouterr().out
    report = (tmp_path / "out" / "report.md").read_text()  # the run ends in the eval report
    assert "![" in report and "(accuracy.png)" in report and "(curves.png)" in report


@pytest.mark.parametrize("flags,message", [
    (["--vis-target", "2"], "error: --vis-target 2.0: must be in (0, 1] or none"),
    (["--batch-size", "0"], "error: --batch-size 0: must be >= 1"),
    (["--lr", "-1"], "error: --lr -1.0: must be > 0"),
    (["--layers", "1,x"],
     "error: --layers '1,x': must be all, last, or comma-separated layer indices and a:b ranges (negative "
     "counts from the end)"),
    (["--layers", "1:2:3"],
     "error: --layers '1:2:3': must be all, last, or comma-separated layer indices and a:b ranges "
     "(negative counts from the end)"),
    (["--layers", "0,7"], "error: --layers 0,7: the model has 4 layers (0 to 3)"),
    (["--data", "train.jsonl"],
     "error: --eval-data '': must be given with --data (every run ends in an evaluation)"),
    (["--device", "tpu9"], "error: --device 'tpu9': not a device (auto, cpu, cuda, cuda:N)"),
    (["--difficulty", "0.8:0.2", "--init", "."],
     "error: --difficulty '0.8:0.2': must be lo:hi with 0 <= lo <= hi <= 1"),
    (["--difficulty", "0.2:0.8"],
     "error: --difficulty '0.2:0.8': must be given with --init (the model whose success it measures)"),
    (["--visual-attn-scale", "2,0"],
     "error: --visual-attn-scale '2,0': must be comma-separated factors > 0"),
    (["--drift-prior", "nowhere"], "error: --drift-prior 'nowhere': must be an existing checkpoint folder"),
    (["--visual-attn-scale", "2", "--visual-attn-layers", "9:"],  # before training, not after it
     "error: --visual-attn-layers 9:: names no layer of the model's 4"),
    (["--visual-attn-layers", "-5"], "error: --visual-attn-layers -5: the model has 4 layers (0 to 3)"),
    (["--mass-impl", "cuda"],
     "error: --mass-impl cuda: the kernel runs on a CUDA device, and this run's is cpu"),
])
def test_bad_flag_values_are_one_line(tmp_path, flags, message):
    assert user_error(["train", "--out", str(tmp_path), *TRAIN, *flags]) == message


@pytest.mark.parametrize("flags,message", [
    (["--avar-layers", "x"],
     "error: --avar-layers 'x': must be all, last, or comma-separated layer indices and a:b ranges "
     "(negative counts from the end)"),
    (["--region-layers", "1,x"],
     "error: --region-layers '1,x': must be all, last, or comma-separated layer indices and a:b ranges "
     "(negative counts from the end)"),
    (["--device", "tpu9"], "error: --device 'tpu9': not a device (auto, cpu, cuda, cuda:N)"),
    (["--temperature", "0"],
     "error: --temperature 0.0: must be > 0 (at 0 the G completions of a prompt are one, "
                             "every advantage is 0 and nothing trains)"),
])
def test_bad_grpo_flags_are_one_line_before_any_work(tmp_path, flags, message, monkeypatch):
    from methods import grpo
    monkeypatch.setattr(grpo.VLM, "from_pretrained", lambda *a,
                        **kw: pytest.fail("a model was loaded first"))
    monkeypatch.setattr(grpo.synthetic, "make_once", lambda *a, **kw: pytest.fail("data was made first"))
    assert user_error(["--init", str(tmp_path), "--out", str(tmp_path / "g"), *flags], grpo.main) == message


def test_compare_under_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert user_error(["--compare", "--from-scratch", "--out", str(tmp_path), *TRAIN]) == \
        "error: --compare runs on one process: under torchrun, train each objective with --objective"
    assert user_error(["--out", str(tmp_path), *TRAIN]).startswith(
        "error: the base and its fine-tunes run on one process: under torchrun, train one stage with 'train'")


def test_unknown_objective_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        nanoattcot.main(["train", "--objective", "dpo"])
    assert e.value.code == 2 and "invalid choice: 'dpo'" in capsys.readouterr().err
    with pytest.raises(trainer.ConfigError, match="--objective 'dpo': must be one of sft, attcot, avar"):
        trainer.TrainConfig(objective="dpo")  # from Python too
    with pytest.raises(trainer.ConfigError,
                       match="--drift-mode 'sideways': must be one of absolute, gradnorm, "
                                                     "adaptive_cosine"):
        trainer.TrainConfig(drift_mode="sideways")


def test_fine_tuning_defaults(tmp_path):
    """--init without explicit rates: fine-tuning ones and a short warmup; from scratch: the fast ones."""
    ft, scratch = trainer.TrainConfig(init=str(tmp_path),
                                         max_steps=2000), trainer.TrainConfig(max_steps=2000)
    assert (ft.lr, ft.lr_vision, ft.lr_connector, ft.warmup) == (1e-5, 1e-5, 1e-4, 60)  # 3% of the steps
    assert (scratch.lr, scratch.lr_vision, scratch.lr_connector, scratch.warmup) == (3e-3, 3e-3, 3e-3, 30)
    assert trainer.TrainConfig(init=str(tmp_path), lr=2e-5, warmup=0).lr == 2e-5


def test_bad_checkpoint_folders_are_one_line(checkpoints, tmp_path):
    path, _ = checkpoints["idefics3_gqa_untied_s2"]
    d = tmp_path / "ckpt"
    shutil.copytree(path, d)
    import generate
    args = ["--model", str(d), "--prompt", "hi", "--device", "cpu"]
    (d / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:1000])
    assert user_error(args,
                      generate.main).startswith(f"error: {d / 'model.safetensors'}: not a readable "
                                                "safetensors file")
    shutil.copy(path / "model.safetensors", d / "model.safetensors")
    (d / "tokenizer.json").write_text("{}")
    assert user_error(args,
                      generate.main).startswith(f"error: {d / 'tokenizer.json'}: cannot read the tokenizer")
    assert user_error(["train", "--init", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *TRAIN]) == \
        f"error: --init '{tmp_path / 'none'}': must be an existing checkpoint folder"


def test_no_traceback_end_to_end(tmp_path):
    """The same through a real process: one line on stderr, exit status 1."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "nanoattcot.py"), "train", "--vis-target", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr == "error: --vis-target 0.0: must be in (0, 1] or none\n"
