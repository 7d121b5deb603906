"""Each task's Deck as a person sees it: the workflow runs locally (`pyflyte run`, twice, so that the
second run's gate has a production model to compare with), each task's deck.html opens in headless
Chromium, and every plot must be drawn on the screenshot while no request leaves the machine.

Chromium is Debian's package, driven over the DevTools protocol (tests/browser.py); when it is
missing, it is installed with apt-get in the background while the workflow runs.

`FLYTETUNE_SCREENSHOTS=docs/screenshots` also writes the README's screenshots, from a second run
that trains long enough for the plots to show something (about 1.5 min more).
"""

import base64
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flytekit.deck.deck import get_deck_template

from flytetune import plots
from tests.browser import Chromium, start_install, wait_for_install
from tests.conftest import REPO, TINY_CONFIG

pytestmark = pytest.mark.e2e

PYFLYTE = Path(sys.executable).parent / "pyflyte"
SCREENSHOTS = os.environ.get("FLYTETUNE_SCREENSHOTS")
# (task, Deck tab, plots it must draw at least, screenshot file name)
DECKS = [
    ("prepare", "Dataset profile", 2, "prepare.png"),
    # Loss and learning rate, throughput, validation, attempts (no GPU here: no GPU chart).
    ("train", "Training", 4, "train.png"),
    ("evaluate", "Test metrics", 2, "evaluate.png"),
    ("evaluate", "Gate", 1, "gate.png"),
]
WIDTH_PX = 1000
# A plot counts as drawn when this many of its pixels outside its legend are coloured (marks are;
# axes, grid and text are grey): a single point of a line chart is about 30 px.
MIN_COLOUR_PX = 20
# flytekit's own page template links a Google Fonts stylesheet for its tab titles; it is blocked like any
# other request (they fall back to Helvetica/Arial). Any other http(s) request is ours, and a failure.
TEMPLATE_URLS = frozenset(re.findall(r"https?://[^\"'\s)]+", get_deck_template().template))
README_MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def chromium_install():
    """Started first, so that apt-get (about 20 s on a fresh machine) runs while the workflow does."""
    return start_install()


@pytest.fixture(scope="module")
def deck_files(chromium_install, tmp_path_factory) -> dict[str, Path]:
    """{task: its deck.html} of the second of two local runs into one output folder."""
    root = tmp_path_factory.mktemp("decks")
    run_workflow(root, "train.max_steps=1 checkpoint.uri=null")
    # More steps for the README's pictures: a model that has learnt something, better than production.
    second = "train.max_steps=80 train.epochs=4 checkpoint.every_steps=20" if SCREENSHOTS else (
        "train.max_steps=2 checkpoint.every_steps=1")
    # The Training deck republished at every step (a step takes longer than 0.3 s here) and epoch end.
    return run_workflow(root, f"{second} checkpoint.uri={root / 'checkpoints'} train.deck_every_minutes=0.005")


@pytest.fixture(scope="module")
def browser(chromium_install, tmp_path_factory):
    with Chromium(wait_for_install(chromium_install), tmp_path_factory.mktemp("chromium")) as chromium:
        yield chromium


def run_workflow(root: Path, overrides: str) -> dict[str, Path]:
    """`pyflyte run` on the tiny config, with flytekit's local cache off and its temporary files under
    `root`; {task name: the deck.html flytekit wrote}, found in flytekit's log line for each."""
    (root / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(root), "TMPDIR": str(root / "tmp"), "FLYTE_LOCAL_CACHE_ENABLED": "false",
           "FLYTE_SDK_LOGGING_LEVEL": "20", "FLYTE_SDK_RICH_TRACEBACKS": "0"}
    done = subprocess.run([str(PYFLYTE), "run", "workflows/finetune.py", "finetune", "--config", str(TINY_CONFIG),
                           "--output_uri", str(root / "bucket"), "--overrides", overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "Published(" in log, log[-3000:]
    written = re.findall(r"(\w+) task creates flyte deck html to file://(\S+?/deck\.html)", log)
    found = dict(written)  # each task's last: the one it writes when it ends
    assert {"prepare", "train", "evaluate"} <= set(found), f"deck files found: {found}"
    # Published while training ran (Deck.publish; flytekit names the task differently in those log lines).
    live = [Path(path) for _, path in written if 'data-running="true"' in Path(path).read_text()]
    return {**{task: Path(path) for task, path in found.items()}, "live": live}


def deck_page(tabs: dict[str, str]) -> str:
    """A deck.html as flytekit writes it (flytekit/deck/deck.py `_get_deck`), with these tabs."""
    nav = "".join(f'<li onclick="handleLinkClick(this)">{html.escape(name)}</li>' for name in tabs)
    return get_deck_template().substitute(NAV_HTML=nav, BODY_HTML="".join(f"<div>{v}</div>" for v in tabs.values()))


# In the Deck page: click the tab, and describe what it shows (CSS pixels, page coordinates).
SHOW_TAB = """(tab => {
  const li = [...document.querySelectorAll('#flyte-frame-tabs li')].find(l => l.textContent.trim() === tab);
  if (!li) return null;
  li.click();
  const pane = document.querySelector('#flyte-frame-container > div.active');
  const box = e => { const r = e.getBoundingClientRect();
                     return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}; };
  const drawn = m => { const r = m.getBoundingClientRect();
                       return m.tagName === 'polyline' ? r.width + r.height > 0 : r.width * r.height > 0; };
  return {height: document.documentElement.scrollHeight, pane: box(pane),
          plots: [...pane.querySelectorAll('svg.flytetune-plot')].map(svg => ({
            kind: svg.dataset.plot, title: svg.getAttribute('aria-label'), box: box(svg),
            legends: [...svg.querySelectorAll('.legend')].map(box),
            marks: [...svg.querySelectorAll('rect, polyline, circle')]
                     .filter(m => m.querySelector('title') && drawn(m)).length}))};
})(%s)"""

# In a blank page: decode the screenshot and count, per region, pixels that are not white ("ink")
# and pixels with colour (max - min channel > 40: marks; text, axes and grid are grey), less those
# of the region's legends (a legend is coloured with nothing plotted).
COUNT_PIXELS = """(async (png, regions) => {
  const img = new Image(); img.src = 'data:image/png;base64,' + png; await img.decode();
  const canvas = document.createElement('canvas'); canvas.width = img.width; canvas.height = img.height;
  const g = canvas.getContext('2d'); g.drawImage(img, 0, 0);
  const count = b => {
    const w = Math.max(1, Math.floor(b.width)), h = Math.max(1, Math.floor(b.height));
    const d = g.getImageData(Math.floor(b.x), Math.floor(b.y), w, h).data;
    let ink = 0, colour = 0;
    for (let i = 0; i < d.length; i += 4) {
      const hi = Math.max(d[i], d[i + 1], d[i + 2]), lo = Math.min(d[i], d[i + 1], d[i + 2]);
      if (lo < 230) ink++;
      if (hi - lo > 40) colour++;
    }
    return {ink, colour};
  };
  return regions.map(([box, legends]) => {
    const all = count(box), minus = legends.map(count);
    return {ink: all.ink, colour: all.colour - minus.reduce((n, c) => n + c.colour, 0)};
  });
})(%s, %s)"""


def inspect(browser: Chromium, deck: Path, tab: str, min_plots: int) -> tuple[list[str], bytes, dict]:
    """Open `deck`, show `tab`, screenshot the page; return (problems, the PNG, what the tab shows).
    No problems: the tab exists, no script error, no request but file:// and data: (and flytekit's
    template link), at least `min_plots` plots, each with drawn marks and coloured pixels."""
    page = browser.open(deck.resolve().as_uri(), WIDTH_PX, 800)
    shown = page.evaluate(SHOW_TAB % json.dumps(tab))
    if shown is None:
        return [f"{deck}: no tab {tab!r}"], b"", {}
    # The whole page in the viewport: nothing left to load lazily below the fold.
    page.resize(WIDTH_PX, min(shown["height"], 16_000))
    png = page.screenshot(0, 0, WIDTH_PX, shown["height"])
    problems = [f"script error: {e}" for e in page.exceptions()]
    problems += [f"request to {url}" for url in page.requests()
                 if not url.startswith(("file:", "data:", "about:")) and url not in TEMPLATE_URLS]
    regions = [[shown["pane"], []], *([p["box"], p["legends"]] for p in shown["plots"])]
    counts = browser.open("about:blank").evaluate(
        COUNT_PIXELS % (json.dumps(base64.b64encode(png).decode()), json.dumps(regions)))
    pane, per_plot = counts[0], counts[1:]
    if pane["ink"] < 2000:
        problems.append(f"{tab}: the tab is (nearly) empty: {pane['ink']} px of ink")
    if len(shown["plots"]) < min_plots:
        problems.append(f"{tab}: {len(shown['plots'])} plot(s), expected at least {min_plots}")
    for plot, pixels in zip(shown["plots"], per_plot, strict=True):
        plot["pixels"] = pixels
        if plot["marks"] == 0 or pixels["colour"] < MIN_COLOUR_PX:
            problems.append(f"{tab}: plot {plot['title']!r} ({plot['kind']}) is not drawn: {plot['marks']} marks, "
                            f"{pixels['colour']} coloured px (need {MIN_COLOUR_PX})")
    return problems, png, shown


@pytest.mark.parametrize(("task", "tab", "min_plots", "picture"), DECKS, ids=[tab for _, tab, _, _ in DECKS])
def test_each_deck_draws_its_plots_in_chromium_offline(deck_files, browser, tmp_path, task, tab, min_plots, picture):
    problems, png, shown = inspect(browser, deck_files[task], tab, min_plots)
    (tmp_path / picture).write_bytes(png)  # to look at when this fails
    assert problems == [], f"{deck_files[task]}, screenshot {tmp_path / picture}"
    if SCREENSHOTS:
        save_readme_screenshot(browser, deck_files[task], tab, shown, Path(SCREENSHOTS) / picture)


def test_the_training_deck_is_published_while_the_run_goes(deck_files, browser, tmp_path):
    """Before the task ended, its Training deck was written with the run in progress (at steps 1 and
    2, and at the epoch's end); the last such page draws its plots like the final one."""
    live = deck_files["live"]
    assert len(live) >= 2, f"live Training decks: {live}"
    statuses = [re.search(r'data-running="true"><b>(Running: step (\d+) of (\d+)[^<]*)', p.read_text()) for p in live]
    assert all(statuses), [p.read_text()[:500] for p, found in zip(live, statuses, strict=True) if not found]
    assert [int(s.group(2)) for s in statuses] == sorted(int(s.group(2)) for s in statuses), "published in order"
    first, last = statuses[0], statuses[-1]
    assert int(first.group(2)) < int(first.group(3)), f"the first page is from before the last step: {first.group(1)}"
    final = deck_files["train"].read_text()
    assert 'data-running="false"><b>Finished:' in final and last.group(1) not in final
    problems, png, shown = inspect(browser, live[-1], "Training", 4)
    (tmp_path / "live.png").write_bytes(png)
    assert problems == [], f"{live[-1]}, screenshot {tmp_path / 'live.png'}"
    assert [p["kind"] for p in shown["plots"]] == ["line", "line", "line", "timeline"]


def save_readme_screenshot(browser: Chromium, deck: Path, tab: str, shown: dict, path: Path) -> None:
    """The tab bar and the top of the tab, scaled down until the PNG is under README_MAX_BYTES."""
    page = browser.open(deck.resolve().as_uri(), WIDTH_PX, 800)
    page.evaluate(SHOW_TAB % json.dumps(tab))
    height = min(shown["pane"]["y"] + shown["pane"]["height"], 1800)
    page.resize(WIDTH_PX, int(height))
    for scale in (0.8, 0.7, 0.6, 0.5):
        png = page.screenshot(0, 0, WIDTH_PX, height, scale)
        if len(png) < README_MAX_BYTES:
            break
    assert len(png) < README_MAX_BYTES, f"{path}: {len(png)} bytes even at scale {scale}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)


def test_an_empty_plot_is_caught(browser, tmp_path):
    """The check above fails on a plot with axes and a legend but nothing in them, and on one with no data."""
    good = plots.bar_chart(["a", "b", "c"], {"rows": [30, 12, 7]}, title="drawn")
    empty = plots.bar_chart(["a", "b"], {"train": [0, 0], "test": [0, 0]}, title="all zero")
    nothing = plots.line_chart({"loss": []}, title="no points", x_label="step")
    deck = tmp_path / "deck.html"
    deck.write_text(deck_page({"Timeline": "<p>t</p>", "Mine": good + empty + nothing}))
    problems, _, shown = inspect(browser, deck, "Mine", 3)
    assert [re.match(r"Mine: plot '([^']+)' \(\w+\) is not drawn", p).group(1) for p in problems] == [
        "all zero", "no points"], problems
    assert shown["plots"][0]["pixels"]["colour"] >= MIN_COLOUR_PX


def test_a_request_for_the_network_is_caught(browser, tmp_path):
    """A deck that loads anything from outside (a CDN script, an image) fails the check."""
    good = plots.bar_chart(["a", "b", "c"], {"rows": [30, 12, 7]}, title="drawn")
    cdn = '<script src="https://cdn.example.com/plotly.min.js"></script><img src="http://example.org/x.png">'
    deck = tmp_path / "deck.html"
    deck.write_text(deck_page({"Mine": good + cdn}))
    problems, _, _ = inspect(browser, deck, "Mine", 1)
    assert sorted(problems) == ["request to http://example.org/x.png", "request to https://cdn.example.com/plotly.min.js"]
