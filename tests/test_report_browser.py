"""The report in a real browser (headless Chromium, `make test-report`): the page's JS runs without a console
error, shows every run and every benchmark, and its search and disagreement filter work."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from asft_repro.report import write_report
from test_report import N_ITEMS, make_report_outputs, run_names

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (`make test-report` installs it)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


def open_page(url: str) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and the console messages Chromium logged."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=120)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE(" in line or "Uncaught" in line]
    assert done.returncode == 0 and "</html>" in done.stdout, done.stderr[-2000:]
    return done.stdout, console


def status(dom: str) -> dict[str, str]:
    tag = re.search(r'<div id="js-status"[^>]*>', dom).group(0)
    return dict(re.findall(r'data-(\w+)="([^"]*)"', tag))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path, dict[str, int]]:
    tmp = tmp_path_factory.mktemp("report")
    root, differ = make_report_outputs(tmp)
    return root, write_report(root, "exp", use_wandb=False), differ


def test_page_runs_without_errors_and_shows_every_run_and_benchmark(report):
    root, page, _differ = report
    dom, console = open_page(page.resolve().as_uri())
    assert status(dom) == {"ready": "1", "errors": "0"} and console == []
    assert sorted(re.findall(r'<tr class="run" data-run="([^"]+)"', dom)) == run_names(root)
    benchmarks = re.findall(r'<section class="bench" data-benchmark="([^"]+)"', dom)
    assert sorted(benchmarks) == sorted(["math500", "minerva", "olympiadbench", "aime24", "amc23",
                                         "mmlu_medical", "medqa", "medmcqa"])
    total = len(benchmarks) * N_ITEMS
    assert len(re.findall(r'<tr class="item" data-g="\d+"', dom)) == total and f'data-shown="{total}"' in dom
    assert "Question 3 of medqa: what is 3 + 5?" in dom and "✓ x" in dom and "✗ x" in dom
    assert re.search(r'<img class="figure" alt="KL drift" src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', dom)


def test_filters_work_in_the_browser(report):
    _root, page, differ = report
    dom, console = open_page(page.resolve().as_uri() + "#disagree=1")
    assert status(dom)["errors"] == "0" and console == []
    assert f'data-shown="{sum(differ.values())}"' in dom
    dom, _console = open_page(page.resolve().as_uri() + "#disagree=1&bench=aime24")
    assert f'data-shown="{differ["aime24"]}"' in dom
    dom, _console = open_page(page.resolve().as_uri() + "#q=" + "question 7 of amc23")
    assert 'data-shown="1"' in dom


def test_a_broken_page_is_caught(report, tmp_path):
    """The error marker and the console check see a script error (so the checks above can fail)."""
    _root, page, _differ = report
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("</body>", "<script>notAFunction();</script></body>"))
    dom, console = open_page(broken.as_uri())
    assert status(dom)["errors"] == "1" and any("notAFunction" in line for line in console)
