"""One process per ORT session lever: peak RSS and s/forward of a bundle's U-Net, batch 1, CPU EP.

    python -m benchmarks.experiments.unet_memory_levers BUNDLE [--levers default no-arena ...]

Each lever runs in its own child process so peaks do not mix; prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.common import header, run_measured

# Each lever spelled as unet_forward.py flags; "default" is ORT's defaults, not the cpu profile's.
ON = ["--arena", "on", "--mem-pattern", "on"]
LEVERS = {
    "default": ON,
    "no-arena": ["--arena", "off", "--mem-pattern", "on"],
    "no-mem-pattern": ["--arena", "on", "--mem-pattern", "off"],
    "no-arena+no-mem-pattern": ["--arena", "off", "--mem-pattern", "off"],
    "no-prepacking": [*ON, "--config", "session.disable_prepacking=1"],
    "no-arena+no-prepacking": ["--arena", "off", "--mem-pattern", "on", "--config", "session.disable_prepacking=1"],
}
CHILD = [sys.executable, "-m", "benchmarks.unet_forward"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--levers", nargs="+", default=list(LEVERS))
    ap.add_argument("--repeat", type=int, default=2, help="timed forwards after the first")
    a = ap.parse_args()
    rows = []
    for name in a.levers:
        r = run_measured([*CHILD, a.bundle, "--repeat", str(a.repeat), *LEVERS[name]])
        if r["rc"] != 0:
            rows.append(f"| {name} | failed: {r['stderr'].strip().splitlines()[-1] if r['stderr'].strip() else r['rc']} | | | |")
            continue
        res = r["result"]
        rows.append(f"| {name} | {r['peak_rss_mb']:.0f} | {res['rss_after_load_mb']:.0f} | {res['first_s']:.2f} | {res['s_per_forward']:.2f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print(header(sys.argv))
    print("| lever | peak RSS MB | RSS after load MB | first forward s | s/forward (median of the rest) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
