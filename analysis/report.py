"""
The report of an evaluation: the side-by-side table of evaluate()'s results (printed, and in
report.md), report.json with every number, the pictures, and report.html (explorer.py).

    print(report.table(results)); report.write_report(results, "out", meta)
"""
import json
import os

from PIL import Image

import data
from analysis import draw
from analysis import explorer
from analysis.commitment import CUTS


def table_rows(summaries):
    """{name: evaluate() result (+ wall_seconds)} -> [(measure, [a cell per name])], '-' where not taken."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) \
        else f"{v[0]:.2f}-{v[1]:.2f}" if isinstance(v, (tuple, list)) else "-" if v is None else str(v)
    pair = lambda a, b: f"{a:.2f} / {b:.2f}"
    runs, rows = list(summaries.values()), []
    for key in ("accuracy_cot", "accuracy_cot_ci95", "unparseable", "accuracy_direct",
                "accuracy_direct_ci95", "unparseable_direct", "text_prior_accuracy", "prior_agreement",
                "counterfactual_consistency", "vas_rationale", "wall_seconds"):
        rows.append((key, [fmt(r.get(key)) for r in runs]))
    types = sorted({t for r in runs for t in r.get("accuracy_by_type", {})}, key=str)
    for t in types:  # each prompt's accuracy per question type
        rows.append((f"{t}: accuracy cot / direct", [
            pair(r["accuracy_by_type"][t], r["accuracy_by_type_direct"][t])
            if t in r.get("accuracy_by_type_direct", {}) else "-" for r in runs]))
    rows.append(("reply tokens: cot / direct", [pair(r["reply_tokens"]["cot"], r["reply_tokens"]["direct"])
                                                if r.get("reply_tokens", {}).get("cot") else "-"
                                                for r in runs]))
    for which in ("gold", "own"):  # where the rationale and the answer look, teacher forced
        looks = [r["where_it_looks"][which] if r.get("where_it_looks") else None for r in runs]
        rows.append((f"{which}: image mass 1st / last 10%", [pair(l["image_mass_along_rationale"][0],
                     l["image_mass_along_rationale"][-1]) if l else "-" for l in looks]))
        rows.append((f"{which}: answer -> rationale / img", [pair(l["answer_mass_on_rationale"],
                     l["answer_mass_on_image"]) if l else "-" for l in looks]))
    rows.append(("occlusion: changed evid / ctrl",
                 [pair(r["occlusion"]["evidence_changed"], r["occlusion"]["control_changed"])
                                                    if r.get("occlusion") else "-" for r in runs]))
    rows.append(("occlusion: items / left out",
                 [f"{r['occlusion']['n']} / {sum(r['occlusion']['left_out'].values())}"
                                                 if r.get("occlusion") else "-" for r in runs]))
    if any(r.get("caption") for r in runs):  # base.caption_check: does the model see?
        rows.append(("captions: cells / kind / colour right", ["{cells_right:.2f} / {kind_right:.2f} / "
                     "{colour_right:.2f}".format(**r["caption"]) if r.get("caption") else "-" for r in runs]))
    commits = [r.get("early_commitment") if (r.get("early_commitment") or {}).get("n") else None
               for r in runs]
    rows.append(("forced answer: items scored", [str(c["n"]) if c else "-" for c in commits]))
    for i, cut in enumerate(CUTS):  # early commitment: the answer forced after cut% of the rationale
        rows.append((f"forced at {cut}%: agree/acc/p(final)", [
            f"{c['agreement'][i]:.2f}/{c['accuracy'][i]:.2f}/{c['final_answer_probability'][i]:.2f}"
            if c else "-" for c in commits]))
    return rows


def table(summaries):
    """The side-by-side text table the run prints: a row per measure, a column per model."""
    rows = table_rows(summaries)
    width = max(14, *(len(n) + 2 for n in summaries), *(len(c) + 2 for _, cells in rows for c in cells))
    lines = [f"{'':36s}" + "".join(f"{name:>{width}s}" for name in summaries)]
    return "\n".join(lines + [f"{k:36s}" + "".join(f"{c:>{width}s}" for c in cells) for k, cells in rows])


def markdown_table(summaries):
    names = list(summaries)
    head = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    return "\n".join(head + [f"| {k} | " + " | ".join(cells) + " |" for k, cells in table_rows(summaries)])


def figures(results, out):
    """The pictures of {name: evaluate() result}, drawn into the folder out -> [(heading, file)]."""
    names, runs, made = list(results), list(results.values()), []

    def save(heading, file, image):
        image.save(os.path.join(out, file))
        made.append((heading, file))
    save("Accuracy, direct and with chain of thought (95% bootstrap intervals)", "accuracy.png",
         draw.bar_chart(
        names, ["direct", "CoT"], [[r.get("accuracy_direct"), r["accuracy_cot"]] for r in runs],
        [[r.get("accuracy_direct_ci95"), r.get("accuracy_cot_ci95")] for r in runs], "accuracy", "accuracy"))
    looks = [(n, r["where_it_looks"]) for n, r in results.items() if r.get("where_it_looks")]
    if looks:
        by_layer = [draw.line_chart([(n, l[w]["layers"], l[w]["image_mass_by_layer"]) for n, l in looks],
                                    f"rationale's image mass by layer ({w} rationales)", "layer",
                                    "image mass",
                                    ylim=(0, 1), xticks=looks[0][1][w]["layers"]) for w in ("own", "gold")]
        save("Where the rationale looks, per layer", "image_mass_by_layer.png", draw.grid(by_layer, 2))
        bins = len(looks[0][1]["own"]["image_mass_along_rationale"])
        along = [draw.line_chart([(n, [100 * (i + 0.5) / bins for i in range(bins)],
                                   l[w]["image_mass_along_rationale"])
                                  for n, l in looks], f"image mass along the rationale ({w} rationales)",
                                 "position in the rationale (%)", "image mass", ylim=(0, 1))
                                 for w in ("own", "gold")]
        save("Where the rationale looks, along its length (mean over layers)",
             "image_mass_along_rationale.png",
             draw.grid(along, 2))
    commits = [(n, r["early_commitment"]) for n, r in results.items()
               if (r.get("early_commitment") or {}).get("n")]
    if commits:
        panels = [draw.line_chart([(n, c["cuts"], c[what]) for n, c in commits], title, "rationale kept (%)",
                                  label, ylim=(0, 1), xticks=commits[0][1]["cuts"], corner="bottom")
                  for what, title, label in (
                      ("final_answer_probability", "probability of the final answer", "probability"),
                      ("agreement", "forced answer = final answer", "agreement"),
                      ("accuracy", "forced answer right", "accuracy"))]
        save("Early commitment: the answer forced (teacher forced, among the candidates) after a share "
             "of the model's own rationale", "early_commitment.png", draw.grid(panels, 3))
    for k, first in enumerate(runs[0].get("heatmaps") or []):
        same = [(n, next((h for h in r.get("heatmaps") or []
                          if (h["image"], h["question"]) == (first["image"], first["question"])), None))
                for n, r in results.items()]
        same = [(n, h) for n, h in same if h and h["image"]]
        if not same:
            continue
        image = data.load_image(first["image"])
        cols = 1 + max(len(h["steps"]) for _, h in same)
        cells = []
        for _, h in same:
            row = [draw.captioned(image.convert("RGB").resize((160, 160 * image.height // image.width),
                                                              Image.NEAREST), h["question"])]
            row += [draw.captioned(draw.attention_overlay(image, h["boxes"], s["weights"]),
                                   f"[{s['image_mass']:.2f}] {s['text']}")
                    for s in h["steps"]]
            cells += row + [Image.new("RGB", (1, 1), "white")] * (cols - len(row))
        save(f"Attention over the image, step by step (item {k + 1}; [image mass] and the step's words)",
             f"attention_{k + 1}.png",
             draw.grid(cells, cols, title="where each step of the reply looks (brighter = more attention)",
                       row_labels=[n for n, _ in same]))
    return made


def headline(results):
    """The report's first lines, what to look at and what this run shows: the base (the row named
    "base"), if there, as its captions and both prompts measure it; then every other model's accuracy
    with chain of thought and for the answer alone; then where their rationales look and what greying
    the evidence does."""
    name = lambda n: {"sft": "CoT-SFT", "attcot": "Att-CoT", "avar": "AVAR's objective"}.get(n, n)
    tuned = {n: r for n, r in results.items() if n != "base"}
    lines, b = [], results.get("base")
    if b:
        prior = "n/a" if b.get("text_prior_accuracy") is None else f"{b['text_prior_accuracy']:.2f}"
        caption = ("its captions name {cells_right:.2f} of the cells right ({kind_right:.2f} the kind, "
                   "{colour_right:.2f} the colour); ".format(**b["caption"]) if b.get("caption") else "")
        lines.append(f"**The base**: {caption}asked for "
                     f"the answer alone it is right {b['accuracy_direct']:.2f} of the time (never looking, "
                     f"the text prior: {prior}); asked to think step by step, "
                     f"{b['accuracy_cot']:.2f}, {b['unparseable']} of its {b['n']} replies giving no answer.")
    if tuned:
        per_type = lambda r: "".join(f", {t} {a:.2f}"
                                     for t, a in sorted((r.get("accuracy_by_type") or {}).items(), key=str))
        lines.append("**Fine-tuned on image chain of thought**, asked to think step by step (and for the "
                     "answer alone; then per question type, with chain of thought): " + "; ".join(
                         f"{name(n)} {r['accuracy_cot']:.2f} ({r['accuracy_direct']:.2f}){per_type(r)}"
                         for n, r in tuned.items()) + ".")
        looks = [(n, r) for n, r in tuned.items() if r.get("where_it_looks") and r.get("occlusion")]
        if looks:
            along = lambda r: r["where_it_looks"]["own"]["image_mass_along_rationale"]
            lines.append("**Where the rationale looks** (its image mass, first -> last tenth of the model's "
                         "own rationale; answers changed by greying the evidence, by greying as much "
                         "elsewhere): " + "; ".join(
                             f"{name(n)} {along(r)[0]:.2f} -> {along(r)[-1]:.2f}, "
                             f"{r['occlusion']['evidence_changed']:.2f} / "
                             f"{r['occlusion']['control_changed']:.2f}" for n, r in looks)
                         + ". The attention pictures below show the same items, step by step, for each "
                           "model.")
    return lines


def write_report(results, out, meta=None, extra=()):
    """report.json (every number), report.md (the table and the pictures, readable on GitHub),
    report.html (the same with the attention explorer: explorer.py) and the PNGs under out. extra:
    [(heading, file relative to out)] drawn elsewhere (training curves)."""
    os.makedirs(out, exist_ok=True)
    made = figures(results, out) + [e for e in extra if os.path.exists(os.path.join(out, e[1]))]
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"meta": meta or {}, "results": results}, f)
    explorer.write_html(os.path.join(out, "report.html"), results, table_rows(results),
                        [(heading, os.path.join(out, file)) for heading, file in made], meta)
    lines = ["# Evaluation report", ""] + [f"{line}\n" for line in headline(results)]
    lines += [f"- {k}: {v}" for k, v in (meta or {}).items()]
    lines += ["", "Where each reply token looks, token by token and layer by layer: open report.html "
              "(one file, no network) in a browser."]
    lines += ["", markdown_table(results), ""]
    lines += [line for heading, file in made for line in (f"## {heading}", "", f"![{heading}]({file})", "")]
    lines += ["## Time", "", "| model | seconds per phase | items/s per phase |", "|---|---|---|"]
    lines += [f"| {n} | {', '.join(f'{k} {v}' for k, v in r['seconds'].items())} | "
              f"{', '.join(f'{k} {v}' for k, v in r.get('items_per_second', {}).items())} |"
              for n, r in results.items()]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(out, "report.md")
