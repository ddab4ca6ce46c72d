"""Summarize a py-spy profile of the hot path: share per actor, top self time, top inclusive time.

    py-spy record --gil --rate 250 -f raw -o hot.txt -- python -m benchmarks.hotpath --tasks 20000
    python -m benchmarks.pyspy_summary hot.txt [--top 30]

`-f raw` writes collapsed stacks (``frame;frame;... count``), one per line.
With `--gil` each sample is of the thread holding the GIL, so the shares say
where the one interpreter's time goes, which is what bounds throughput here.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

__all__ = ["main", "summarize"]

_ROLES = (
    ("StateActor.on_receive", "state actor"),
    ("StateActor._receive", "state actor"),
    ("OrchestratorActor.on_receive", "orchestrator"),
    ("ServiceWorker.on_receive", "service workers"),
    ("submit_every", "submitting threads"),
    ("Timer._run", "timer"),
    ("_actor_loop", "pykka actor loop (mailbox get, dispatch)"),
)
_OURS = ("actorflow/actors/", "actorflow/core/", "actorflow/services/")
_LINE = re.compile(r":\d+\)$")


def _role(frames: list[str]) -> str:
    joined = ";".join(frames)
    for marker, role in _ROLES:
        if marker in joined:
            return role
    if "_find_and_load" in joined:
        return "imports (start-up)"
    return "other"


def summarize(text: str, top: int = 25) -> str:
    """The three tables, as plain text."""
    stacks: list[tuple[list[str], int]] = []
    for line in text.splitlines():
        stack, _, samples = line.rstrip().rpartition(" ")
        if stack and samples.isdigit():
            stacks.append((stack.split(";"), int(samples)))
    total = sum(count for _, count in stacks) or 1
    roles: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        roles[_role(frames)] += count
        own[_LINE.sub(")", frames[-1])] += count
        for name in {_LINE.sub(")", frame) for frame in frames}:
            inclusive[name] += count
    out = [f"{total} samples", "", "share by thread role:"]
    out += [f"  {count / total:6.1%}  {role}" for role, count in roles.most_common()]
    out += ["", f"top {top} by self time:"]
    out += [f"  {count / total:6.1%}  {name}" for name, count in own.most_common(top)]
    out += ["", f"top {top} of actorflow's own functions by inclusive time:"]
    ours = [(name, count) for name, count in inclusive.most_common() if any(part in name for part in _OURS)]
    out += [f"  {count / total:6.1%}  {name}" for name, count in ours[:top]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the summary of one raw py-spy profile."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pyspy_summary", description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(summarize(args.profile.read_text(encoding="utf-8"), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
