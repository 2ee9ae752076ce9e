"""Where a process's time went, from py-spy's raw (collapsed) stacks.

    .venv/bin/python bench/run.py --goals 1 --profile-worker /tmp/worker.txt
    .venv/bin/python bench/profile_summary.py /tmp/worker.txt [--top 30]

For each function: the share of the samples it was on the stack in (own and children) and the
share it was the innermost frame in (own). py-spy leaves idle threads out by default, so the
shares are of the time the process was doing something, not of the wall clock.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter

_LINE = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """'dispatch (renderq/jobs/scheduler.py:180)' without the line number, and a library's path
    from its package on."""
    name = _LINE.sub(")", frame.strip())
    return re.sub(r"\(.*site-packages/", "(", re.sub(r"\(/work/[^/]+/", "(", name))


def summarize(path: str) -> tuple[int, Counter, Counter]:
    total, inclusive, own = 0, Counter(), Counter()
    with open(path) as stacks:
        for line in stacks:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            samples = int(count)
            frames = [frame_name(frame) for frame in stack.split(";") if frame]
            total += samples
            for frame in set(frames):
                inclusive[frame] += samples
            own[frames[-1]] += samples
    return total, inclusive, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stacks", help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    total, inclusive, own = summarize(args.stacks)
    print(f"{total} samples (idle threads not sampled)")
    print("\nown and children (share of samples with the function on the stack):")
    for name, samples in inclusive.most_common(args.top):
        print(f"  {100 * samples / total:5.1f} %  {name}")
    print("\nown (share of samples with the function innermost):")
    for name, samples in own.most_common(args.top):
        print(f"  {100 * samples / total:5.1f} %  {name}")


if __name__ == "__main__":
    main()
