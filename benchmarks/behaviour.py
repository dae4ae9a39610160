"""Behaviour unchanged by a refactor: the same runs, before and after, give the same files — side by side in one run.

    python benchmarks/behaviour.py --before 822f0c4            # this checkout against commit 822f0c4
    python benchmarks/behaviour.py                             # this checkout alone (hashes and seconds)
    python benchmarks/behaviour.py --before REV --quick        # 4 rounds per run instead of the defaults

Runs ``privfer simulate --epsilon 3 --set privacy.noise_source=run_seed`` (the noise drawn from the public run
seed, so a run is reproducible) at record level with FedAvg and FedPer and at person level with FedAvg (FedPer is
refused there). ``--before REV`` checks REV
out into a temporary git worktree and runs every case there too, alternating the two checkouts so that drift on
the machine hits both alike. Each checkout runs its own code (``PYTHONPATH`` points at it), in this
interpreter's environment.

Reported per case and checkout: the SHA-256 of ``result.json`` and ``privacy_ledger.json`` in canonical form
(sorted keys; the fields that measure time on this machine — ``seconds``, ``*_seconds``, ``started``... — left
out, since they differ between any two runs), and the wall-clock seconds of the run. Exit status 1 when a hash
differs, so a refactor that changes behaviour is seen; the fields that differ are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "record/fedavg": [],
    "record/fedper": ["--strategy", "fedper"],
    "person/fedavg": ["--set", "privacy.unit=person"],
}  # person level with FedPer is refused by the config (its personal heads would be released without noise)
FILES = ("result.json", "privacy_ledger.json")
TIME_KEYS = {"seconds", "started", "finished", "elapsed", "wall_seconds", "created"}


def _timing(key: str) -> bool:
    return key in TIME_KEYS or key.endswith("_seconds") or key.endswith("seconds_per_round")


def canonical(value):
    """``value`` without the fields that measure time."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items() if not _timing(k)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def digest(path: Path) -> tuple[str, object]:
    document = canonical(json.loads(path.read_text()))
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), document


def differences(a, b, where: str = "") -> list[str]:
    """Paths at which two canonical documents differ (the first 10)."""
    if type(a) is not type(b):
        return [where or "/"]
    if isinstance(a, dict):
        out = [f"{where}/{k}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{where}/{k}")
        return out[:10]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{where} (length {len(a)} vs {len(b)})"]
        return [d for x, y, i in zip(a, b, range(len(a))) for d in differences(x, y, f"{where}[{i}]")][:10]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def run(checkout: Path, args: list[str], out: Path, quick: bool) -> float:
    command = [sys.executable, "-c", "from privfer.cli import main; main()", "simulate", "--epsilon", "3", "--set", "privacy.noise_source=run_seed",
               *args, "--out", str(out), "--json"]
    if quick:
        command += ["--rounds", "4"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: {' '.join(command[3:])} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="a git revision to compare this checkout with")
    parser.add_argument("--quick", action="store_true", help="4 rounds per run")
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=list(CASES))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="privfer-behaviour-") as scratch:
        checkouts = {"after": ROOT}
        if options.before:
            worktree = Path(scratch) / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), options.before],
                           check=True, capture_output=True)
            checkouts = {"before": worktree, "after": ROOT}
        try:
            changed = False
            print(f"{'case':<15} {'checkout':<8} {'seconds':>8}  " + "  ".join(f"{f:<18}" for f in FILES))
            for case in options.cases:
                documents = {}
                for name, checkout in checkouts.items():
                    out = Path(scratch) / name / case.replace("/", "-")
                    seconds = run(checkout, CASES[case], out, options.quick)
                    hashes = {f: digest(out / f) for f in FILES}
                    documents[name] = hashes
                    print(f"{case:<15} {name:<8} {seconds:8.1f}  " + "  ".join(f"{hashes[f][0][:16]:<18}" for f in FILES),
                          flush=True)
                if len(documents) == 2:
                    for f in FILES:
                        before, after = documents["before"][f], documents["after"][f]
                        if before[0] != after[0]:
                            changed = True
                            print(f"  {f} differs: " + "; ".join(differences(before[1], after[1])))
        finally:
            if options.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                               capture_output=True)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
