"""Pack a synset-folder tree into an ImageNet-22K-style release tar (an uncompressed tar of per-synset tars),
to benchmark `data_tools imagenet22k` on the layout of fall11_whole.tar / winter21_whole.tar.

    python benchmarks/release_tar.py SRC release.tar
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    with tarfile.open(out, "w") as release:
        for folder in sorted(p for p in src.iterdir() if p.is_dir()):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as synset:
                for path in sorted(folder.iterdir()):
                    synset.add(path, arcname=path.name)
            info = tarfile.TarInfo(f"{folder.name}.tar")
            info.size = buffer.tell()
            buffer.seek(0)
            release.addfile(info, buffer)
    print(f"{out}: {out.stat().st_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
