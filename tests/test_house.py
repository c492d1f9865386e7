"""The project's shape: the layers of the house and its import graph (no cycle, nothing imports a layer
above its own), no file over 500 code lines or packed, every flag of every command explains itself,
the one layer grammar, and the key groups' names."""
import argparse
import ast
import collections
import glob
import os

import pytest
import torch

import config
import data
import eval as eval_mod
import generate
import masses
import nanoattcot
from bench import generate as bench_generate
from bench import kernels as bench_kernels
from bench import memory as bench_memory
from bench import train as bench_train
from methods import grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("methods", "setting", "analysis", "bench")  # the lab, each folder named for what it holds
# The house, bottom to top: a module imports only from its own layer and those below it. The core is
# the root: its parts, and the programs that train and measure with them; the lab builds on the parts
# (its own parts, which the core programs use) and on the programs (the base's stages, GRPO, benchmarks).
LAYERS = (
    ("parts", {"device", "files", "config", "siglip", "model", "mass_kernel", "masses", "data", "records",
               "answers", "checkpoint", "lora", "generate"}),
    ("lab parts", {"methods.avar", "methods.drift", "methods.difficulty", "methods.commit",
                   "setting.synthetic", "setting.vision_stage", "analysis.boxes", "analysis.commitment",
                   "analysis.draw", "analysis.explorer", "analysis.report"}),
    ("core programs", {"objective", "train_config", "train", "eval"}),
    ("lab programs", {"setting.base", "methods.grpo", "bench.kernels", "bench.train", "bench.generate",
                      "bench.memory"}),
    ("the main job", {"nanoattcot"}),
)


def module_paths():
    """Every module of ours, by the name it is imported as -> its file: the root's and each folder's."""
    found = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
    for folder in FOLDERS:
        found.update({f"{folder}.{os.path.basename(p)[:-3]}": p
                      for p in glob.glob(os.path.join(ROOT, folder, "*.py"))
                      if not p.endswith("__init__.py")})
    return found


MODULES = module_paths()


def imports_of(name):
    """The modules of ours a file imports anywhere in it (inside functions too): `import x`,
    `from x import y` and `from folder import module` each give the module imported."""
    tree = ast.parse(open(MODULES[name]).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:  # would escape the checks below
            pytest.fail(f"{name}: a relative import (line {node.lineno}); the house imports by full name")
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found & set(MODULES) - {name}


def test_every_module_has_a_layer_and_every_folder_says_what_it_holds():
    placed = [m for _, ms in LAYERS for m in ms]
    assert sorted(placed) == sorted(MODULES), set(placed) ^ set(MODULES)
    for folder in FOLDERS:
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, folder, "__init__.py")).read()))
        assert doc and len(doc.split()) > 10, folder  # a package (never shadowed), and its contents named
    assert not set(os.listdir(ROOT)) & {f"{m}.py" for m in FOLDERS}


def test_the_import_graph_has_no_cycle_and_nothing_imports_upward():
    graph = {m: imports_of(m) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            pytest.fail("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) is None:
            state[m] = "open"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"
    for m in sorted(graph):
        visit(m, [])
    layer = {m: i for i, (_, ms) in enumerate(LAYERS) for m in ms}
    upward = [f"{m} ({LAYERS[layer[m]][0]}) imports {n} ({LAYERS[layer[n]][0]})"
              for m in sorted(graph) for n in sorted(graph[m]) if layer[n] > layer[m]]
    assert not upward, upward
    # the graph was read: the trainer's, the objective's and the pipeline's imports
    assert graph["train"] >= {"config", "data", "objective", "checkpoint", "methods.commit"}
    assert graph["objective"] >= {"data", "masses", "methods.avar"}
    assert graph["setting.base"] >= {"train", "train_config"} and "nanoattcot" not in graph["methods.grpo"]


def code_lines(path):
    lines = [line.strip() for line in open(path).read().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("path", sorted([*MODULES.values(), *glob.glob(os.path.join(ROOT, "tests", "*.py"))]),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_no_file_is_over_500_code_lines_or_packed(path):
    """At most 500 code lines (neither blank nor a comment), none over 110 characters, one statement
    per line: a file is split by concept, never squeezed under the limit."""
    assert len(code_lines(path)) <= 500
    long = [i + 1 for i, line in enumerate(open(path).read().splitlines()) if len(line) > 110]
    assert not long, f"lines over 110 characters: {long}"
    tree = ast.parse(open(path).read())
    starts = collections.Counter(node.lineno for node in ast.walk(tree) if isinstance(node, ast.stmt))
    packed = [line for line, n in starts.items() if n > 1 and not compound(path, line)]
    assert not packed, f"more than one statement on lines {packed}"
    commas = [node.lineno for node in ast.walk(tree)
              if isinstance(node, ast.Expr) and isinstance(node.value, ast.Tuple)]
    assert not commas, f"statements joined by commas on lines {commas}"


def compound(path, line):  # `if x: return` and its kind: a compound statement's body on its own line
    text = open(path).read().splitlines()[line - 1].strip()
    keywords = ("if", "for", "while", "with", "try:", "else:", "elif", "def", "class")
    return text.split()[0] in keywords and ";" not in text


PARSERS = {"nanoattcot.py": nanoattcot.parser, "methods.grpo": grpo.parser, "eval.py": eval_mod.parser,
           "generate.py": generate.parser, "bench.train": bench_train.parser,
           "bench.kernels": bench_kernels.parser,
           "bench.generate": bench_generate.parser, "bench.memory": bench_memory.parser}


def test_no_module_of_ours_shadows_a_package_transformers_imports():
    """Run from the repository, a module here named as a package transformers imports hides that package
    (transformers 5.25 imports Hugging Face's `kernels`, which a kernels.py here shadowed): the names
    are read from transformers' own source, every `import x` and `from x import` in it."""
    import re
    import transformers
    imported = set()
    for folder, _, files in os.walk(os.path.dirname(transformers.__file__)):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(folder, f), encoding="utf-8").read()
                imported |= set(re.findall(r"^[ \t]*(?:from|import)[ \t]+([A-Za-z_]\w*)", text, re.M))
                imported |= set(re.findall(r"(?:_is_package_available|import_module|find_spec)\(\s*[\"']"
                                           r"([A-Za-z_]\w*)", text))  # what it probes by name
    ours = {m.split(".")[0] for m in MODULES}  # the root's modules and the folders
    assert "torch" in imported and not ours & imported, ours & imported


@pytest.mark.parametrize("command", [
    "bench.train --cpu --steps 1 --runs sft", "bench.train --shape tiny --cpu --steps 1",
    "bench.generate --size tiny", "bench.kernels --cpu --quick --json {tmp}/kernels.json",
    "methods.grpo --help"])
def test_the_labs_commands_run_as_modules_from_the_root(command, tmp_path):
    """The README's lab commands (python -m folder.module), each in its quickest form."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", *command.format(tmp=tmp_path).split()], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_flag_explains_itself_with_its_default(command):
    actions = [a for a in PARSERS[command]()._actions
               if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]
    assert actions
    for a in actions:
        assert a.help and len(a.help.split()) >= 2, f"{command} {a.option_strings}: no help"
        switch = isinstance(a, (argparse._StoreTrueAction, argparse._AppendAction)) or a.required
        assert switch or "default" in a.help, f"{command} {a.option_strings}: no default in the help"


def test_help_prints():
    text = nanoattcot.parser().format_help()
    assert "--lambda-vis LAMBDA_VIS" in text and "weight of L_vis" in text and "(default: 0.1)" in text
    assert "3%" in text  # a literal percent sign survives argparse's formatting


@pytest.mark.parametrize("spec,want", [
    ("all", [0, 1, 2, 3, 4, 5]), (":", [0, 1, 2, 3, 4, 5]), ("last", [5]), ("-1", [5]), ("0,3", [0, 3]),
    ("3,0,3", [0, 3]), ("4:", [4, 5]), (":2", [0, 1]), ("-2:", [4, 5]), ("1:3,5", [1, 2, 5]), (" 2 ", [2]),
])
def test_layer_grammar(spec, want):
    assert config.layer_set(spec, 6) == want
    assert config.layer_set(spec) is None  # the grammar alone, before a model is loaded


@pytest.mark.parametrize("spec,message", [
    ("x", "must be all"), ("1,", "must be all"), ("1:2:3", "must be all"), ("6", "the model has 6 layers"),
    ("-7", "the model has 6 layers"), ("7:", "names no layer"),
])
def test_layer_grammar_refuses(spec, message):
    with pytest.raises(config.ConfigError, match=message):
        config.layer_set(spec, 6, "--layers")


def test_key_groups_by_name():
    S, P, V, R, A = data.S, data.P, data.V, data.R, data.A
    spans = torch.tensor([[S, S, P, V, V, P, R, R, A, 0]])
    groups = masses.key_groups(spans, ("image", "rationale+image"))
    assert groups.tolist() == [[0, 0, 0, 3, 3, 0, 2, 2, 0, 0]]
    assert masses.key_groups(spans, ("image", "rationale")).tolist() == [[0, 0, 0, 1, 1, 0, 2, 2, 0, 0]]
    region = torch.tensor([[0, 0, 0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    got = masses.key_groups(spans, ("image", "system"), extra=[region])
    assert got.tolist() == [[2, 2, 0, 1, 5, 0, 0, 0, 0, 0]] and got.dtype == torch.uint8


def test_mass_hook_takes_the_rows_and_applies_the_boost():
    """The hook's masses are the kernel's on the chosen rows, and with a boost mass_kernel.boosted of them."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8, dtype=torch.float64), torch.randn(1, 1, 6, 8, dtype=torch.float64)
    spans = torch.tensor([[data.P, data.V, data.V, data.R, data.R, data.A]])
    rows, q_pos, _ = masses.query_rows(spans)
    groups = masses.key_groups(spans, ("image", "rationale"))
    plain = masses.mass_fn(rows, q_pos, groups, 2, impl="reference")(0, q, k)
    scores = (q[0] @ k[0].transpose(-1, -2) / 8 ** 0.5).masked_fill(~torch.ones(6, 6).tril().bool(),
                                                                    float("-inf"))
    p = scores.softmax(-1)[:, 3:]  # (H, 3 reply rows, 6 keys)
    want = torch.stack([p[..., 1:3].sum(-1), p[..., 3:5].sum(-1)], -1)
    assert torch.allclose(plain[0], want)
    boosted = masses.mass_fn(rows, q_pos, groups, 2, impl="reference", boost=lambda layer: 3.0)(0, q, k)
    assert torch.allclose(boosted, kernels_boosted(plain, 3.0))


def test_fused_masses_are_the_models_attention(tmp_path, monkeypatch):
    """The fused route (group bits as extra value columns of the model's own attention) gives the
    reference's masses and gradients through a real forward: GQA, right padding, the boost on in one
    layer (the fused masses carry it themselves, the reference gets mass_kernel.boosted). Its attention
    runs at a width that is a multiple of 8 (head dim 8 + 2 bits -> 16), which SDPA's
    memory-efficient kernel needs in 16 bits."""
    from model import VLM, TextConfig, VisionConfig, VLMConfig
    widths, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: ("enable_gqa" in kw and widths.append(  # decoder calls
                            (q.shape[-1], k.shape[-1], v.shape[-1]))) or sdpa(q, k, v, **kw))
    torch.manual_seed(0)
    cfg = VLMConfig(VisionConfig(32, 64, 1, 2, 8, 32), TextConfig(50, 48, 96, 3, 6, 2, 8), 2, 49)
    model = VLM(cfg).double()
    P, V, R, A = data.P, data.V, data.R, data.A
    spans = torch.tensor([[P] + [V] * 4 + [P, P] + [R] * 5 + [A, A],
                          [P] + [V] * 4 + [P] + [R] * 3 + [A] + [0] * 4])  # right padding
    ids = torch.randint(0, 49, spans.shape).masked_fill(spans == V, 49)
    pixels = torch.randn(2, 1, 3, 32, 32, dtype=torch.float64)
    rows, q_pos, _ = masses.query_rows(spans)
    groups = masses.key_groups(spans, ("image", "rationale"))  # disjoint, as mass_kernel.boosted needs
    got, weights = {}, torch.rand(3, 2, 6, rows.shape[1], 2, dtype=torch.float64)
    for f in (1.0, 3.0):
        model.boost_image_attention(f, [1])
        for impl in ("reference", "fused"):
            model.zero_grad()
            hook = masses.mass_fn(rows, q_pos, groups, 2, impl=impl, boost=model.boost_at)
            assert (hook.values is not None) == (impl == "fused") and hook.route == impl
            out = model(ids, pixels, torch.ones(2, 1, 32, 32, dtype=torch.long), (spans > 0).long(),
                        mass_layers=[0, 1, 2], mass_fn=hook, mass_values=hook.values)
            m = torch.stack([out.masses[i] for i in range(3)])
            (torch.log(m + 1e-6) * weights).sum().backward()  # any upstream gradient
            got[f, impl] = m.detach(), model.layers[0].self_attn.k_proj.weight.grad.clone()
    for f in (1.0, 3.0):
        (m_ref, g_ref), (m_fused, g_fused) = got[f, "reference"], got[f, "fused"]
        assert torch.allclose(m_fused, m_ref, atol=1e-12) and torch.allclose(g_fused, g_ref, atol=1e-10)
        assert m_ref[..., 0].max() > 0.1 and g_ref.abs().max() > 1e-3  # not zeros agreeing
    assert not torch.allclose(got[3.0, "fused"][0][1], got[1.0, "fused"][0][1])  # the boost is in layer 1
    auto = masses.mass_fn(rows, q_pos, groups, 2)  # on the CPU: fused, its bits handed to the model
    assert auto.route == "fused" and torch.equal(auto.values, masses.mass_fn(rows, q_pos, groups, 2,
                                                                            impl="fused").values)
    assert set(widths) == {(8, 8, 8), (16, 16, 16)}  # plain (the reference's runs), fused


def kernels_boosted(m, f):  # by hand: the image's probabilities times f, renormalised
    image, rest = m[..., :1] * f, m[..., 1:]
    return torch.cat([image, rest], -1) / (1 + (f - 1) * m[..., :1])
