"""`python -m dsink.plots_page`: the `dvc plots show` page with vega inlined renders with no network.

A throwaway git + DVC repo declares the same kinds of plots as our dvc.yaml (a multi-y scatter from a
per_class.json-like list, a confusion template, a dvclive-style TSV, PNG image plots); the page built
there is checked for remote scripts, then opened in headless Chromium with every network request routed
to a dead proxy: the DOM must hold one vega canvas per vega plot and the image plots, and the screenshot
must show the colours only vega draws (DVC's scatter/line purple, the confusion heatmap's dark blue) and
the PNG's red. DVC's stock page (CDN scripts) is opened the same way as a control: it must stay blank.

The vega JavaScript comes from the project's cache (.dsink/vendor/, filled once with `npm pack`); the
tests skip when it cannot be had, and the browser test skips when Chromium is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsink import plots_page
from dsink.errors import DsinkError

ROOT = Path(__file__).resolve().parents[1]
VENDOR = Path(os.environ.get("DSINK_VENDOR_DIR") or ROOT / ".dsink" / "vendor")


def _find_chromium() -> str | None:
    """$CHROMIUM if set, else chromium / chromium-browser on PATH, else Debian's /usr/bin/chromium."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("/usr/bin/chromium")


CHROMIUM = _find_chromium()
DVC_PURPLE = (0x94, 0x5D, 0xD6)  # first colour of DVC's palette: scatter points and line of one revision
HEATMAP_BLUE = (28, 49, 133)  # darkest cell of vega's yellowgreenblue scheme (the confusion diagonal)
PNG_RED = (220, 20, 20)  # the test image's fill, in no vega palette
N_VEGA_PLOTS = 3  # per_class_accuracy, confusion, the dvclive TSV

DVC_YAML = """\
plots:
  - per_class_accuracy:
      title: Per-class test accuracy vs training class size
      template: scatter
      x:
        plots/per_class.json: class_size
      y:
        plots/per_class.json: [dsink, imbalance_teacher, noise_teacher]
  - confusion:
      title: confusion matrix
      template: confusion
      x:
        plots/confusion.json: predicted
      y:
        plots/confusion.json: actual
  - dvclive/student/plots/metrics:
      x: step
  - plots/per_class.png
"""


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1"}


def _run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120, **kw)


def _git(repo: Path, *args: str) -> None:
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    _run(["git", *ident, *args], repo, check=True)


def _write_plots(repo: Path, shift: float = 0.0) -> None:
    (repo / "plots").mkdir(exist_ok=True)
    rows = [
        {
            "class": c,
            "class_name": f"c{c}",
            "class_size": int(5000 * 0.5**c),
            "dsink": 0.9 - 0.05 * c + shift,
            "imbalance_teacher": 0.8 - 0.03 * c,
            "noise_teacher": 0.85 - 0.07 * c,
        }
        for c in range(6)
    ]
    (repo / "plots" / "per_class.json").write_text(json.dumps(rows, indent=2))
    names = [f"c{c}" for c in range(4)]
    pairs = [
        {"actual": names[i], "predicted": names[j]}
        for i in range(4)
        for j in range(4)
        for _ in range(12 if i == j else (i + 2 * j) % 4)
    ]
    (repo / "plots" / "confusion.json").write_text(json.dumps(pairs))
    tsv = repo / "dvclive" / "student" / "plots" / "metrics" / "train"
    tsv.mkdir(parents=True, exist_ok=True)
    losses = "".join(f"{s}\t{2 / (s + 1) + shift}\n" for s in range(10))
    (tsv / "loss.tsv").write_text("step\tloss\n" + losses)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(3, 2), dpi=100, facecolor=np.array(PNG_RED) / 255)
    fig.savefig(repo / "plots" / "per_class.png", facecolor=fig.get_facecolor())
    plt.close(fig)


@pytest.fixture(scope="module")
def vendor_dir() -> Path:
    try:
        plots_page.vendor_scripts(VENDOR, npm_timeout=90)
    except plots_page.VendorUnavailable as exc:
        pytest.skip(f"cannot test the offline page: {exc}")
    return VENDOR


@pytest.fixture(scope="module")
def repo(tmp_path_factory, vendor_dir) -> Path:
    repo = tmp_path_factory.mktemp("plots_repo")
    _run(["git", "init", "-q"], repo, check=True)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo, check=True)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo, check=True)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _write_plots(repo)
    return repo


def _plots_page(repo: Path, vendor_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dsink.plots_page", "--vendor-dir", str(vendor_dir), *args], repo)


@pytest.fixture(scope="module")
def page(repo, vendor_dir) -> Path:
    proc = _plots_page(repo, vendor_dir, "--out", "dvc_plots")
    assert proc.returncode == 0, proc.stderr
    return repo / "dvc_plots" / "index.html"


def test_page_inlines_vega_and_loads_nothing_remote(page, vendor_dir):
    html = page.read_text(encoding="utf-8")
    assert plots_page.remote_scripts(html) == []
    assert "cdn.jsdelivr" not in html
    for lib in plots_page.VENDOR_LIBS:
        code = (vendor_dir / lib.filename).read_text(encoding="utf-8")
        assert code[:2000] in html, f"{lib.spec} is not inlined"
    assert html.count("vegaEmbed('#") == N_VEGA_PLOTS
    img = page.parent / "static" / "workspace_plots_per_class.png"
    assert img.is_file() and 'src="static/workspace_plots_per_class.png"' in html


def test_diff_page_has_both_revisions(repo, vendor_dir, tmp_path):
    work = tmp_path / "diff_repo"
    shutil.copytree(repo, work, ignore=shutil.ignore_patterns("dvc_plots"))
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "plots")
    _write_plots(work, shift=0.05)
    proc = _plots_page(work, vendor_dir, "--out", "diff_plots", "--diff", "HEAD")
    assert proc.returncode == 0, proc.stderr
    html = (work / "diff_plots" / "index.html").read_text(encoding="utf-8")
    assert plots_page.remote_scripts(html) == []
    assert '"HEAD"' in html and '"workspace"' in html
    assert (work / "diff_plots" / "static" / "HEAD_plots_per_class.png").is_file()


def test_no_npm_and_empty_cache_is_one_line_exit_2(tmp_path):
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    env = {**_env(), "PATH": str(empty_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "dsink.plots_page", "--vendor-dir", str(tmp_path / "vendor")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "npm is not installed" in lines[0], proc.stderr


def test_placeholder_in_vendor_code_is_refused():
    with pytest.raises(DsinkError, match="placeholder"):
        plots_page._inline("var a = '{plot_divs}';", "x")
    assert "<\\/script" in plots_page._inline("var s = '</script>';", "x")
    assert plots_page.remote_scripts('<script src="https://a/b.js"></script><script>1</script>') == [
        "https://a/b.js"
    ]


def _chromium(tmp: Path, url: str, *mode: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp}",
        # no network at view time: every http(s) request goes to a closed port, every name fails to resolve
        "--proxy-server=http://127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--window-size=1200,2000",
        "--virtual-time-budget=10000",
        *mode,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _count_near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> int:
    return int((np.abs(img - np.array(rgb)).sum(-1) < tol).sum())


@pytest.mark.timeout(180)
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_page_renders_offline_in_headless_chromium(page, repo, tmp_path):
    url = page.as_uri()
    dom = _chromium(tmp_path / "profile_dom", url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="vega-embed') == N_VEGA_PLOTS
    assert dom.stdout.count('class="marks"') == N_VEGA_PLOTS, "vega-embed did not render every plot"
    assert '<img src="static/workspace_plots_per_class.png"' in dom.stdout

    shot = tmp_path / "page.png"
    proc = _chromium(tmp_path / "profile_shot", url, f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    import matplotlib.image

    img = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)
    keep = os.environ.get("DSINK_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    assert _count_near(img, DVC_PURPLE) > 200, "no scatter/line marks drawn"
    assert _count_near(img, HEATMAP_BLUE) > 2000, "no confusion heatmap drawn"
    assert _count_near(img, PNG_RED) > 20000, "image plot not shown"

    # control: DVC's stock page (scripts from the CDN) draws no vega plot under the same conditions
    stock = repo / "stock_plots"
    proc = _run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(stock)], repo)
    assert proc.returncode == 0, proc.stderr
    assert plots_page.remote_scripts((stock / "index.html").read_text(encoding="utf-8"))
    dom = _chromium(tmp_path / "profile_stock", (stock / "index.html").as_uri(), "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'class="marks"' not in dom.stdout
