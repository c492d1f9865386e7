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
    run = subprocess.run([sys.executable, os.path.join(ROOT, "nanoattcot.py"), "generate", "--model", str(path),
                          "--image", str(tmp_path / "photo.png"), "--prompt", "How many circles?",
                          "--max-new-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    proc = data.Processor.from_pretrained(path)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": "How many circles?"}]}])
    b = proc(text, [[str(tmp_path / "photo.png")]])
    want = hf.generate(**b, max_new_tokens=6, do_sample=False, eos_token_id=proc.eos_token_id)
    answer = proc.decode(want[0, b["input_ids"].shape[1]:])
    assert answer and run.stdout.rstrip("\n") == answer
    assert "tokens in" in run.stderr


def test_generate_names_a_missing_model(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "nanoattcot.py"), "generate", "--model",
                          str(tmp_path / "nope"), "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "nope/config.json: not found" in run.stderr
