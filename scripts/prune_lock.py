#!/usr/bin/env python3
"""Print a ``uv pip compile --generate-hashes`` lock without torch, torchvision and the
packages only they need (those come with torch from the chosen torch index, whose CPU and
CUDA wheels differ). Usage: ``prune_lock.py RAW_LOCK > infra/requirements.lock``."""

from __future__ import annotations

import re
import sys

TORCH = frozenset({"torch", "torchvision"})


def entries(text: str) -> list[str]:
    """The lock's package blocks (``name==version`` with its hashes and ``# via`` lines)."""
    return [b for b in re.split(r"\n(?=[a-z0-9])", text) if re.match(r"[a-z0-9]", b)]


def name(block: str) -> str:
    match = re.match(r"[a-z0-9._-]+", block)
    assert match is not None
    return match.group(0)


def required_by(block: str) -> set[str]:
    """The packages a block is ``# via``; a direct requirement (a ``-r`` file) is ``-r``."""
    via = set(re.findall(r"#\s+(?:via )?([a-z0-9._-]+)\s*$", block, flags=re.M))
    if re.search(r"#\s+(?:via )?-r ", block):
        via.add("-r")
    return via - {"via"}


def prune(text: str) -> tuple[list[str], set[str]]:
    blocks = entries(text)
    removed = set(TORCH)
    changed = True
    while changed:  # a package goes when everything that needs it has gone
        changed = False
        for block in blocks:
            via = required_by(block)
            if name(block) not in removed and via and via <= removed:
                removed.add(name(block))
                changed = True
    return [b for b in blocks if name(b) not in removed], removed


def main() -> None:
    kept, removed = prune(open(sys.argv[1]).read())
    print("\n".join(kept).rstrip("\n"))
    sys.stderr.write(f"left to the torch index: {' '.join(sorted(removed))}\n")


if __name__ == "__main__":
    main()
