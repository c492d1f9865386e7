"""The Att-CoT objective against materialised attention, and the training loop: loss falls, the loss
assembly by hand, resume (after Ctrl-C, a crash, or a SIGKILL inside a checkpoint save) ends bit for
bit where an uninterrupted run does, gradient accumulation and 2-process DDP match one batch, the
output loads in transformers."""
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import answers
import checkpoint
import data
import model as model_mod
import nanoattcot
import objective
from nanoattcot import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), n_train=64, n_eval=6, batch_size=8, max_steps=6, warmup=2,
                save_every=0, log_every=100, device="cpu")
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
    examples = data.encode_all(proc, result["train_records"][:4])
    batch = data.collate(examples, proc.pad_token_id)
    layers = [0, 2, 3]
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
        terms = {k: v.detach() for k, v in objective.loss_terms(model, batch, cfg, layers).items()}
        want_ans = -torch.log(m_ans[in_a].clamp(max=ans_target or 1) + 1e-6).mean()
        assert abs(float(terms["ans_sum"] / terms["a_count"]) - want_ans) < 1e-4, (ans_group, ans_target)
    assert m_user[in_a].mean() > m_rv[in_a].mean() + 0.01  # the two groups differ here
    for floor, impl in ((None, "reference"), (median, "reference"), (None, "sdpa"), (median, "fused"),
                        (None, "auto")):
        # floor: half the steps above it
        cfg = TrainConfig(objective="attcot", mass_impl=impl, vis_target=floor)
        terms = {k: v.detach() for k, v in objective.loss_terms(model, batch, cfg, layers).items()}
        want_vis = -torch.log(m_v[in_r].clamp(max=floor or 1) + 1e-6).mean()
        assert abs(float(terms["vis_sum"] / terms["r_count"]) - want_vis) < 1e-4
        assert abs(float(terms["vas_sum"] / terms["r_count"]) - m_v[in_r].mean()) < 1e-4
        assert abs(float(terms["ans_sum"] / terms["a_count"]) + torch.log(m_rv[in_a] + 1e-6).mean()) < 1e-4
        # the steps under the floor (the log's)
        surely, maybe = (m_v[in_r] < (floor or 1) + d for d in (-1e-5, 1e-5))
        assert int(surely.sum()) <= int(terms["below_count"]) <= int(maybe.sum()) and int(surely.sum()) > 0
        low, high = float(m_v[in_r][surely].sum()), float(m_v[in_r][maybe].sum())
        assert low - 1e-3 < float(terms["below_mass_sum"]) < high + 1e-3
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1),
                                           batch["labels"][:, 1:].flatten())
    assert abs(float(terms["ce_sum"] / terms["n_label"]) - float(ce)) < 1e-4


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
    import explorer
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
            loss = objective.total_loss(objective.loss_terms(model, batch, attcot, [0, 3]), counts, attcot)
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
        loss = objective.total_loss(objective.loss_terms(net, batch, cfg, [0, 1]), counts, cfg)
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


def test_answer_tokens_pair_each_answer_with_its_types_answers():
    """Every closed-set answer's first token, and as its rivals the answers of the types that can give
    it: yes/no among themselves, the counts among themselves; an open-ended type adds nothing; a
    two-token answer ("dark red") by its first token."""
    class Words:  # one token per word, numbered as first seen
        def __init__(self):
            self.vocab = {}

        def encode(self, text):
            return SimpleNamespace(ids=[self.vocab.setdefault(w, len(self.vocab)) for w in text.split()])
    words = Words()
    recs = [{"type": "cmp", "answer": "yes"}, {"type": "cmp", "answer": "no"},
            {"type": "other", "answer": "no"}, {"type": "other", "answer": "dark red"},
            {"type": "count", "answer": "2"}, {"type": "count", "answer": "3"},
            *[{"type": "open", "answer": f"w{i}"} for i in range(answers.CLOSED_SET + 1)]]
    got = objective.answer_tokens(words, recs)
    names = {words.vocab[w]: w for w in ("yes", "no", "dark", "2", "3")}
    assert sorted(names[int(i)] for i in got["ids"]) == ["2", "3", "dark", "no", "yes"]
    rivals = {names[int(i)]: {names[int(j)] for j, r in zip(got["ids"], row) if r}
              for i, row in zip(got["ids"], got["rivals"])}
    assert rivals == {"yes": {"yes", "no"}, "no": {"yes", "no", "dark"}, "dark": {"no", "dark"},
                      "2": {"2", "3"}, "3": {"2", "3"}}
    # answers as written: a capitalised answer is its own token, the one its answer span starts with
    got = objective.answer_tokens(words, [{"type": "yn", "answer": a} for a in ("Yes", "No", "yes")])
    assert sorted(int(i) for i in got["ids"]) == sorted(words.vocab[w] for w in ("Yes", "No", "yes"))


def test_commit_batch_cuts_early_and_forces_the_answer():
    """Each picked row: its prompt, the first u <= n/2 of its n rationale tokens, then its answer span;
    labels on the answer's tokens after the marker only; a row written in another format, or whose
    answer is not a known one, is left out."""
    P, R, A = data.P, data.R, data.A
    marker, answer_set = [7, 8], {"ids": torch.tensor([20, 40]), "rivals": torch.ones(2, 2, dtype=torch.bool)}
    rows = [([1, 2, 3], [10, 11, 12, 13, 14, 15], [7, 8, 20, 21]), ([1, 2], [30, 31, 32, 33], [7, 8, 40, 41]),
            ([1, 2], [50, 51], [9, 60, 61]), ([1, 2], [50, 51], [7, 8, 61]),
            ([1, 2], [], [7, 8, 20, 21])]  # no marker; an unknown answer; no rationale
    examples = [{"input_ids": torch.tensor(p + r + a), "labels": torch.tensor([-100] * len(p) + r + a),
                 "spans": torch.tensor([P] * len(p) + [R] * len(r) + [A] * len(a))} for p, r, a in rows]
    batch = data.collate(examples, 0)
    seen_u = set()
    for seed in range(20):
        cut = objective.commit_batch(batch, marker, 1.0, torch.Generator().manual_seed(seed), 0, answer_set)
        assert len(cut["input_ids"]) == 2 and cut["answers"] is answer_set
        for got, labels, mask, (p, r, a) in zip(cut["input_ids"], cut["labels"], cut["attention_mask"], rows):
            ids = got[mask.bool()].tolist()
            u = len(ids) - len(p) - len(a)
            assert 0 <= u <= len(r) // 2 and ids == p + r[:u] + a
            assert labels[mask.bool()].tolist() == [-100] * (len(p) + u + 2) + a[2:]
            seen_u.add((len(r), u))
    assert {(6, 0), (6, 3), (4, 0), (4, 2)} <= seen_u  # both ends of the range are drawn
    for seed in range(6):  # round(0.2 * 5) = 1 row picked: a copy unless it is one of the last three
        picked = int(torch.randperm(5, generator=torch.Generator().manual_seed(seed))[0])
        one = objective.commit_batch(batch, marker, 0.2, torch.Generator().manual_seed(seed), 0, answer_set)
        assert (one is None) if picked >= 2 else len(one["input_ids"]) == 1


def test_commit_term_by_hand_and_its_gradient_lowers_the_early_answer(trained):
    """commit_sum = sum of max(0, log q - log p0), q the answer's first-token probability renormalised
    over its rivals, by hand from the model's logits; one gradient step on the term alone lowers q."""
    cfg, result = trained
    model, proc = result["model"], result["proc"]
    batch = data.collate(data.encode_all(proc, result["train_records"][:8]), proc.pad_token_id)
    marker = proc.tokenizer.encode(" Answer:").ids
    answer_set = objective.answer_tokens(proc.tokenizer, result["train_records"])
    cut = objective.commit_batch(batch, marker, 1.0, torch.Generator().manual_seed(0), proc.pad_token_id,
                                 answer_set)
    assert len(cut["input_ids"]) == 8
    with torch.no_grad():
        logits = model(cut["input_ids"], cut["pixel_values"], cut["pixel_attention_mask"],
                       cut["attention_mask"]).logits.double()
    sets = answers.candidate_sets(result["train_records"])
    want_q = []
    for i, labels in enumerate(cut["labels"]):
        t = int((labels != -100).nonzero()[0, 0])  # the answer's first token, predicted at t - 1
        gold = proc.tokenizer.decode([int(labels[t])]).strip()
        rivals = {proc.tokenizer.encode(" " + a).ids[0] for s in sets.values() if gold in s for a in s}
        z = torch.stack([logits[i, t - 1, j] for j in sorted(rivals)]).exp().sum()
        want_q.append(float(logits[i, t - 1, labels[t]].exp() / z))
    want_q = torch.tensor(want_q, dtype=torch.float64)
    floor = float(want_q.median())  # half the copies above it
    terms = objective.commit_terms(model, cut, floor)
    want = torch.relu(want_q.log() - math.log(floor)).sum()
    assert abs(float(terms["commit_sum"].detach()) - float(want)) < 1e-4 and float(want) > 0
    assert abs(float(terms["commit_p_sum"]) - float(want_q.sum())) < 1e-4
    copy = model_mod.VLM(model.config)
    copy.load_state_dict(model.state_dict())
    terms = objective.commit_terms(copy, cut, 1e-3)
    terms["commit_sum"].backward()
    with torch.no_grad():
        for p in copy.parameters():
            p -= 1e-2 * p.grad
    after = objective.commit_terms(copy, cut, 1e-3)["commit_p_sum"]
    assert float(after) < float(terms["commit_p_sum"]) - 1e-3


def test_commit_term_gradient_on_a_stub_is_that_of_log_q():
    """With the logits a leaf tensor: d commit_sum / d logits is 1[j = gold] - q_j on the gold's rivals
    at the position just before the answer's first token, 0 on every other column and position; a
    copy whose q is under the floor gets none."""
    torch.manual_seed(0)
    V, T = 12, 6
    leaf = torch.randn(2, T, V, dtype=torch.float64, requires_grad=True)

    class Stub(torch.nn.Module):
        def forward(self, *args):
            return SimpleNamespace(logits=leaf)
    answer_set = {"ids": torch.tensor([3, 5, 7, 9]),  # 3 and 5 rivals (yes/no), 7 and 9 (two counts)
                  "rivals": torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()}
    labels = torch.tensor([[-100, -100, -100, 5, 1, -100], [-100, -100, 9, 1, -100, -100]])
    cut = {"input_ids": torch.zeros(2, T, dtype=torch.long), "attention_mask": torch.ones(2, T),
           "labels": labels, "answers": answer_set}
    with torch.no_grad():
        q = [leaf[0, 2, [3, 5]].softmax(0)[1], leaf[1, 1, [7, 9]].softmax(0)[1]]
    floor = float(min(q)) * 0.5 + float(max(q)) * 0.5  # one copy above the floor, one under
    terms = objective.commit_terms(Stub(), cut, floor)
    terms["commit_sum"].backward()
    want = torch.zeros_like(leaf)
    for b, (t, cols, gold) in enumerate(((2, [3, 5], 5), (1, [7, 9], 9))):
        if q[b] > floor:
            p = leaf[b, t, cols].detach().softmax(0)
            want[b, t, cols] = torch.tensor([float(c == gold) for c in cols], dtype=torch.float64) - p
    assert torch.allclose(leaf.grad, want, atol=1e-12) and want.abs().sum() > 0
    assert float(terms["commit_p_sum"]) == pytest.approx(float(q[0] + q[1]))


def test_commit_copies_in_every_micro_batch_and_counted_over_all():
    """With --grad-accum 2 each micro-batch carries its own cut copies, and the step's commit_count
    is their number over both."""
    P, R, A = data.P, data.R, data.A
    ids = [1, 2, 10, 11, 7, 8, 20, 21]
    ex = {"input_ids": torch.tensor(ids), "labels": torch.tensor([-100] * 2 + ids[2:]),
          "spans": torch.tensor([P, P, R, R, A, A, A, A])}
    cfg = TrainConfig(batch_size=4, grad_accum=2, lambda_commit=1.0, commit_share=0.5)
    answer_set = {"ids": torch.tensor([20]), "rivals": torch.ones(1, 1, dtype=torch.bool)}
    micro = nanoattcot.batches_for_step([ex] * 8, 0, 0, cfg, commit_ids=([7, 8], answer_set))
    assert len(micro) == 2 and all(len(b["commit"]["input_ids"]) == 2 for b in micro)
    assert float(objective.step_counts(micro)["commit_count"]) == 4.0


def test_training_with_the_commit_term_logs_it(tmp_path):
    """--lambda-commit trains with the cut copies and logs the term and the forced answer's mean
    probability; the cuts come from the step's seed, so a rerun logs the same numbers."""
    # a floor below every early answer's probability: the hinge is active from the first step
    results = [nanoattcot.train(config(tmp_path / str(i), objective="attcot", lambda_commit=weight,
                                       commit_floor=1e-12, commit_share=0.5, max_steps=3))
               for i, weight in enumerate((1.0, 1.0, 0.0))]
    runs = [r["metrics"] for r in results]
    assert all(row["commit"] > 0 and 0 < row["commit_p"] <= 1 for row in runs[0])
    assert [r["commit_p"] for r in runs[0]] == [r["commit_p"] for r in runs[1]]
    assert "commit" not in runs[2][0]
    # the term trains: without it (the same seed, the same batches) the weights end elsewhere
    assert not torch.equal(results[0]["model"].lm_head.weight, results[2]["model"].lm_head.weight)


def test_total_loss_by_hand():
    terms = {"ce_sum": torch.tensor(6.0), "vis_sum": torch.tensor(3.0), "ans_sum": torch.tensor(2.0)}
    counts = {"n_label": torch.tensor(4.0), "r_count": torch.tensor(2.0), "a_count": torch.tensor(1.0)}
    attcot = TrainConfig(objective="attcot", lambda_vis=0.1, lambda_ans=0.3)
    assert float(objective.total_loss(terms, counts,
                                       attcot)) == pytest.approx(6 / 4 + 0.1 * 3 / 2 + 0.3 * 2 / 1)
    assert float(objective.total_loss(terms, counts, TrainConfig(objective="sft"))) == pytest.approx(6 / 4)


def final_state(out):
    """The weights and optimizer state of a run's last checkpoint."""
    from safetensors.torch import load_file
    ckpt = os.path.join(out, "checkpoint")
    return load_file(os.path.join(ckpt,
                                  "model.safetensors")), checkpoint.load_trainer_state(ckpt)["optimizer"]


def assert_bitwise_equal(a, b):
    (wa, oa), (wb, ob) = a, b
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, s in oa["state"].items():
        assert all(torch.equal(v, ob["state"][i][k]) for k, v in s.items())


REAL_LOSS_TERMS = objective.loss_terms


def count_steps(monkeypatch, fail_at=None, error=None):
    """Counts the micro-batches the training loop computes (one per step at grad_accum 1); with
    fail_at, the fail_at-th call raises error instead (a Ctrl-C or a crash in that step)."""
    calls = []

    def counted(*args):
        calls.append(1)
        if len(calls) == fail_at:
            raise error
        return REAL_LOSS_TERMS(*args)
    monkeypatch.setattr(objective, "loss_terms", counted)
    return calls


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints every 3 steps: what every resumed run must equal."""
    cfg = config(tmp_path_factory.mktemp("straight"), max_steps=8, save_every=3)
    return nanoattcot.train(cfg)["metrics"], final_state(cfg.out)


def test_ctrl_c_saves_and_resume_does_only_the_rest(tmp_path, monkeypatch, capsys, straight):
    count_steps(monkeypatch, fail_at=5, error=KeyboardInterrupt)  # Ctrl-C during step 5
    with pytest.raises(SystemExit) as e:
        nanoattcot.train(config(tmp_path, max_steps=8, save_every=3))
    assert e.value.code == 130  # --resume's cue
    steps = count_steps(monkeypatch)
    clock = iter(range(1000))  # a clock that ticks a second per reading: the ETA is then exact
    monkeypatch.setattr(nanoattcot, "time", SimpleNamespace(time=lambda: float(next(clock))))
    capsys.readouterr()
    resumed = nanoattcot.train(config(tmp_path, max_steps=8, save_every=3, resume=True,
                                      log_every=1))["metrics"]
    out = capsys.readouterr().out
    assert "resumed from" in out and len(steps) == 4  # steps 5 to 8 only
    first = next(l for l in out.splitlines() if l.startswith("step "))
    assert first.startswith("step     5/8")
    assert first.endswith("ETA 3s")  # 1 s for the 1 step run since the resume
    assert [m["step"] for m in resumed] == list(range(1, 9)) and resumed == straight[0]
    assert_bitwise_equal(final_state(tmp_path / "run"), straight[1])


def test_ctrl_c_during_a_periodic_eval_saves_the_step_it_follows(tmp_path, monkeypatch, straight):
    """--eval-every 2: evals after steps 2, 4, 6 (not after the last); a Ctrl-C inside the one after
    step 4 exits 130 with a checkpoint at step 4 whose weights are step 4's, and --resume then gives
    the uninterrupted run's metrics and final state."""
    seen = []

    def stub_eval(model, proc, cfg, *args):
        seen.append(len(open(os.path.join(cfg.out, "metrics.jsonl")).readlines()))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return {}
    monkeypatch.setattr(nanoattcot, "run_eval", stub_eval)
    with pytest.raises(SystemExit) as e:
        nanoattcot.train(config(tmp_path, max_steps=8, save_every=3, eval_every=2))
    assert e.value.code == 130 and seen == [2, 4]
    assert checkpoint.load_trainer_state(str(tmp_path / "run" / "checkpoint"))["step"] == 4
    resumed = nanoattcot.train(config(tmp_path, max_steps=8, save_every=3, eval_every=2, resume=True))
    assert seen == [2, 4, 6] and resumed["metrics"] == straight[0]
    assert_bitwise_equal(final_state(tmp_path / "run"), straight[1])


def test_crash_resumes_from_the_periodic_checkpoint(tmp_path, monkeypatch, straight):
    """A crash after step 5 (no save on the way down): resume from the step-3 checkpoint, drop the
    metrics rows logged after it, redo steps 4 to 8."""
    count_steps(monkeypatch, fail_at=6, error=RuntimeError("power cut"))
    with pytest.raises(RuntimeError):
        nanoattcot.train(config(tmp_path, max_steps=8, save_every=3))
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 5
    steps = count_steps(monkeypatch)
    nanoattcot.train(config(tmp_path, max_steps=8, save_every=3, resume=True))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(steps) == 5 and rows == straight[0]
    assert_bitwise_equal(final_state(tmp_path / "run"), straight[1])


KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import answers
import checkpoint
import nanoattcot
point, ckpt, real, writes = sys.argv[2], sys.argv[3], os.replace, [0]

def replace(src, dst):  # SIGKILL this process at one point of the second checkpoint save (step 6)
    dst = str(dst)
    writes[0] += dst == os.path.join(ckpt + ".tmp", "model.safetensors")
    if writes[0] == 2 and (point == "writing" and dst.endswith("model.safetensors")
                           or point == "swap" and dst == ckpt):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
    if writes[0] == 2 and point == "cleanup" and dst == ckpt:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
nanoattcot.main(sys.argv[4:])
"""


@pytest.mark.parametrize("point,step", [("writing", 3), ("swap", 3), ("cleanup", 6)])
def test_sigkill_during_a_checkpoint_save(tmp_path, monkeypatch, capsys, straight, point, step):
    """Killed while writing the new checkpoint, between its two renames, or while removing the old
    one: the folder left is the old or the new checkpoint, whole, and the resumed run ends equal."""
    out = tmp_path / "run"
    flags = ["train", "--out", str(out), "--n-train", "64", "--n-eval", "6", "--batch-size", "8",
             "--max-steps", "8",
             "--warmup", "2", "--save-every", "3", "--log-every", "100", "--device", "cpu"]
    run = subprocess.run([sys.executable, "-c", KILLER, ROOT, point, str(out / "checkpoint"), *flags],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -9, run.stderr[-2000:]
    steps = count_steps(monkeypatch)
    nanoattcot.train(config(tmp_path, max_steps=8, save_every=3, resume=True))
    assert f"at step {step}" in capsys.readouterr().out and len(steps) == 8 - step
    assert_bitwise_equal(final_state(out), straight[1])
    assert sorted(os.listdir(out)) == ["checkpoint", "curves.png", "data", "metrics.jsonl", "model"]


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    nanoattcot.train(config(tmp_path, max_steps=1, resume=True))
    assert "--resume: no checkpoint in" in capsys.readouterr().out


def test_resume_under_other_settings_is_refused(tmp_path, monkeypatch):
    """--resume with a setting that changes what the run computes (the rate, the steps, the objective)
    names each difference and stops before a step; one that changes where or how it runs (the log
    interval, the device) continues."""
    count_steps(monkeypatch, fail_at=3, error=KeyboardInterrupt)
    with pytest.raises(SystemExit):
        nanoattcot.train(config(tmp_path, max_steps=4, save_every=2))
    steps = count_steps(monkeypatch)
    with pytest.raises(checkpoint.CheckpointError, match=r"other settings \(--max-steps 4 there, 5 now, "
                       r"--lr 0.003 there, 0.001 now\)"):
        nanoattcot.train(config(tmp_path, max_steps=5, save_every=2, lr=1e-3, resume=True))
    with pytest.raises(checkpoint.CheckpointError, match=r"--objective 'attcot' there, 'sft' now"):
        nanoattcot.train(config(tmp_path, max_steps=4, save_every=2, objective="sft", resume=True))
    assert steps == []
    nanoattcot.train(config(tmp_path, max_steps=4, save_every=2, resume=True, log_every=1))
    assert len(steps) == 2


def test_tampered_trainer_state_is_refused(tmp_path):
    """trainer_state.pt loads with weights_only: a pickle that would run code is refused, unrun."""
    nanoattcot.train(config(tmp_path, max_steps=1))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    torch.save({"step": Payload()}, tmp_path / "run" / "checkpoint" / "trainer_state.pt")
    with pytest.raises(model_mod.CheckpointError, match="trainer_state.pt: refused to load"):
        nanoattcot.train(config(tmp_path, max_steps=2, resume=True))
    assert not marker.exists()


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
            terms["ce_sum"] = terms["ce_sum"] * float("nan")
        return terms
    monkeypatch.setattr(objective, "loss_terms", poisoned)
    with pytest.raises(FloatingPointError, match="step 2: loss is nan"):
        nanoattcot.train(config(tmp_path / "a", max_steps=4))
    calls["n"] = 0
    result = nanoattcot.train(config(tmp_path / "b", max_steps=4, skip_nonfinite=True))
    assert result["nonfinite_skipped"] == 1 and len(result["metrics"]) == 3




@pytest.mark.parametrize("spec,want", [("all", [0, 1, 2, 3]), ("1,-1", [1, 3]), ("2:", [2, 3])])
def test_the_objective_reads_the_layers_the_flag_names(tmp_path, monkeypatch, spec, want):
    seen, real = [], objective.loss_terms
    monkeypatch.setattr(objective, "loss_terms", lambda model, batch, cfg, layers: seen.append(layers)
                        or real(model, batch, cfg, layers))
    result = nanoattcot.train(config(tmp_path, max_steps=1, layers=spec))
    assert seen == [want] and result["layers"] == want


def test_metrics_row_means_over_the_global_batch():
    """Hand sums: ce over labels, vis / ans / vas over their rows, below over rationale rows, below_vas
    over the rows below the floor; two ranks' counts are the step's."""
    cfg = TrainConfig(objective="attcot", lambda_vis=0.5, lambda_ans=0.25)
    summed = {"ce_sum": 12.0, "vis_sum": 6.0, "ans_sum": 3.0, "vas_sum": 4.0, "below_count": 5.0,
              "below_mass_sum": 1.0, "r_count": 0, "a_count": 0, "n_label": 0}
    counts = {"n_label": torch.tensor(6.0), "r_count": torch.tensor(10.0), "a_count": torch.tensor(2.0)}
    row = nanoattcot.metrics_row(summed, counts, cfg, 1, 6, 0.001)
    assert row == {"step": 7, "ce": 2.0, "lr": 0.001, "vis": 0.6, "ans": 1.5, "vas": 0.4, "below": 0.5,
                   "below_vas": 0.2, "loss": pytest.approx(2.0 + 0.5 * 0.6 + 0.25 * 1.5)}
    commit = TrainConfig(objective="attcot", lambda_vis=0.5, lambda_ans=0.25, lambda_commit=2.0)
    row = nanoattcot.metrics_row({**summed, "commit_sum": 0.8, "commit_p_sum": 1.2},
                                 {**counts, "commit_count": torch.tensor(4.0)}, commit, 1, 6, 0.001)
    assert row["commit"] == pytest.approx(0.2) and row["commit_p"] == pytest.approx(0.3)
    assert row["loss"] == pytest.approx(2.0 + 0.5 * 0.6 + 0.25 * 1.5 + 2.0 * 0.2)


def test_family_flag_trains_on_its_own_set(tmp_path):
    """--family wording makes its set in its own folder (a grid set in the same --out is never
    read for it) and trains on its questions."""
    result = nanoattcot.train(config(tmp_path, family="wording", objective="sft", max_steps=1, n_train=30,
                                     n_eval=3))
    assert os.path.exists(os.path.join(tmp_path, "run", "data_wording", "train.jsonl"))
    assert not os.path.exists(os.path.join(tmp_path, "run", "data"))
    assert {r["type"] for r in result["train_records"]} == {"is_cell", "which_more", "exists"}
    with pytest.raises(nanoattcot.ConfigError, match="family"):
        TrainConfig(family="words")
