"""``make bench``: run every benchmark, print one table, write it as JSON.

Each module in :data:`BENCHMARKS` has ``run() -> list[dict]`` whose rows carry ``figure``,
``this_project``, ``peer`` and ``ratio`` (peer measured in the same run). Benchmarks report
medians and ratios; they never fail on a time. ``python -m bench NAME...`` runs a subset.
The table leads with the model-zoo bundles against MONAI Deploy App SDK and the plain MONAI
way (``peers``), then the 104-organ results and the wholeBody bundle end to end
(``multiorgan``).
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

BENCHMARKS = [
    "peers",
    "multiorgan",
    "ingest",
    "transport",
    "pipeline",
    "postprocess",
    "encode",
    "gpu",
    "e2e",
    "fetch",
    "memory",
]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    rows: list[dict] = []
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            print(f"bench {name}: not available ({exc})", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        try:
            got = module.run()
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            got = [
                {
                    "figure": f"{name}: FAILED (see above)",
                    "this_project": None,
                    "peer": None,
                    "ratio": None,
                }
            ]
        for row in got:
            row.setdefault("benchmark", name)
        rows.extend(got)
        print(f"bench {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    width = max((len(r["figure"]) for r in rows), default=10)
    print(f"{'figure':<{width}}  {'this project':>12}  {'peer':>10}  {'ratio':>7}")
    for r in rows:

        def fmt(v: object) -> str:
            return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

        print(
            f"{r['figure']:<{width}}  {fmt(r['this_project']):>12}  {fmt(r['peer']):>10}  "
            f"{fmt(r['ratio']):>7}"
        )
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    doc = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpus": __import__("os").cpu_count(),
        "rows": rows,
    }
    (out / f"bench-{stamp}.json").write_text(json.dumps(doc, indent=2))
    (out / "latest.json").write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
