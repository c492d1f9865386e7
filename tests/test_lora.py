"""LoRA adapters (lora.py) against PEFT, the oracle: what we save PEFT loads onto transformers' model with
the same logits, what PEFT saves loads here with the same logits, the merged model loads in
transformers; and the Att-CoT gradient reaches the adapters, checked by finite differences."""
import copy
import json
import os

import pytest
import torch

import data
import lora
import masses
import train as trainer
from model import VLM, CheckpointError
from test_model import batch

NAME = "idefics3_gqa_untied_s2"


def random_adapters(model, seed=0):  # B starts at zero: give it values, so the adapters change logits
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.adapted(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def hf_logits(model, b):
    with torch.no_grad():
        return model(**b).logits


def test_our_adapter_loads_in_peft_with_our_logits(checkpoints, tmp_path):
    from peft import PeftModel
    path, hf = checkpoints[NAME]
    ours = VLM.from_pretrained(path).eval()
    lora.add_lora(ours, r=4, alpha=8)
    random_adapters(ours)
    lora.save_adapter(ours, tmp_path / "adapter", base=str(path))
    b = batch(path)
    got = hf_logits(ours, b)
    base = hf_logits(hf, b)
    peft = PeftModel.from_pretrained(type(hf).from_pretrained(path), tmp_path / "adapter").eval()
    want = hf_logits(peft, b)
    mask = b["attention_mask"].bool()
    assert (got - base).abs()[mask].max() > 1e-2  # the adapters do something
    assert (got - want).abs()[mask].max() <= 1e-5
    adapted = {n for n, m in peft.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")}
    assert adapted and all("text_model" in n for n in adapted)  # the decoder's, not the tower's


def test_peft_adapter_loads_here_with_its_logits_and_merges(checkpoints, tmp_path):
    """An adapter PEFT made (its own names, dropout, targets on the tower too) loads here; merged, it
    saves as a plain checkpoint that transformers reads with the same logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText
    path, hf = checkpoints[NAME]
    peft = get_peft_model(type(hf).from_pretrained(path), LoraConfig(
        r=2, lora_alpha=5, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj", "fc1"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    peft.save_pretrained(tmp_path / "peft")
    peft.eval()
    b = batch(path)
    want = hf_logits(peft, b)
    ours = VLM.from_pretrained(path).eval()
    paths = lora.load_adapter(ours, tmp_path / "peft")
    assert any(p.startswith("vision.") for p in paths) and any(p.endswith("down_proj") for p in paths)
    mask = b["attention_mask"].bool()
    assert (hf_logits(ours, b) - want).abs()[mask].max() <= 1e-5
    lora.merge(ours).save_pretrained(tmp_path / "merged")
    assert not lora.adapted(ours)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert (hf_logits(merged, b) - want).abs()[mask].max() <= 1e-4


def test_bad_adapters_are_named(checkpoints, tmp_path):
    path, _ = checkpoints[NAME]
    ours = VLM.from_pretrained(path)
    lora.add_lora(ours, r=4, alpha=8)
    lora.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora True"):
        lora.load_adapter(VLM.from_pretrained(path), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(CheckpointError, match=r"lora_A of layers.0.self_attn.q_proj is \(4, 48\)"):
        lora.load_adapter(VLM.from_pretrained(path), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        lora.load_adapter(VLM.from_pretrained(path), tmp_path)


def test_only_the_adapters_train_and_the_attcot_gradient_reaches_them(checkpoints):
    """With adapters on, nothing else takes a gradient. L_vis (the rationale rows' -log image mass, as
    objective.py computes it) reaches the adapters of q and k through the masses: each adapter's
    gradient is the chain rule's through the merged weight W + s B A (dL/dB = s G A^T, dL/dA = s B^T G,
    G the merged model's weight gradient, exact), and agrees with a central finite difference (the
    model normalises in fp32, as transformers does, so the difference is taken at 1e-3, to 1%)."""
    path, _ = checkpoints[NAME]
    model = VLM.from_pretrained(path, dtype=torch.float64).eval()
    lora.add_lora(model, r=2, alpha=4, targets=("q_proj", "k_proj"))
    random_adapters(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"layers.{i}.self_attn.{t}.lora_{ab}" for i in range(3) for t in ("q_proj", "k_proj") for ab in "AB"}
    P, V, R, A = data.P, data.V, data.R, data.A
    spans = torch.tensor([[P] + [V] * 4 + [P, P] + [R] * 5 + [A, A]])
    torch.manual_seed(0)
    ids = torch.randint(0, 40, spans.shape).masked_fill(spans == V, model.config.image_token_id)
    pixels = torch.randn(1, 1, 3, 32, 32, dtype=torch.float64)
    rows, q_pos, row_span = masses.query_rows(spans)
    hook = masses.mass_fn(rows, q_pos, masses.key_groups(spans, ("image",)), 1, impl="reference")

    def l_vis(net):
        out = net(ids, pixels, torch.ones(1, 1, 32, 32, dtype=torch.long), torch.ones_like(ids),
                  mass_layers=(1, 2), mass_fn=hook)
        m = torch.stack([out.masses[1], out.masses[2]]).mean((0, 2))[0, :, 0]  # (Nq,) over layers, heads
        return -torch.log(m[row_span[0] == R]).mean()
    l_vis(model).backward()
    merged = lora.merge(copy.deepcopy(model))
    merged.requires_grad_(True)
    l_vis(merged).backward()
    for path in ("layers.1.self_attn.q_proj", "layers.2.self_attn.k_proj"):
        m, g = model.get_submodule(path), merged.get_submodule(path).weight.grad
        assert m.lora_B.grad.abs().max() > 1e-6
        assert torch.allclose(m.lora_B.grad, m.scaling * g @ m.lora_A.T, rtol=1e-8, atol=1e-14)
        assert torch.allclose(m.lora_A.grad, m.scaling * m.lora_B.T @ g, rtol=1e-8, atol=1e-14)
        for ab in (m.lora_A, m.lora_B):
            grad, eps = ab.grad[1, 0].item(), 1e-3
            with torch.no_grad():
                ab[1, 0] += eps
                up = l_vis(model).item()
                ab[1, 0] -= 2 * eps
                down = l_vis(model).item()
                ab[1, 0] += eps
            assert grad == pytest.approx((up - down) / (2 * eps), rel=1e-2)


def test_a_lora_run_saves_a_peft_adapter_resumes_and_merges(tmp_path, monkeypatch, capsys):
    """nanoattcot.py train --init M --lora 4: only the adapters change; OUT/adapter is a PEFT folder and
    OUT/model is not written; Ctrl-C and --resume end on the adapter an unbroken run gives, bit for bit;
    --merge writes OUT/model, which transformers reads with the logits of M plus the adapter; eval.py
    and generate.py take --adapter."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    import eval as eval_mod
    import generate
    from test_resume import count_steps
    from test_train import config
    trainer.train(config(tmp_path, max_steps=2, out=str(tmp_path / "s")))  # a small model to start from
    init = str(tmp_path / "s" / "model")
    run = lambda out, **kw: trainer.train(config(tmp_path, out=str(tmp_path / out), init=init, lora=4,
                                                    max_steps=6, lr=1e-2, save_every=3, **kw))
    straight = run("a")["model"]
    adapter = tmp_path / "a" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    assert not os.path.exists(tmp_path / "a" / "model")
    start = VLM.from_pretrained(init).state_dict()
    trained = {k: v for k, v in straight.state_dict().items() if ".lora_" not in k}
    assert trained.keys() == start.keys() and all(torch.equal(trained[k], start[k]) for k in start)
    assert all(m.lora_B.abs().max() > 0 for m in lora.adapted(straight).values())
    count_steps(monkeypatch, fail_at=5, error=KeyboardInterrupt)
    with pytest.raises(SystemExit, match="130"):
        run("b")
    count_steps(monkeypatch)
    run("b", resume=True)
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run("c", merge=True)
    proc = data.Processor.from_pretrained(init)
    b = proc([data.chat_prompt(proc, "How many circles are there?", n_images=0)], None)
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "c" / "model").eval()
    ours = lora.load(init, tmp_path / "c" / "adapter").eval()
    with torch.no_grad():
        assert (hf(**b).logits - ours(**b).logits).abs().max() <= 1e-4
    records = os.path.join(tmp_path, "s", "data")  # the synthetic set the runs made
    eval_file = next(os.path.join(d, f) for d, _, fs in os.walk(records) for f in fs if f == "eval.jsonl")
    replies = []
    for i, flags in enumerate((["--model", init, "--adapter", str(tmp_path / "c" / "adapter")],
                               ["--model", str(tmp_path / "c" / "model")])):
        eval_mod.main([*flags, "--data", eval_file, "--limit", "2", "--max-new-tokens", "8",
                       "--out", str(tmp_path / f"rep{i}"), "--device", "cpu"])
        result = next(iter(json.load(open(tmp_path / f"rep{i}" / "report.json"))["results"].values()))
        replies.append([e["output"] for e in result["examples"]])
    assert replies[0] == replies[1] and replies[0]  # the adapter read by eval.py is the merged model
    capsys.readouterr()
    said = []
    for flags in (["--model", init, "--adapter", str(tmp_path / "c" / "adapter")],
                  ["--model", str(tmp_path / "c" / "model")]):
        generate.main([*flags, "--prompt", "How many circles are there?", "--max-new-tokens", "6",
                       "--device", "cpu"])
        said.append(capsys.readouterr().out)
    assert said[0] == said[1] and said[0].strip()


def readme_commands():
    """The commands of the README's fine-tuning section (the block after its marker), python ones."""
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = text.split("<!-- the commands below are run by tests/test_lora.py")[1].split("```")[1]
    return [line for line in block.splitlines() if line.startswith("python ")]


def test_the_readmes_fine_tuning_commands_run(checkpoints, tmp_path):
    """Each python command of the README's fine-tuning section, as written, in a folder where a tiny
    random checkpoint stands in for the download and the synthetic set for the user's records (train
    with --max-steps 2, eval and generate on a few items appended); then the LoRA run's adapter loads in
    PEFT with the logits of our model and adapter, and the merged and full models in transformers."""
    import shlex
    import subprocess
    import sys
    from PIL import Image
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    from setting import synthetic
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path, _ = checkpoints["smolvlm_gqa_untied_s2"]
    os.symlink(path, tmp_path / "SmolVLM-256M-Instruct")
    synthetic.make_synthetic(str(tmp_path), 16, 4, seed=0)  # train.jsonl, eval.jsonl, images/
    Image.new("RGB", (64, 48), (200, 40, 40)).save(tmp_path / "photo.jpg")
    extra = {"nanoattcot.py": ["--max-steps", "2", "--device", "cpu"],
             "eval.py": ["--limit", "2", "--max-new-tokens", "6", "--device", "cpu"],
             "generate.py": ["--max-new-tokens", "4", "--device", "cpu"]}
    commands = readme_commands()
    assert len(commands) == 6 and sum("--lora" in c for c in commands) == 2
    for line in commands:
        _, script, *args = shlex.split(line)
        run = subprocess.run([sys.executable, os.path.join(root, script), *args, *extra[script]],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{line}\n{run.stderr[-2000:]}"
    proc = data.Processor.from_pretrained(path)
    b = proc([data.chat_prompt(proc, "How many?", n_images=1)], [[str(tmp_path / "photo.jpg")]])
    hf = lambda folder: AutoModelForImageTextToText.from_pretrained(folder).eval()
    peft = PeftModel.from_pretrained(hf(path), tmp_path / "out" / "lora" / "adapter").eval()
    ours = lora.load(path, tmp_path / "out" / "lora" / "adapter").eval()
    with torch.no_grad():
        assert (peft(**b).logits - ours(**b).logits).abs().max() <= 1e-5
        for run in ("merged", "full"):
            want = VLM.from_pretrained(tmp_path / "out" / run / "model").eval()(**b).logits
            assert (hf(tmp_path / "out" / run / "model")(**b).logits - want).abs().max() <= 1e-4
    assert (tmp_path / "out" / "lora" / "eval" / "report.md").exists()


def test_the_adapters_settings_round_trip(checkpoints, tmp_path):
    """r, alpha and dropout as saved are what loading (and so --resume) rebuilds."""
    path, _ = checkpoints[NAME]
    model = VLM.from_pretrained(path)
    lora.add_lora(model, r=3, alpha=7, dropout=0.25, targets=("v_proj", "up_proj"))
    lora.save_adapter(model, tmp_path / "a")
    again = VLM.from_pretrained(path)
    lora.load_adapter(again, tmp_path / "a", trainable=True)
    got = {p: (m.r, m.alpha, m.dropout.p) for p, m in lora.adapted(again).items()}
    assert got == {p: (3, 7, 0.25) for p in lora.adapted(model)} and len(got) == 6
