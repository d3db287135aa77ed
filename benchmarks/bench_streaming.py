"""Peak memory of preparing a table read whole against read chunk by chunk (streaming).

Writes a Parquet table of ``--rows`` rows shaped like a click log (string user and item ids,
three domains, a label, a train/val/test split column) in a temporary folder, then prepares
it in two fresh processes, one way each: ``prepare_table`` (the whole raw frame in memory) and
``prepare_table_stream`` (``data.options.streaming``: one chunk of raw rows at a time). Each
process reports its peak resident memory above what it held after imports, its wall time and
a checksum of the encoded arrays, so the two preparations are also checked to be the same.

Target: streaming's peak at most half the in-memory one at the default size. The LAST line
printed is one JSON object (``stream_over_memory_peak``, both peaks in MiB, both times, and
``same_arrays``).

    python benchmarks/bench_streaming.py [--rows 3000000] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {"label": "label", "divisions": ["domain"], "sparse": ["user", "item", "domain"]}


def write_table(path: Path, rows: int, seed: int = 1) -> None:
    import pandas as pd

    rng = np.random.default_rng(seed)
    domain = rng.choice(np.array(["sports", "toys", "office"]), rows, p=[0.5, 0.3, 0.2])
    users = rng.zipf(1.3, rows) % 400_000
    items = rng.zipf(1.2, rows) % 150_000
    frame = pd.DataFrame({
        "user": np.char.add(np.char.add(domain.astype(str), ":u"), users.astype(str)),
        "item": np.char.add(np.char.add(domain.astype(str), ":i"), items.astype(str)),
        "domain": domain,
        "label": (rng.random(rows) < 0.3).astype(np.int8),
        "split": rng.choice(np.array(["train", "val", "test"]), rows, p=[0.8, 0.1, 0.1]),
    })  # fmt: skip
    frame.to_parquet(path, row_group_size=250_000)


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc (Linux); ``ru_maxrss``
    would carry the parent's peak over ``exec``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(path: Path, mode: str) -> None:
    """Prepare ``path`` one way; print one JSON line (peak above the imports, time, digest)."""
    from mdlora.training.data.streaming import prepare_table_stream
    from mdlora.training.data.tabular import TableSchema, prepare_table

    schema = TableSchema.from_dict(SCHEMA)
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    if mode == "memory":
        prepared = prepare_table(path, schema, split_column="split")
    else:
        prepared = prepare_table_stream(path, schema, split_column="split", progress=False)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    for part in (prepared.train, prepared.val, prepared.test):
        for key in ("sparse", "domains", "labels"):
            digest.update(np.ascontiguousarray(part[key]).tobytes())
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - base, "seconds": seconds,
                      "digest": digest.hexdigest()}))  # fmt: skip


def run(path: Path, mode: str) -> dict[str, float | str]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", mode, str(path)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"the {mode} worker failed:\n{out.stderr}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--quick", action="store_true", help="500,000 rows (a smoke run)")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[1]), args.worker[0])
        return
    rows = 500_000 if args.quick else args.rows
    with tempfile.TemporaryDirectory(prefix="mdlora-stream-") as tmp:
        path = Path(tmp) / "clicks.parquet"
        write_table(path, rows)
        size = path.stat().st_size / 2**20
        memory = run(path, "memory")
        stream = run(path, "stream")
    ratio = float(stream["peak_mib"]) / max(float(memory["peak_mib"]), 1e-9)
    print(f"{rows:,} rows ({size:.0f} MiB of Parquet): read whole, peak +"
          f"{memory['peak_mib']:.0f} MiB in {memory['seconds']:.1f} s; streamed, peak +"
          f"{stream['peak_mib']:.0f} MiB in {stream['seconds']:.1f} s; ratio {ratio:.2f}; "
          f"same arrays: {memory['digest'] == stream['digest']}")  # fmt: skip
    print(json.dumps({
        "rows": rows, "parquet_mib": round(size, 1),
        "memory_peak_mib": round(float(memory["peak_mib"]), 1),
        "stream_peak_mib": round(float(stream["peak_mib"]), 1),
        "stream_over_memory_peak": round(ratio, 3),
        "memory_seconds": round(float(memory["seconds"]), 2),
        "stream_seconds": round(float(stream["seconds"]), 2),
        "same_arrays": memory["digest"] == stream["digest"],
    }))  # fmt: skip
    if memory["digest"] != stream["digest"]:
        raise SystemExit("the streamed arrays differ from the in-memory ones")


if __name__ == "__main__":
    main()
