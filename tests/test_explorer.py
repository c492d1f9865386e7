"""report.html in a real browser (headless Chromium driven by Selenium): it loads from disk with no
console error and no network request; pointing at a reply token lays that token's weights from
report.json over the image, cell by cell; the layer selector and the arrow keys change them; a second
model follows where the replies agree; a 1280 x 800 screenshot shows the overlay change between two
tokens. Without the browser the test fails and says how to install it (never a silent skip)."""
import io
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_mod
import train as trainer
from analysis import report as report_mod
from analysis import explorer

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or \
    "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A small model trained a few steps, evaluated as itself and under the test-time intervention
    (two models whose replies and weights differ), written as a report."""
    out = tmp_path_factory.mktemp("report")
    cfg = trainer.TrainConfig(out=str(out / "run"), n_train=64, n_eval=4, batch_size=8, max_steps=12,
                                 warmup=2, save_every=0, log_every=100, device="cpu")
    result = trainer.train(cfg)
    model, proc, layers = result["model"], result["proc"], result["layers"]
    recs = result["eval_records"][:4]
    results = {"plain": eval_mod.evaluate(model, proc, recs, result["train_records"], layers,
                                          max_new_tokens=24, explore=3)}
    model.boost_image_attention(4.0)
    results["boosted"] = eval_mod.evaluate(model, proc, recs, result["train_records"], layers,
                                           max_new_tokens=24, explore=3)
    model.boost_image_attention(1.0)
    report_mod.write_report(results, str(out), {"data": "synthetic"})
    return out, json.load(open(out / "report.json"))["results"], (model, proc, recs, layers)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"selenium is not installed ({e}): pip install -r requirements-test.txt")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.fail("no headless browser: install Chromium and its driver (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run does)")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND"):  # a request that slipped out would fail loudly
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # a 1280 x 800 viewport, 1 pixel per px
                           {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()


def expected_alpha(item, weights):
    """What the page must paint for these weights (explorer.html's heat(): a cell's weight spread over
    its pixels, overlapping cells adding up, the brightest pixel 1; alpha = 0.6 x heat)."""
    s = min(1, 256 / max(item["width"], item["height"]))
    W, H = max(1, math.floor(item["width"] * s + 0.5)), max(1, math.floor(item["height"] * s + 0.5))
    heat = np.zeros((H, W))
    for (x0, y0, x1, y1), w in zip(item["boxes"], weights):
        x0, y0 = max(math.floor(x0 * s + 0.5), 0), max(math.floor(y0 * s + 0.5), 0)
        x1, y1 = min(math.floor(x1 * s + 0.5), W), min(math.floor(y1 * s + 0.5), H)
        if x1 > x0 and y1 > y0:
            heat[y0:y1, x0:x1] += w / ((x1 - x0) * (y1 - y0))
    return np.floor(153 * heat / heat.max() + 0.5)


def painted(driver, model=0):
    """The overlay canvas's alpha channel, read back from the page."""
    w, h, px = driver.execute_script(
        "const c = document.querySelector('#m%d canvas');"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, "
        "c.height).data)];"
        % model)
    return np.array(px).reshape(h, w, 4)[..., 3]


def point_at(driver, model, i):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    token = driver.find_elements(By.CSS_SELECTOR, f"#m{model} .tok")[i]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", token)
    ActionChains(driver).move_to_element(token).perform()
    return token


def test_the_page_loads_offline_and_quietly(report, browser):
    out, _, _ = report
    browser.get((out / "report.html").as_uri())
    assert browser.find_elements("css selector", ".tok")
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    sent = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in sent if m["method"] == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
    assert os.path.getsize(out / "report.html") < 8e6


def test_pointing_at_a_token_lays_its_weights_over_the_image(report, browser):
    out, results, _ = report
    browser.get((out / "report.html").as_uri())
    item = results["plain"]["explore"][0]
    mean = lambda i: np.mean([layer[i] for layer in item["weights"]], 0)  # the default: mean of the layers
    shown = {}
    for i in (2, 7):
        token = point_at(browser, 0, i)
        assert "on" in token.get_attribute("class")
        got = painted(browser)
        assert np.abs(got - expected_alpha(item, mean(i))).max() <= 1
        shown[i] = got
    assert not np.array_equal(shown[2], shown[7])  # two tokens, two pictures
    from selenium.webdriver.support.ui import Select
    Select(browser.find_element("id", "layer")).select_by_value(str(item["layers"][1]))
    point_at(browser, 0, 7)
    assert np.abs(painted(browser) - expected_alpha(item, item["weights"][1][7])).max() <= 1
    from selenium.webdriver.common.keys import Keys
    browser.find_element("tag name", "body").send_keys(Keys.ARROW_RIGHT)
    assert np.abs(painted(browser) - expected_alpha(item, item["weights"][1][8])).max() <= 1


def hand_made_page(tmp_path, tokens_b):
    """A page written from hand-made items: a 96 x 64 image cut into 3 x 2 tiles of 32 px plus the
    global image (28 image tokens whose boxes overlap), two models with replies a b c and tokens_b,
    weights given by hand (one layer)."""
    import data
    proc = data.new_processor(["a question and an answer"] * 4, tile=32, image_seq_len=4, vocab_size=300,
                              split=True)
    Image.new("RGB", (96, 64), "white").save(tmp_path / "im.png")
    boxes = [list(b) for b in proc.image_token_boxes(96, 64)]
    rng = np.random.default_rng(0)
    item = lambda tokens: {"index": 0, "question": "How many </script><b>?", "answer": "1", "reply": "own",
                           "image": str(tmp_path / "im.png"), "width": 96, "height": 64, "boxes": boxes,
                           "tokens": tokens, "layers": [0],
                           "weights": [rng.dirichlet(np.ones(len(boxes)), len(tokens)).round(4).tolist()]}
    results = {"a": {"explore": [item(["a", "b", "c"])]}, "b": {"explore": [item(tokens_b)]}}
    explorer.write_html(str(tmp_path / "page.html"), results, [], [], {})
    return tmp_path / "page.html", results


def test_overlapping_tiles_and_the_global_image_add_up_per_pixel(browser, tmp_path):
    page, results = hand_made_page(tmp_path, ["a", "b", "c"])
    item = results["a"]["explore"][0]
    assert len(item["boxes"]) == 7 * 4  # 6 tiles and the global image, 4 cells each
    browser.get(page.as_uri())
    # text, not markup
    assert "Q: How many </script><b>?" in browser.find_element("css selector", "#m0 p").text
    for i in range(3):
        point_at(browser, 0, i)
        assert np.abs(painted(browser) - expected_alpha(item, item["weights"][0][i])).max() <= 1


def test_the_second_model_follows_where_the_replies_agree(browser, tmp_path):
    page, results = hand_made_page(tmp_path, ["a", "x", "c"])
    b = results["b"]["explore"][0]
    browser.get(page.as_uri())
    point_at(browser, 0, 0)  # "a" in both: the second model shows its own weights for its "a"
    assert np.abs(painted(browser, 1) - expected_alpha(b, b["weights"][0][0])).max() <= 1
    assert "on" in browser.find_elements("css selector", "#m1 .tok")[0].get_attribute("class")
    for i in (1, 2):  # past where they part ("b" against "x"), nothing
        point_at(browser, 0, i)
        assert painted(browser, 1).max() == 0
        assert not browser.find_elements("css selector", "#m1 .tok.on")


def test_a_screenshot_shows_the_overlay_change(report, browser, tmp_path):
    """Two tokens whose overlays differ most (by report.json): a 1280 x 800 screenshot for each, whose
    pixels over the image differ."""
    out, results, _ = report
    browser.get((out / "report.html").as_uri())
    item = results["plain"]["explore"][0]
    alpha = [expected_alpha(item, np.mean([layer[i] for layer in item["weights"]], 0))
             for i in range(min(len(item["tokens"]), 20))]
    i, j = max(((i, j) for i in range(len(alpha)) for j in range(i)),
               key=lambda p: np.abs(alpha[p[0]] - alpha[p[1]]).max())
    crops = []
    browser.execute_script("document.querySelector('#m0 .picture').scrollIntoView()")
    for k in (i, j):
        from selenium.webdriver.common.action_chains import ActionChains
        ActionChains(browser).move_to_element(browser.find_elements("css selector", "#m0 .tok")[k]).perform()
        shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        shot.save(tmp_path / f"token{k}.png")
        assert shot.size == (1280, 800)
        r = browser.execute_script("const r = document.querySelector('#m0 canvas').getBoundingClientRect();"
                                   "return [r.left, r.top, r.right, r.bottom];")
        crops.append(np.asarray(shot.crop(tuple(round(v) for v in r)), dtype=np.int16))
    assert np.abs(alpha[i] - alpha[j]).max() > 20  # the weights differ visibly
    assert np.abs(crops[0] - crops[1]).max() > 5  # and so do the overlay pixels on the screen


def test_explore_items_are_the_attention_of_the_models_own_reply(report):
    """report.json's weights are explorer.image_attention's (the PNG heatmaps' pass, checked against
    transformers' eager attention in test_train) on the model's own greedy reply, per layer; the
    tokens are that reply's pieces."""
    out, results, (model, proc, recs, layers) = report
    item = results["plain"]["explore"][0]
    text = eval_mod.generate_answers(model, proc, [recs[item["index"]]], max_new_tokens=24)[0]
    weights, ids = explorer.image_attention(model, proc, {**recs[item["index"]], "reply": text.strip()},
                                            layers)
    assert item["layers"] == layers and item["reply"] == "own"
    assert np.abs(np.array(item["weights"]) - weights.numpy()).max() <= 5e-5  # rounded to 4 decimals
    assert "".join(item["tokens"]) == proc.decode(ids.tolist(), skip_special_tokens=False)
    assert "".join(item["tokens"]).startswith(" " + text.strip())
    assert len(item["boxes"]) == weights.shape[-1] == int((torch.tensor(data_ids(proc, recs[item["index"]]))
                                                           == proc.image_token_id).sum())


def data_ids(proc, rec):
    import data
    return data.encode_record(proc, rec)["input_ids"]
