"""Copy a data folder from a bucket to this host's disk: python launch/tpu/copy_data.py SRC DST.

SRC is any fsspec URL (gs://BUCKET/PATH through gcsfs; file:// and memory:// in tests); every file
under it lands at the same relative path under the local folder DST. Files already there with the
same size are skipped, so a restarted job copies only what is missing. The launchers run it on
every host before training, since the text and ArrayRecord sources read local paths.
"""
from __future__ import annotations

import os
import sys

import fsspec


def copy_tree(src: str, dst: str) -> tuple[int, int]:
  """Copies every file under `src` into `dst`; returns (files copied, files already present)."""
  fs, root = fsspec.core.url_to_fs(src)
  root = root.rstrip("/")
  files = [root] if fs.isfile(root) else [p for p in fs.find(root) if not p.endswith("/")]
  if not files:
    raise SystemExit(f"error: nothing to copy under {src}")
  copied = present = 0
  for path in files:
    rel = os.path.basename(path) if path == root else os.path.relpath(path, root)
    target = os.path.join(dst, rel)
    if os.path.exists(target) and os.path.getsize(target) == fs.size(path):
      present += 1
      continue
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fs.get_file(path, target + ".partial")
    os.replace(target + ".partial", target)  # a copy cut short never looks complete
    copied += 1
  return copied, present


def main(argv) -> int:
  if len(argv) != 2:
    print(__doc__.splitlines()[0], file=sys.stderr)
    return 2
  copied, present = copy_tree(argv[0], argv[1])
  print(f"copied {copied} files, {present} already present, into {argv[1]}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
