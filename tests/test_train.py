"""The Att-CoT objective against materialised attention, and the training loop: loss falls, resume
matches an uninterrupted run, 2-process DDP matches one process, the output loads in transformers."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import nanoattcot
from nanoattcot import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), n_train=64, n_eval=6, batch_size=8, max_steps=6, warmup=2,
                save_every=0, log_every=100)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("t"), max_steps=40, lr=3e-3)
    return cfg, nanoattcot.train(cfg)


def test_loss_falls(trained):
    metrics = trained[1]["metrics"]
    assert len(metrics) == 40
    first, last = sum(m["ce"] for m in metrics[:5]) / 5, sum(m["ce"] for m in metrics[-5:]) / 5
    assert last < 0.6 * first
    assert all(k in metrics[-1] for k in ("vis", "ans", "vas"))


def test_progress_line_shows_mfu_given_a_peak(tmp_path, capsys):
    """On a GPU the peak comes from its name; --peak-tflops names it anywhere (here a CPU)."""
    nanoattcot.train(config(tmp_path, objective="sft", max_steps=2, log_every=1, peak_tflops=1.0))
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")][-1]
    assert 0 < float(re.search(r"MFU ([\d.]+)%", last).group(1)) < 100
    nanoattcot.train(config(tmp_path, objective="sft", max_steps=2, log_every=1, out=str(tmp_path / "cpu")))
    assert "MFU" not in capsys.readouterr().out


def test_loss_terms_match_materialised_attention(trained):
    """L_vis and L_ans from the kernel path equal the same terms from transformers' eager attention
    probabilities (output_attentions=True) on the trained model's HF-format output."""
    from transformers import AutoModelForImageTextToText
    cfg, result = trained
    model, proc = result["model"], result["proc"]
    examples, _ = data.encode_all(proc, result["train_records"][:4])
    batch = data.collate(examples, proc.pad_token_id)
    layers = [0, 2, 3]
    hf = AutoModelForImageTextToText.from_pretrained(os.path.join(cfg.out, "model"), attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")},
                 output_attentions=True)
    A = torch.stack([out.attentions[l] for l in layers]).double().mean(0).mean(1)  # (B, T, T): layers, heads
    spans = batch["spans"]
    m_v = (A * (spans == data.V)[:, None, :]).sum(-1)
    m_rv = (A * ((spans == data.V) | (spans == data.R))[:, None, :]).sum(-1)
    in_r, in_a = spans == data.R, spans == data.A
    for floor in (None, float(m_v[in_r].median())):  # no floor, and one that half the steps are above
        cfg = TrainConfig(objective="attcot", mass_impl="reference", vis_target=floor)
        terms = {k: v.detach() for k, v in nanoattcot.loss_terms(model, batch, cfg, layers).items()}
        want_vis = -torch.log(m_v[in_r].clamp(max=floor or 1) + 1e-6).mean()
        assert abs(float(terms["vis_sum"] / terms["r_count"]) - want_vis) < 1e-4
        assert abs(float(terms["vas_sum"] / terms["r_count"]) - m_v[in_r].mean()) < 1e-4
        assert abs(float(terms["ans_sum"] / terms["a_count"]) + torch.log(m_rv[in_a] + 1e-6).mean()) < 1e-4
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert abs(float(terms["ce_sum"] / terms["n_label"]) - float(ce)) < 1e-4


def test_hf_format_output_loads_in_transformers(trained):
    from transformers import AutoModelForImageTextToText
    from model import VLM
    cfg, result = trained
    path = os.path.join(cfg.out, "model")
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    ours = VLM.from_pretrained(path).eval()
    proc = data.Processor.from_pretrained(path)
    examples, _ = data.encode_all(proc, result["train_records"][:2])
    b = data.collate(examples, proc.pad_token_id)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    with torch.no_grad():
        assert (hf(**inputs).logits - ours(**inputs).logits).abs()[b["attention_mask"].bool()].max() < 1e-4
    assert os.path.exists(os.path.join(cfg.out, "curves.png")) and os.path.exists(os.path.join(cfg.out, "metrics.jsonl"))
    from transformers import AutoProcessor  # the saved processor files load in transformers too
    hf_proc = AutoProcessor.from_pretrained(path)
    rec = result["train_records"][0]
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rec["question"]}]}])
    images = [[data.load_image(rec["images"][0])]]
    want, got = hf_proc(text=[text], images=images, return_tensors="pt"), proc([text], images)
    assert torch.equal(want["input_ids"], got["input_ids"])
    assert (want["pixel_values"] - got["pixel_values"]).abs().max() <= 1e-6


def test_ctrl_c_saves_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    straight = nanoattcot.train(config(tmp_path / "a", max_steps=8))["metrics"]
    real, calls = nanoattcot.loss_terms, {"n": 0}

    def interrupted(*args):  # Ctrl-C during step 5
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(nanoattcot, "loss_terms", interrupted)
    with pytest.raises(SystemExit):
        nanoattcot.train(config(tmp_path / "b", max_steps=8))
    monkeypatch.setattr(nanoattcot, "loss_terms", real)
    resumed = nanoattcot.train(config(tmp_path / "b", max_steps=8, resume=True))["metrics"]
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)


def test_nonfinite_loss_stops_or_is_skipped(tmp_path, monkeypatch):
    real = nanoattcot.loss_terms
    calls = {"n": 0}

    def poisoned(*args):
        terms = real(*args)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["ce_sum"] = terms["ce_sum"] * float("nan")
        return terms
    monkeypatch.setattr(nanoattcot, "loss_terms", poisoned)
    with pytest.raises(FloatingPointError, match="step 2: loss is nan"):
        nanoattcot.train(config(tmp_path / "a", max_steps=4))
    calls["n"] = 0
    result = nanoattcot.train(config(tmp_path / "b", max_steps=4, skip_nonfinite=True))
    assert result["nonfinite_skipped"] == 1 and len(result["metrics"]) == 3


def test_two_process_ddp_matches_one_process(tmp_path):
    common = ["--n-train", "64", "--n-eval", "4", "--max-steps", "3", "--warmup", "1", "--save-every", "0",
              "--eval-limit", "2", "--vis-target", "none"]
    one = subprocess.run([sys.executable, os.path.join(ROOT, "nanoattcot.py"), "train", "--out", str(tmp_path / "one"),
                          "--batch-size", "8", *common], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          os.path.join(ROOT, "nanoattcot.py"), "train", "--out", str(tmp_path / "two"),
                          "--batch-size", "4", *common], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    read = lambda p: [json.loads(l) for l in open(p / "metrics.jsonl")]
    a, b = read(tmp_path / "one"), read(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    assert summary["objective"] == "attcot" and summary["config"]["vis_target"] is None
