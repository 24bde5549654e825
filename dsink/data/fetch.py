"""Make sure the default dataset is on disk, without the network.

``python -m dsink.data.fetch`` (run by ``make data`` / ``make repro``): for ``fashion_mnist`` it unpacks
the Debian package ``dataset-fashion-mnist`` into ``<data.root>/FashionMNIST/raw``, installing the package
with apt-get first when it is missing and apt-get is usable (root). Other datasets are the user's: the
command checks they are there and says how to get them if not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from dsink.data.sources import DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES, install_fashion_mnist
from dsink.errors import DsinkError
from dsink.params import load_params


def _apt_install(package: str) -> bool:
    """Install a Debian package when we can (root + apt-get); return whether it ran."""
    if shutil.which("apt-get") is None or (hasattr(os, "geteuid") and os.geteuid() != 0):
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"fetch: installing Debian package {package} with apt-get", file=sys.stderr)
    ok = (
        subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, capture_output=True).returncode
        == 0
    )
    if not ok:  # package lists may be empty on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        ok = (
            subprocess.run(
                ["apt-get", "install", "-y", "-q", package], env=env, capture_output=True
            ).returncode
            == 0
        )
    return ok


def ensure_fashion_mnist(root: str) -> None:
    raw = os.path.join(root, "FashionMNIST", "raw")
    if all(os.path.exists(os.path.join(raw, f)) for f in FASHION_MNIST_FILES):
        return
    if not DEBIAN_FASHION_MNIST.is_dir():
        _apt_install("dataset-fashion-mnist")
    install_fashion_mnist(root)
    print(f"fetch: Fashion-MNIST ready under {raw}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--params", default="params.yaml", help="params file naming the dataset (default: %(default)s)"
    )
    args = p.parse_args(argv)
    try:
        data = load_params(args.params).data
        if data.dataset == "fashion_mnist" and not data.download:
            ensure_fashion_mnist(data.root)
        elif data.dataset != "synthetic" and not data.download:
            from dsink.data.sources import load_source

            load_source(data)  # raises a clear error naming the path and how to get the data
    except DsinkError as exc:
        print(f"fetch: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
