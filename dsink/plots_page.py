"""`dvc plots show` / `dvc plots diff` as a page that renders offline (no CDN).

    .venv/bin/python -m dsink.plots_page [--out dvc_plots] [--diff [REV ...]]      (or: make plots)

DVC's default page loads vega, vega-lite and vega-embed from cdn.jsdelivr.net, so without network the
vega plots (per-class accuracy, confusion matrix, dvclive curves) are blank; only the PNG image plots
show. This module writes an HTML template with the three libraries *inlined* (DVC's ``{plot_divs}``
placeholder and no ``{scripts}`` placeholder, so DVC adds no CDN ``<script src>``) and runs
``dvc plots show --html-template TEMPLATE -o OUT`` (``dvc plots diff REV... --html-template ...`` with
``--diff``). ``OUT/index.html`` then needs nothing but the files beside it.

The libraries are the versions DVC's own page uses (``dvc_render.vega.VegaRenderer.SCRIPTS``). They are
read from a local cache, ``.dsink/vendor/`` at the repository root (gitignored), or fetched into it once
with ``npm pack`` from the npm registry (the only network access, and only the first time). Each file is
checked against a pinned SHA-256, so the cache and the registry both have to serve the exact bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dsink.errors import DsinkError


class VendorUnavailable(DsinkError):
    """The vega JavaScript is neither cached nor fetchable (no npm, no registry access)."""


@dataclass(frozen=True)
class VendorLib:
    package: str  # npm package name
    version: str  # same as DVC's CDN page (dvc_render 1.0.x)
    member: str  # the file inside the npm tarball
    sha256: str  # of that file

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def filename(self) -> str:
        return f"{self.package}-{self.version}.min.js"


# Order matters: vega-embed needs the globals `vega` and `vegaLite`.
VENDOR_LIBS = (
    VendorLib(
        "vega",
        "5.20.2",
        "package/build/vega.min.js",
        "4794d0169cb1f3ebad8117fe98ba5bd652dd725905ec0384e832391dbccb03be",
    ),
    VendorLib(
        "vega-lite",
        "5.2.0",
        "package/build/vega-lite.min.js",
        "d73157451b3978015ab31dacd55ff90d986ab8663fc0abed50f97b3cd90002cb",
    ),
    VendorLib(
        "vega-embed",
        "6.18.2",
        "package/build/vega-embed.min.js",
        "1ba9826431ddc9805e815ad92acc811c819f2bfd32bda2a128b8c4b5070fab5e",
    ),
)

TEMPLATE_NAME = "offline_plots_template.html"
NPM_TIMEOUT_S = 180
# dvc_render's HTML.embed() replaces these in the template with str.replace; inlined code must not hold them
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline)</title>
    <!-- {libs}: inlined by dsink.plots_page, so this page fetches no script -->
{inline_scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def find_repo_root(start: Path | None = None) -> Path:
    """The nearest ancestor of ``start`` (default: cwd) holding ``.dvc``, else ``start`` itself."""
    start = (start or Path.cwd()).resolve()
    for d in (start, *start.parents):
        if (d / ".dvc").is_dir():
            return d
    return start


def default_vendor_dir() -> Path:
    env = os.environ.get("DSINK_VENDOR_DIR")
    return Path(env) if env else find_repo_root() / ".dsink" / "vendor"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cached(lib: VendorLib, vendor_dir: Path) -> bytes | None:
    path = vendor_dir / lib.filename
    if not path.is_file():
        return None
    data = path.read_bytes()
    return data if _sha256(data) == lib.sha256 else None  # a corrupt/partial cache file is refetched


def _npm_fetch(libs: list[VendorLib], vendor_dir: Path, timeout: float) -> None:
    npm = shutil.which("npm")
    missing = ", ".join(lib.spec for lib in libs)
    if npm is None:
        raise VendorUnavailable(
            f"vega JavaScript not cached in {vendor_dir} and npm is not installed: install npm "
            f"(apt-get install npm) and rerun once with registry access, or put {missing} "
            f"build/*.min.js files there as <name>-<version>.min.js"
        )
    with tempfile.TemporaryDirectory(prefix="dsink-npm-") as tmp:
        cmd = [npm, "pack", "--silent", "--ignore-scripts", "--fetch-retries=1", "--fetch-timeout=60000"]
        cmd += [lib.spec for lib in libs]
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VendorUnavailable(
                f"`npm pack {missing}` took over {timeout:g} s (no registry access?); "
                f"rerun where the npm registry is reachable, or fill {vendor_dir} by hand"
            ) from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise VendorUnavailable(
                f"`npm pack {missing}` failed (exit {proc.returncode}): {last}; rerun where the npm "
                f"registry is reachable, or fill {vendor_dir} by hand"
            )
        for lib in libs:
            tgz = Path(tmp) / f"{lib.package}-{lib.version}.tgz"
            if not tgz.is_file():
                raise DsinkError(f"`npm pack {lib.spec}` did not write {tgz.name}")
            with tarfile.open(tgz, "r:gz") as tar:
                try:
                    member = tar.extractfile(lib.member)
                except KeyError:
                    member = None
                if member is None:
                    raise DsinkError(f"{tgz.name} has no {lib.member}")
                data = member.read()
            if _sha256(data) != lib.sha256:
                raise DsinkError(
                    f"{lib.spec} {lib.member} has SHA-256 {_sha256(data)}, expected {lib.sha256} "
                    "(registry serving different bytes?)"
                )
            _write_atomic(vendor_dir / lib.filename, data)


def vendor_scripts(
    vendor_dir: Path | None = None, npm_timeout: float = NPM_TIMEOUT_S
) -> list[tuple[VendorLib, str]]:
    """The three libraries' code, from ``vendor_dir`` or fetched there with npm (DsinkError if neither)."""
    vendor_dir = Path(vendor_dir) if vendor_dir is not None else default_vendor_dir()
    missing = [lib for lib in VENDOR_LIBS if _cached(lib, vendor_dir) is None]
    if missing:
        _npm_fetch(missing, vendor_dir, npm_timeout)
    out = []
    for lib in VENDOR_LIBS:
        data = _cached(lib, vendor_dir)
        if data is None:  # pragma: no cover - _npm_fetch wrote and checked it
            raise DsinkError(f"{vendor_dir / lib.filename} missing after fetching it")
        out.append((lib, data.decode("utf-8")))
    return out


def _inline(code: str, name: str) -> str:
    """``code`` safe inside ``<script>...</script>`` and through dvc_render's placeholder replacement."""
    for ph in DVC_PLACEHOLDERS:
        if ph in code:
            raise DsinkError(f"{name} contains DVC's template placeholder {ph}; cannot inline it")
    # '</script' would close the element early; in minified code it only occurs inside string literals,
    # where '<\/' reads the same
    code = code.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    return f'    <script type="text/javascript">/* {name} */\n{code}\n    </script>'


def build_template(vendor_dir: Path | None = None) -> str:
    scripts = vendor_scripts(vendor_dir)
    return PAGE.format(
        refresh_tag="{refresh_tag}",
        plot_divs="{plot_divs}",
        libs=", ".join(lib.spec for lib, _ in scripts),
        inline_scripts="\n".join(_inline(code, lib.spec) for lib, code in scripts),
    )


def write_template(vendor_dir: Path | None = None) -> Path:
    """Write (or refresh) the offline template in ``vendor_dir`` and return its path."""
    vendor_dir = Path(vendor_dir) if vendor_dir is not None else default_vendor_dir()
    page = build_template(vendor_dir).encode("utf-8")
    path = vendor_dir / TEMPLATE_NAME
    if not path.is_file() or path.read_bytes() != page:
        _write_atomic(path, page)
    return path


def dvc_command(template: Path, out: str, diff: list[str] | None) -> list[str]:
    sub = ["plots", "diff", *diff] if diff is not None else ["plots", "show"]
    return [sys.executable, "-m", "dvc", *sub, "--html-template", str(template.resolve()), "-o", out]


def remote_scripts(html: str) -> list[str]:
    """``<script src=...>`` values in ``html`` that point to the network."""
    srcs = re.findall(r"<script\b[^>]*\bsrc\s*=\s*[\"']?([^\"'\s>]+)", html, flags=re.IGNORECASE)
    return [s for s in srcs if re.match(r"(https?:)?//", s, flags=re.IGNORECASE)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dsink.plots_page",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", default="dvc_plots", help="output folder (default: dvc_plots)")
    ap.add_argument(
        "--diff",
        nargs="*",
        metavar="REV",
        default=None,
        help="`dvc plots diff REV...` instead of `dvc plots show` (no REV: workspace against HEAD)",
    )
    ap.add_argument(
        "--vendor-dir",
        type=Path,
        default=None,
        help="cache of the vega JavaScript (default: $DSINK_VENDOR_DIR or <repo>/.dsink/vendor)",
    )
    args = ap.parse_args(argv)
    try:
        template = write_template(args.vendor_dir)
    except DsinkError as exc:
        print(f"plots_page: error: {exc}", file=sys.stderr)
        return 2
    cmd = dvc_command(template, args.out, args.diff)
    index = Path(args.out) / "index.html"
    before = index.stat().st_mtime_ns if index.is_file() else None
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        print(f"plots_page: error: `dvc {' '.join(cmd[3:])}` failed (exit {rc})", file=sys.stderr)
        return rc
    if not index.is_file() or index.stat().st_mtime_ns == before:
        print(f"plots_page: error: dvc wrote no {index} (no plots found?)", file=sys.stderr)
        return 2
    remote = remote_scripts(index.read_text(encoding="utf-8"))
    if remote:
        print(f"plots_page: error: {index} still loads {remote[0]}", file=sys.stderr)
        return 2
    print(f"plots_page: wrote {index} (vega inlined; opens offline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
