"""The Att-CoT objective against materialised attention, and the training loop: loss falls, the loss
assembly by hand, gradient accumulation and 2-process DDP match one batch, the output loads in
transformers (resume: test_resume.py)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import objective
import train as trainer
from train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), n_train=64, n_eval=6, batch_size=8, max_steps=6, warmup=2,
                save_every=0, log_every=100, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("t"), max_steps=40, lr=3e-3)
    return cfg, trainer.train(cfg)


def test_loss_falls(trained):
    metrics = trained[1]["metrics"]
    assert len(metrics) == 40
    first, last = sum(m["ce"] for m in metrics[:5]) / 5, sum(m["ce"] for m in metrics[-5:]) / 5
    assert last < 0.6 * first
    assert all(k in metrics[-1] for k in ("vis", "ans", "vas"))


def test_progress_line_shows_every_term_and_mfu_given_a_peak(tmp_path, capsys):
    """The line shows the loss and every term of the logged row; on a GPU the peak comes from its
    name, --peak-tflops names it anywhere (here a CPU)."""
    row = trainer.train(config(tmp_path, max_steps=2, log_every=1, peak_tflops=1.0))["metrics"][-1]
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")][-1]
    assert f"step     2/2 loss {row['loss']:.4f} ce {row['ce']:.4f} " in last
    assert {"vis", "ans", "vas", "below", "below_vas"} <= set(row)
    assert all(f" {k} {row[k]:.3f} " in last for k in row if k not in ("step", "lr", "loss", "ce"))
    assert 0 < float(re.search(r"MFU ([\d.]+)%", last).group(1)) < 100
    trainer.train(config(tmp_path, objective="sft", max_steps=2, log_every=1, out=str(tmp_path / "cpu")))
    assert "MFU" not in capsys.readouterr().out


def test_loss_terms_match_materialised_attention(trained, monkeypatch):
    """L_vis and L_ans from the kernel path equal the same terms from transformers' eager attention
    probabilities (output_attentions=True) on the trained model's HF-format output."""
    from transformers import AutoModelForImageTextToText
    cfg, result = trained
    model, proc = result["model"], result["proc"]
    examples = data.encode_all(proc, result["train_records"][:4])
    batch = data.collate(examples, proc.pad_token_id)
    layers, n = [0, 2, 3], objective.step_counts([batch])
    hf = AutoModelForImageTextToText.from_pretrained(os.path.join(cfg.out, "model"),
                                                     attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(**{k: batch[k]
                    for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")},
                 output_attentions=True)
    A = torch.stack([out.attentions[l] for l in layers]).double().mean(0).mean(1)  # (B, T, T): layers, heads
    spans = batch["spans"]
    m_v = (A * (spans == data.V)[:, None, :]).sum(-1)
    m_rv = (A * ((spans == data.V) | (spans == data.R))[:, None, :]).sum(-1)
    in_r, in_a = spans == data.R, spans == data.A
    median = float(m_v[in_r].median())
    user = (spans == data.P) | (spans == data.V) | (spans == data.R)  # all but the scaffolding (and A)
    m_user = (A * user[:, None, :]).sum(-1)
    ans_floor = float(m_user[in_a].median())
    for ans_group, ans_target, m_ans in (("user+rationale", None, m_user),
                                         ("user+rationale", ans_floor, m_user),
                                         ("rationale+image", ans_floor, m_rv)):
        cfg = TrainConfig(objective="attcot", mass_impl="reference", ans_group=ans_group,
                          ans_target=ans_target)
        terms = {k: t.sum.detach() for k, t in objective.loss_terms(model, batch, cfg, layers).items()}
        want_ans = -torch.log(m_ans[in_a].clamp(max=ans_target or 1) + 1e-6).mean()
        assert abs(float(terms["ans"] / n["a_count"]) - want_ans) < 1e-4, (ans_group, ans_target)
    assert m_user[in_a].mean() > m_rv[in_a].mean() + 0.01  # the two groups differ here
    handed = []  # the fused route's bits, as the model gets them
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: handed.append(kw.get("mass_values") is not None)
                        or real_forward(*a, **kw))
    for floor, impl in ((None, "reference"), (median, "reference"), (None, "sdpa"), (median, "fused"),
                        (None, "auto")):
        # floor: half the steps above it
        cfg = TrainConfig(objective="attcot", mass_impl=impl, vis_target=floor, lambda_vis=0.3,
                          lambda_ans=0.2)
        table = objective.loss_terms(model, batch, cfg, layers)
        assert handed[-1] == (impl in ("fused", "auto"))  # auto is fused on the CPU
        terms = {k: t.sum.detach() for k, t in table.items()}
        want_vis = -torch.log(m_v[in_r].clamp(max=floor or 1) + 1e-6).mean()
        assert abs(float(terms["vis"] / n["r_count"]) - want_vis) < 1e-4
        assert abs(float(terms["vas"] / n["r_count"]) - m_v[in_r].mean()) < 1e-4
        assert abs(float(terms["ans"] / n["a_count"]) + torch.log(m_rv[in_a] + 1e-6).mean()) < 1e-4
        assert [(k, t.count, t.weight) for k, t in table.items()] == [
            ("ce", "n_label", 1.0), ("vis", "r_count", 0.3), ("ans", "a_count", 0.2), ("vas", "r_count", 0.0),
            *([("below", "r_count", 0.0), ("below_vas", "below", 0.0)] if floor is not None else [])]
        # the steps under the floor (the log's)
        surely, maybe = (m_v[in_r] < (floor or 1) + d for d in (-1e-5, 1e-5))
        if floor is not None:
            assert int(surely.sum()) <= int(terms["below"]) <= int(maybe.sum()) and int(surely.sum()) > 0
            low, high = float(m_v[in_r][surely].sum()), float(m_v[in_r][maybe].sum())
            assert low - 1e-3 < float(terms["below_vas"]) < high + 1e-3
    measured = objective.loss_terms(model, batch, TrainConfig(objective="sft", measure_vas=True,
                                                              mass_impl="reference"), layers)
    assert [(k, t.weight) for k, t in measured.items()][:4] == [("ce", 1.0), ("vis", 0.0), ("ans", 0.0),
                                                                 ("vas", 0.0)]  # sft logs them only
    assert abs(float(measured["vas"].sum / n["r_count"]) - m_v[in_r].mean()) < 1e-4
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1),
                                           batch["labels"][:, 1:].flatten())
    assert abs(float(terms["ce"] / n["n_label"]) - float(ce)) < 1e-4


def test_attention_profile_matches_materialised_attention(trained):
    """eval.attention_profile (kernel-op masses) against the same numbers from transformers' eager
    attention probabilities: image mass per layer and in 10 bins along the rationale, the answer's
    mass on the rationale and on the image."""
    from transformers import AutoModelForImageTextToText
    import eval as eval_mod
    cfg, result = trained
    model, proc, recs = result["model"], result["proc"], result["train_records"][:4]
    layers = [0, 2, 3]
    got = eval_mod.attention_profile(model, proc, recs, layers)
    batch = data.collate(data.encode_all(proc, recs), proc.pad_token_id)
    hf = AutoModelForImageTextToText.from_pretrained(os.path.join(cfg.out, "model"),
                                                     attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(**{k: batch[k]
                    for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")},
                 output_attentions=True)
    spans = batch["spans"]
    A = torch.stack([out.attentions[l] for l in layers]).double().mean(2)  # (L, B, T, T): mean over heads
    on = lambda span: (A * (spans == span)[None, :, None, :]).sum(-1)     # (L, B, T) mass on that span
    in_r, in_a = spans == data.R, spans == data.A
    want_layer = [float(on(data.V)[l][in_r].mean()) for l in range(len(layers))]
    step = (in_r.cumsum(1) - 1) / in_r.sum(1, keepdim=True)
    bins = (step * 10).long().clamp(max=9)[in_r]
    v_rows = on(data.V).mean(0)[in_r]
    want_along = [float(v_rows[bins == i].mean()) for i in range(10)]
    assert got["n"] == 4 and max(abs(x - y) for x, y in zip(got["image_mass_by_layer"], want_layer)) < 1e-4
    assert max(abs(x - y) for x, y in zip(got["image_mass_along_rationale"], want_along)) < 1e-4
    assert abs(got["answer_mass_on_rationale"] - float(on(data.R).mean(0)[in_a].mean())) < 1e-4
    assert abs(got["answer_mass_on_image"] - float(on(data.V).mean(0)[in_a].mean())) < 1e-4


def test_image_attention_and_heatmap_steps_match_materialised_attention(trained):
    """explorer.image_attention (each reply token's attention on each image token per layer, for the
    heatmaps and report.html) against transformers' eager attention; attention_steps splits the
    reply into its sentences and the answer, each step's weights the mean over its tokens."""
    from transformers import AutoModelForImageTextToText
    import eval as eval_mod
    from analysis import explorer
    cfg, result = trained
    model, proc, rec = result["model"], result["proc"], result["train_records"][0]
    layers = [1, 3]
    per_layer, ids = explorer.image_attention(model, proc, rec, layers)
    batch = data.collate(data.encode_all(proc, [rec]), proc.pad_token_id)
    hf = AutoModelForImageTextToText.from_pretrained(os.path.join(cfg.out, "model"),
                                                     attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(**{k: batch[k]
                    for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")},
                 output_attentions=True)
    spans = batch["spans"][0]
    for got, layer in zip(per_layer, layers):  # (T, T) per layer: mean over heads
        want = out.attentions[layer][0].mean(0)[spans >= data.R][:, spans == data.V]
        assert got.shape == want.shape == (int((spans >= data.R).sum()), 9)
        assert (got - want).abs().max() < 1e-5
    want = torch.stack([out.attentions[l][0]
                        for l in layers]).mean((0, 1))[spans >= data.R][:, spans == data.V]
    assert torch.equal(ids, batch["input_ids"][0][spans >= data.R])
    steps = eval_mod.attention_steps(model, proc, rec, layers)
    texts = [s["text"] for s in steps["steps"]]
    assert " ".join(texts) == rec["reply"] and texts[-1].startswith("Answer:")
    assert texts[0].startswith("Row 1:")
    assert len(steps["boxes"]) == 9
    assert steps["boxes"][4] == (32.0, 32.0, 64.0, 64.0)  # 3 x 3 cells of a 96 px image
    answer_rows = spans[spans >= data.R] == data.A
    assert abs(steps["steps"][-1]["image_mass"] - float(want[answer_rows].sum(1).mean())) < 1e-5


def test_eval_command_compares_two_checkpoints(trained, tmp_path, capsys):
    """python eval.py --model A --model B: one table with a column per model, the report and its
    pictures (a heatmap per item with one row per model), and the progress lines."""
    import eval as eval_mod
    from PIL import Image
    cfg, _ = trained
    model_dir, data_dir = os.path.join(cfg.out, "model"), os.path.join(cfg.out, "data")
    eval_mod.main(["--model", model_dir, "--model", model_dir, "--data",
                   os.path.join(data_dir, "eval.jsonl"),
                   "--train-data", os.path.join(data_dir, "train.jsonl"), "--limit", "4",
                   "--max-new-tokens", "12",
                   "--out", str(tmp_path / "rep"), "--device", "cpu", "--visual-attn-scale", "2"])
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["run", "run", "img", "x2", "run-2", "run-2", "img", "x2"]
    assert "accuracy_direct_ci95" in out
    assert "cot: 4/4 items" in err and "ETA" in err
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"- models: run = {model_dir}, run-2 = {model_dir}\n" in md  # a folder per model, not per row
    assert all(f"({f})" in md for f in ("accuracy.png", "image_mass_by_layer.png", "attention_1.png"))
    # early commitment is drawn when some model's replies end in an answer it can force (this
    # 40-step model's run on without one; test_eval draws it from a given result)
    results = json.loads((tmp_path / "rep" / "report.json").read_text())["results"]
    assert ("(early_commitment.png)" in md) == any(r["early_commitment"]["n"] for r in results.values())
    assert Image.open(tmp_path / "rep" / "attention_1.png").height > 2 * 160  # a row per model
    # --layers and --visual-attn-layers reach the measures: the masses of layers 1 and 2 only, the
    # boost in layer 3 alone (so it leaves the gold replies' masses in layers 1 and 2 as they were)
    eval_mod.main(["--model", model_dir, "--data", os.path.join(data_dir, "eval.jsonl"), "--limit", "4",
                   "--max-new-tokens", "12", "--out", str(tmp_path / "rep2"), "--device", "cpu",
                   "--layers", "1:3", "--visual-attn-scale", "4", "--visual-attn-layers", "-1",
                   "--explore", "1"])
    results = json.load(open(tmp_path / "rep2" / "report.json"))["results"]
    plain = results["run"]["where_it_looks"]["gold"]
    boosted = results["run img x4"]["where_it_looks"]["gold"]
    assert plain["layers"] == [1, 2] and results["run"]["explore"][0]["layers"] == [1, 2]
    assert plain["image_mass_by_layer"] == pytest.approx(boosted["image_mass_by_layer"], abs=1e-6)
    with pytest.raises(SystemExit, match="error: .*nowhere.jsonl"):
        eval_mod.main(["--model", model_dir, "--data", str(tmp_path / "nowhere.jsonl")])


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(trained, impl):
    """Recomputing every vision and decoder block in the backward changes no number: the Att-CoT loss
    (masses from the q, k the blocks return, or from their attention with the fused route) and every
    gradient."""
    cfg, result = trained
    model, proc = result["model"], result["proc"]
    batch = data.collate(data.encode_all(proc, result["train_records"][:4]), proc.pad_token_id)
    attcot = TrainConfig(objective="attcot", mass_impl=impl)
    counts = objective.step_counts([batch])
    runs, kept = [], []
    for on in (False, True):
        model.checkpoint_activations(on).train().zero_grad()
        saved = []  # bytes autograd keeps for the backward outside the recomputed blocks
        keep = lambda x: saved.append(x.numel() * x.element_size()) or x
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
            loss = objective.total_loss(objective.loss_terms(model, batch, attcot, [0, 3]), counts)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        kept.append(sum(saved))
    model.checkpoint_activations(False).zero_grad()
    (loss_off, grads_off), (loss_on, grads_on) = runs
    assert kept[1] < 0.5 * kept[0], kept  # the blocks' activations are really not kept
    assert torch.equal(loss_off, loss_on)
    assert all(torch.allclose(grads_off[n], grads_on[n], rtol=1e-5, atol=1e-7) for n in grads_off)
    # the vision tower was recomputed and trained
    assert grads_on["vision.layers.0.fc1.weight"].abs().sum() > 0


def test_compiled_training_step_through_the_mass_op_on_a_gqa_model():
    """torch.compile traces the mass op with its fakes, forward and backward: on a model with several
    key/value heads (k a transposed view) the compiled Att-CoT step gives the eager loss and gradients.
    aot_eager runs the same fake tracing as inductor without its code generation (and its cache,
    which is not keyed on the fakes)."""
    from model import VLM, TextConfig, VisionConfig, VLMConfig
    torch.manual_seed(0)
    model = VLM(VLMConfig(VisionConfig(32, 64, 1, 2, 8, 32), TextConfig(50, 48, 96, 2, 6, 3, 8), 2, 49))
    P, V, R, A = data.P, data.V, data.R, data.A
    spans = torch.tensor([[P] + [V] * 4 + [P, P] + [R] * 5 + [A, A],
                          [P] + [V] * 4 + [P] + [R] * 3 + [A] + [0] * 4])
    ids = torch.randint(0, 49, spans.shape).masked_fill(spans == V, 49)
    batch = {"input_ids": ids, "attention_mask": (spans > 0).long(), "spans": spans,
             "labels": torch.where(spans >= R, ids, -100), "pixel_values": torch.randn(2, 1, 3, 32, 32),
             "pixel_attention_mask": torch.ones(2, 1, 32, 32, dtype=torch.long)}
    cfg, counts = TrainConfig(objective="attcot", mass_impl="reference"), objective.step_counts([batch])
    runs = []
    for net in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad()
        loss = objective.total_loss(objective.loss_terms(net, batch, cfg, [0, 1]), counts)
        loss.backward()
        runs.append((loss.detach(), model.layers[0].self_attn.k_proj.weight.grad.clone()))
    (eager, g_eager), (compiled, g_compiled) = runs
    assert torch.allclose(eager, compiled) and torch.allclose(g_eager, g_compiled, atol=1e-7)
    assert g_eager.abs().max() > 0


def test_hf_format_output_loads_in_transformers(trained):
    from transformers import AutoModelForImageTextToText
    from model import VLM
    cfg, result = trained
    path = os.path.join(cfg.out, "model")
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    ours = VLM.from_pretrained(path).eval()
    proc = data.Processor.from_pretrained(path)
    examples = data.encode_all(proc, result["train_records"][:2])
    b = data.collate(examples, proc.pad_token_id)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    with torch.no_grad():
        assert (hf(**inputs).logits - ours(**inputs).logits).abs()[b["attention_mask"].bool()].max() < 1e-4
    assert os.path.exists(os.path.join(cfg.out, "curves.png"))
    assert os.path.exists(os.path.join(cfg.out, "metrics.jsonl"))
    from transformers import AutoProcessor  # the saved processor files load in transformers too
    hf_proc = AutoProcessor.from_pretrained(path)
    rec = result["train_records"][0]
    text = proc.apply_chat_template([{"role": "user",
                                      "content": [{"type": "image"},
                                                  {"type": "text", "text": rec["question"]}]}])
    images = [[data.load_image(rec["images"][0])]]
    want, got = hf_proc(text=[text], images=images, return_tensors="pt"), proc([text], images)
    assert torch.equal(want["input_ids"], got["input_ids"])
    assert (want["pixel_values"] - got["pixel_values"]).abs().max() <= 1e-6


def test_total_loss_by_hand():
    """Each weighted term's sum times its weight over its count; a weight 0 term is logged only."""
    T = objective.Term
    terms = {"ce": T(torch.tensor(6.0), "n_label", 1.0), "vis": T(torch.tensor(3.0), "r_count", 0.1),
             "ans": T(torch.tensor(2.0), "a_count", 0.3), "vas": T(torch.tensor(9.0), "r_count", 0.0)}
    counts = {"n_label": torch.tensor(4.0), "r_count": torch.tensor(2.0), "a_count": torch.tensor(1.0)}
    assert float(objective.total_loss(terms, counts)) == pytest.approx(6 / 4 + 0.1 * 3 / 2 + 0.3 * 2 / 1)
    assert float(objective.total_loss({"ce": terms["ce"]}, counts)) == pytest.approx(6 / 4)


GRAD_DUMP = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import answers
import checkpoint
import nanoattcot
dump, real = sys.argv[2], torch.nn.utils.clip_grad_norm_

def clip(params, *args):  # the first step's gradients as the optimizer gets them (summed, before clipping)
    params = list(params)
    if not os.path.exists(dump) and os.environ.get("RANK", "0") == "0":
        torch.save([p.grad.clone() for p in params], dump)
    return real(params, *args)
torch.nn.utils.clip_grad_norm_ = clip
nanoattcot.main(sys.argv[3:])
"""


def run_dumping_grads(tmp_path, name, flags, launcher=()):
    """Trains through the command line and returns (metrics rows, first-step gradients)."""
    script = tmp_path / "grad_dump.py"
    script.write_text(GRAD_DUMP)
    run = subprocess.run([sys.executable, *launcher, str(script), ROOT, str(tmp_path / f"{name}.pt"),
                          "train",
                          "--out", str(tmp_path / name), *flags], capture_output=True, text=True,
                          timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(l)
            for l in open(tmp_path / name / "metrics.jsonl")], torch.load(tmp_path / f"{name}.pt")


def assert_same_training(a, b):
    (rows_a, grads_a), (rows_b, grads_b) = a, b
    assert len(rows_a) == len(rows_b) == 3
    for x, y in zip(rows_a, rows_b):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)
    assert all((ga - gb).norm() <= 1e-5 * ga.norm() + 1e-9 for ga, gb in zip(grads_a, grads_b))


COMMON = ["--n-train", "64", "--n-eval", "4", "--max-steps", "3", "--warmup", "1", "--save-every", "0",
          "--eval-limit", "2", "--device", "cpu"]


def test_grad_accum_equals_one_batch_twice_the_size(tmp_path):
    """Two micro-batches of 8 give the gradient of one batch of 16 (each loss term is divided by its
    count over the whole step, not per micro-batch)."""
    one = run_dumping_grads(tmp_path, "one", ["--batch-size", "16", *COMMON])
    accum = run_dumping_grads(tmp_path, "accum", ["--batch-size", "8", "--grad-accum", "2", *COMMON])
    assert_same_training(one, accum)


def test_two_process_ddp_with_grad_accum_matches_one_process(tmp_path):
    """2 gloo processes x 2 micro-batches of 2 (the no_sync path) against one process with batch 8:
    the same losses and the same summed gradients."""
    flags = [*COMMON, "--vis-target", "none"]
    one = run_dumping_grads(tmp_path, "one", ["--batch-size", "8", *flags])
    two = run_dumping_grads(tmp_path, "two", ["--batch-size", "2", "--grad-accum", "2", *flags],
                            launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2",
                                      "--master_port", "29533"))
    assert_same_training(one, two)
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    assert summary["objective"] == "attcot" and summary["config"]["vis_target"] is None


def test_nonfinite_loss_stops_or_is_skipped(tmp_path, monkeypatch):
    real = objective.loss_terms
    calls = {"n": 0}

    def poisoned(*args):
        terms = real(*args)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["ce"] = terms["ce"]._replace(sum=terms["ce"].sum * float("nan"))
        return terms
    monkeypatch.setattr(objective, "loss_terms", poisoned)
    with pytest.raises(FloatingPointError, match="step 2: loss is nan"):
        trainer.train(config(tmp_path / "a", max_steps=4))
    calls["n"] = 0
    result = trainer.train(config(tmp_path / "b", max_steps=4, skip_nonfinite=True))
    assert result["nonfinite_skipped"] == 1 and len(result["metrics"]) == 3




@pytest.mark.parametrize("spec,want", [("all", [0, 1, 2, 3]), ("1,-1", [1, 3]), ("2:", [2, 3])])
def test_the_objective_reads_the_layers_the_flag_names(tmp_path, monkeypatch, spec, want):
    seen, real = [], objective.loss_terms
    monkeypatch.setattr(objective, "loss_terms", lambda model, batch, cfg, layers: seen.append(layers)
                        or real(model, batch, cfg, layers))
    result = trainer.train(config(tmp_path, max_steps=1, layers=spec))
    assert seen == [want] and result["layers"] == want


def test_metrics_row_means_over_the_global_batch():
    """Hand sums: ce over labels, vis / ans / vas over their rows, below over rationale rows, below_vas
    over the rows below the floor; two ranks' counts are the step's."""
    T = objective.Term
    table = {"ce": T(None, "n_label", 1.0), "vis": T(None, "r_count", 0.5), "ans": T(None, "a_count", 0.25),
             "vas": T(None, "r_count", 0.0), "below": T(None, "r_count", 0.0),
             "below_vas": T(None, "below", 0.0)}
    summed = {"ce": 12.0, "vis": 6.0, "ans": 3.0, "vas": 4.0, "below": 5.0, "below_vas": 1.0}
    counts = {"n_label": torch.tensor(6.0), "r_count": torch.tensor(10.0), "a_count": torch.tensor(2.0)}
    row = trainer.metrics_row(summed, table, counts, 1, 6, 0.001)
    assert row == {"step": 7, "ce": 2.0, "lr": 0.001, "vis": 0.6, "ans": 1.5, "vas": 0.4, "below": 0.5,
                   "below_vas": 0.2, "loss": pytest.approx(2.0 + 0.5 * 0.6 + 0.25 * 1.5)}
    assert list(row) == ["step", "ce", "lr", "vis", "ans", "vas", "below", "below_vas", "loss"]
    table.update(commit=T(None, "commit_count", 2.0), commit_p=T(None, "commit_count", 0.0))
    row = trainer.metrics_row({**summed, "commit": 0.8, "commit_p": 1.2}, table,
                              {**counts, "commit_count": torch.tensor(4.0)}, 1, 6, 0.001)
    assert row["commit"] == pytest.approx(0.2) and row["commit_p"] == pytest.approx(0.3)
    assert row["loss"] == pytest.approx(2.0 + 0.5 * 0.6 + 0.25 * 1.5 + 2.0 * 0.2)


def test_family_flag_trains_on_its_own_set(tmp_path):
    """--family wording makes its set in its own folder (a grid set in the same --out is never
    read for it) and trains on its questions."""
    result = trainer.train(config(tmp_path, family="wording", objective="sft", max_steps=1, n_train=30,
                                     n_eval=3))
    assert os.path.exists(os.path.join(tmp_path, "run", "data_wording", "train.jsonl"))
    assert not os.path.exists(os.path.join(tmp_path, "run", "data"))
    assert {r["type"] for r in result["train_records"]} == {"is_cell", "which_more", "exists"}
    with pytest.raises(trainer.ConfigError, match="family"):
        TrainConfig(family="words")
