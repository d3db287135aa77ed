"""Benchmark of the online scoring service against the in-process scorer.

What it does (bounded in time: about ``5 * --seconds`` plus a minute of set-up):

1. builds an MLoRA/DeepFM artifact shaped like the MovieLens-1M occupation setting (6040 users,
   3706 movies, 21 domains, tower 256-128-64) with random weights, in a temporary directory;
2. pre-encodes ``--pool`` requests of ``--candidates`` items each over a skewed domain mix;
3. in-process baseline: ``model.score_batch`` once per request on the same requests,
   pre-encoded (and, for reference, with the encoder's ``encode_records`` per request), with
   the service's thread count and the faster of the artifact's routing and ``bag``; it is
   timed in rounds alternating with the service's, so both see the same background load;
4. starts ``uvicorn`` (``mdlora.cli.service.serve_artifact``) in a subprocess on loopback and
   drives it with a lean asyncio load generator (pre-encoded HTTP/1.1 requests over
   keep-alive connections): a closed loop at ``--concurrency`` for peak throughput, an open
   loop at half the peak rate, and the same open loop (twice as long) while an adapter is
   registered and rolled back over and over (admin API, one change every ~0.6 s). Latency is
   counted from the time a request was due (no coordinated omission); the service's own
   histogram gives the in-service p99 for comparison;
5. canary phase (``bench_canary.py``): the busiest domain's new version as a 10% canary, the
   same open loop over distinct users, and feedback events for every answer of that domain
   (sent batched every ``--feedback-every`` seconds, as a front end's click logger would; 0:
   one call per answer), in rounds alternating with steady rounds (no rollout) that it is
   compared with.

Targets on a 2-core machine: service >= 60% of in-process; p99 <= 20 ms at half load; p99
while adapters swap <= 1.5x steady; p99 of the canary phase (with its feedback traffic) <= 1.2x
steady, its observed canary share within 2 points of 10%; no failed request. The LAST line
printed is one JSON object with the figures (``service_over_inprocess``, ``p50_ms``,
``p99_ms_half_load``, ``p99_swap_over_steady``, ``p99_canary_over_steady``,
``canary_share_error``, ``errors``, ...). On a shared machine the load average (printed) is
the first thing to read: tail latencies follow it.

    python benchmarks/bench_service.py [--seconds 9] [--concurrency 8] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_canary import measure_canary  # noqa: E402
from service_load import (  # noqa: E402
    TOKEN,
    Connection,
    Swapper,
    closed_loop,
    free_port,
    http_request,
    model_calls,
    open_loop,
    percentiles,
    run,
    server,
    server_latency,
    server_p99_ms,
)

from mdlora.formats.adapter_package import adapter_package_bytes  # noqa: E402
from mdlora.formats.artifact import load_artifact, save_artifact  # noqa: E402
from mdlora.formats.encoder import FeatureEncoder  # noqa: E402
from mdlora.models.features import EncodedBatch  # noqa: E402
from mdlora.service.runtime import configure_thread, resolve_device  # noqa: E402
from tests.service.demo import DemoData, _encoder, demo_adapter, demo_frame, demo_model  # noqa: E402


# --------------------------------------------------------------------------- artifact, requests
def build_artifact(directory: Path) -> Path:
    frame = demo_frame(n_users=6040, n_items=3706, n_rows=120_000, seed=1)
    encoder = _encoder("mlora", "occupation").fit(frame)
    model, data = demo_model(
        "mlora", "occupation", "deepfm", (256, 128, 64), seed=1, data=DemoData(frame, encoder)
    )
    return save_artifact(
        model,
        directory,
        encoder=data.encoder.to_dict(),
        extra={"serving": {"user_id_field": "user_id", "item_id_field": "movie_id"}},
    )


def make_requests(
    encoder: FeatureEncoder, pool: int, candidates: int, seed: int = 0
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    users = np.array(encoder.vocabs["user_id"], dtype=object)
    items = np.array(encoder.vocabs["movie_id"], dtype=object)
    domains = encoder.domain_names("occupation")
    weights = 1.0 / np.arange(1, len(domains) + 1)  # a skewed (Zipf-like) domain mix
    weights /= weights.sum()
    out = []
    for _ in range(pool):
        out.append(
            {
                "domain": str(rng.choice(domains, p=weights)),
                "user": {"id": int(rng.choice(users))},
                "item_ids": [int(i) for i in rng.choice(items, candidates, replace=False)],
            }
        )
    return out


# --------------------------------------------------------------------------- in-process scorer
class InProcess:
    """The core's scorer in this process, once per request, on the same (pre-encoded) requests.

    Runs with the service's thread count (torch and numba). Every measurement times both the
    artifact's routing and ``bag`` and keeps the faster, which makes the service / in-process
    ratio a strict one.
    """

    def __init__(
        self, artifact: Path, requests: list[dict[str, Any]], threads: int, device: torch.device
    ) -> None:
        art = load_artifact(artifact, map_location=device)
        assert art.encoder is not None
        self.encoder = FeatureEncoder.from_dict(art.encoder)
        self.model = art.model.eval()
        self.device = device
        self.requests = requests
        self.encoded = [
            self._batch(self.encoder.encode_records(self._records(r))).to(device)
            for r in requests
        ]
        self.routings = [list(self.model.routing), ["bag"] * len(self.model.routing)]
        self.threads = threads
        configure_thread(threads)

    def best_rate(self, seconds: float, encode: bool = False) -> float:
        """The faster routing's requests per second (each timed for ``seconds / 2``)."""
        rates = []
        for routing in self.routings:
            self.model.set_routing(routing)
            rates.append(self.rate(seconds / 2, encode))
        return max(rates)

    @staticmethod
    def _records(r: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"user_id": r["user"]["id"], "movie_id": i, "occupation": r["domain"]}
            for i in r["item_ids"]
        ]

    @staticmethod
    def _batch(arrays: Any) -> EncodedBatch:
        return EncodedBatch(
            torch.from_numpy(arrays["sparse"]),
            torch.from_numpy(arrays["dense"]),
            torch.from_numpy(arrays["domains"]),
        )

    def rate(self, seconds: float, encode: bool = False) -> float:
        """Requests per second for ``seconds`` (``encode``: encode_records per request too)."""
        n, start = 0, time.perf_counter()
        with torch.inference_mode():
            while time.perf_counter() - start < seconds:
                i = n % len(self.requests)
                if encode:
                    batch = self._batch(
                        self.encoder.encode_records(self._records(self.requests[i]))
                    ).to(self.device)
                else:
                    batch = self.encoded[i]
                # as the service does: the scores back on the host, the id check skipped on
                # CUDA (a device sync; the ids come from the model's own table)
                self.model.score_batch(batch, check=self.device.type == "cpu").cpu()
                n += 1
        return n / (time.perf_counter() - start)


# --------------------------------------------------------------------------- load generator


# --------------------------------------------------------------------------- server


async def measure_peak(
    port: int, payloads: list[bytes], inproc: InProcess, args: argparse.Namespace
) -> dict[str, Any]:
    """Service closed loop and in-process scorer in alternating rounds (same background load)."""
    await closed_loop(port, payloads, args.concurrency, min(2.0, args.seconds))  # warm-up
    rounds, service, local, lat = 5, [], [], []
    rows_before = await model_calls(port)
    for _ in range(rounds):
        stats = await closed_loop(port, payloads, args.concurrency, args.seconds / rounds)
        service.append(stats.rps())
        lat += stats.latencies
        local.append(inproc.best_rate(args.seconds / rounds))
        if stats.errors:
            raise RuntimeError(f"{stats.errors} failed requests in the closed loop")
    rows_after = await model_calls(port)
    with_encode = inproc.best_rate(args.seconds / rounds, encode=True)
    p50, p99 = percentiles(lat)
    calls = max(rows_after[1] - rows_before[1], 1.0)
    return {
        "rows_per_call": (rows_after[0] - rows_before[0]) / calls,
        "service_rps": float(np.median(service)),
        "inprocess_rps": float(np.median(local)),
        "ratios": [s / i for s, i in zip(service, local, strict=True)],
        "inprocess_rps_with_encode": with_encode,
        "p50_ms": p50,
        "p99_ms": p99,
    }


async def measure_half_load(
    port: int,
    payloads: list[bytes],
    packages: list[tuple[bytes, bytes]],
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """Open loop at ``rate``: first steady, then with adapter changes; within the second part
    requests due while a change was in progress are compared with the rest."""
    before = await server_latency(port)
    steady = await open_loop(port, payloads, rate, seconds)
    server_p99 = server_p99_ms(before, await server_latency(port))
    swapper = Swapper(port, packages)
    stop = asyncio.Event()
    before = await server_latency(port)
    task = asyncio.create_task(swapper.run(stop))
    mixed = await open_loop(port, payloads, rate, 2 * seconds)
    stop.set()
    await task
    server_mixed_p99 = server_p99_ms(before, await server_latency(port))
    during = [
        lat for lat, due in zip(mixed.latencies, mixed.due, strict=True) if swapper.during(due)
    ]
    quiet = [
        lat for lat, due in zip(mixed.latencies, mixed.due, strict=True) if not swapper.during(due)
    ]
    failures = dict(steady.failures)
    for k, v in mixed.failures.items():
        failures[k] = failures.get(k, 0) + v
    return {
        "failures": failures,
        "server_p99_ms": server_p99,
        "server_mixed_p99_ms": server_mixed_p99,
        "steady": percentiles(steady.latencies),
        "quiet": percentiles(quiet),
        "mixed": percentiles(mixed.latencies),
        "during": percentiles(during),
        "n_during": len(during),
        "log": swapper.log,
        "errors": steady.errors + mixed.errors + swapper.errors,
    }


async def measure_canary_phase(
    port: int, encoder: FeatureEncoder, model: Any, args: argparse.Namespace, rate: float
) -> dict[str, Any]:
    """The canary phase (``bench_canary.py``) on the busiest domain, over distinct users."""
    domain = encoder.domain_names("occupation")[0]
    n = int(rate * args.seconds) + 1
    requests = make_requests(encoder, n, args.candidates, seed=5)
    users = np.random.default_rng(6).permutation(np.array(encoder.vocabs["user_id"], dtype=object))
    for k, r in enumerate(requests):  # distinct users (repeating only past the vocabulary)
        r["user"]["id"] = int(users[k % len(users)])
    package = adapter_package_bytes(demo_adapter(model, "occupation", domain, seed=21))

    async def open_conn() -> Connection:
        return await Connection.open(port)

    out = await measure_canary(
        open_conn, requests, domain, "occupation", package, TOKEN, rate, args.seconds,
        feedback_every=args.feedback_every,
    )  # fmt: skip
    return {**out, "domain": domain}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=9.0, help="length of each phase")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop connections")
    parser.add_argument("--candidates", type=int, default=100, help="items per request")
    parser.add_argument("--pool", type=int, default=512, help="distinct pre-encoded requests")
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument(
        "--feedback-every", type=float, default=0.1,
        help="seconds between the canary phase's feedback calls (0: one call per answer)",
    )  # fmt: skip
    parser.add_argument("--no-micro-batch", action="store_true", help="one model call per request")
    parser.add_argument(
        "--scorer-thread", choices=("auto", "on", "off"), default="auto",
        help="model calls on a thread: the service's default (auto: on a GPU), or on / off",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="the service's torch threads")
    parser.add_argument("--routing", default="artifact", help="the service's MDLORA_ROUTING")
    parser.add_argument(
        "--device", default=None,
        help="the service's and the in-process scorer's device (default: cuda when present)",
    )  # fmt: skip
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.quick:
        args.seconds, args.pool = 3.0, 128

    with tempfile.TemporaryDirectory(prefix="mdlora-bench-") as tmp:
        artifact = build_artifact(Path(tmp) / "artifact")
        art = load_artifact(artifact)
        assert art.encoder is not None
        encoder = FeatureEncoder.from_dict(art.encoder)
        requests = make_requests(encoder, args.pool, args.candidates)
        payloads = [http_request("/predict", orjson.dumps(r)) for r in requests]
        # three packages: rollback makes the previous registration active again, so with two
        # every third registration would be the active package ("unchanged", no swap)
        packages = [
            adapter_package_bytes(demo_adapter(art.model, "occupation", "4", seed=s))
            for s in (11, 12, 13)
        ]
        print(
            f"artifact: mlora/deepfm, {len(encoder.vocabs['user_id'])} users, "
            f"{len(encoder.vocabs['movie_id'])} items, 21 domains; {args.candidates} candidates "
            f"per request, {args.pool} distinct requests; device {device}; load average "
            f"{os.getloadavg()[0]:.1f}",
            flush=True,
        )
        inproc = InProcess(artifact, requests, args.threads, device)

        port = free_port()
        env = {
            "MDLORA_TORCH_THREADS": str(args.threads),
            "MDLORA_ROUTING": args.routing,
            "MDLORA_MICRO_BATCH": "false" if args.no_micro_batch else "true",
            "MDLORA_DEVICE": str(device),
        }
        if args.scorer_thread != "auto":
            env["MDLORA_SCORER_THREAD"] = "true" if args.scorer_thread == "on" else "false"
        # The load generator's own pauses count in its latencies: keep the ~0.5 s full
        # collections of everything loaded so far (torch, the model) out of the measurement.
        gc.collect()
        gc.freeze()
        with server(artifact, port, env):
            peak = run(measure_peak(port, payloads, inproc, args))
            half_rate = 0.5 * peak["service_rps"]
            half = run(measure_half_load(port, payloads, packages, half_rate, args.seconds))
            canary = run(measure_canary_phase(port, encoder, art.model, args, half_rate))

    c = args.candidates
    print(
        f"in-process scorer: {peak['inprocess_rps']:.0f} req/s ({peak['inprocess_rps'] * c:.0f} "
        f"candidates/s) with {args.threads} thread(s); with encode_records per request "
        f"{peak['inprocess_rps_with_encode']:.0f} req/s"
    )
    print(
        f"service, closed loop x{args.concurrency}: {peak['service_rps']:.0f} req/s "
        f"({peak['service_rps'] * c:.0f} candidates/s), p50 {peak['p50_ms']:.2f} ms, "
        f"p99 {peak['p99_ms']:.2f} ms, {peak['rows_per_call']:.0f} rows per model call; "
        f"per-round service/in-process "
        f"{', '.join(f'{r:.2f}' for r in peak['ratios'])}"
    )
    print(
        f"service, open loop at half peak ({half_rate:.0f} req/s): "
        f"p50 {half['steady'][0]:.2f} ms, "
        f"p99 {half['steady'][1]:.2f} ms (inside the service: p99 <= "
        f"{half['server_p99_ms']:.1f} ms)"
    )
    print(
        f"same load with adapter changes (one every ~0.6 s): p50 {half['mixed'][0]:.2f} ms, "
        f"p99 {half['mixed'][1]:.2f} ms; while a change is in progress "
        f"({half['n_during']} requests) "
        f"p50 {half['during'][0]:.2f} ms, p99 {half['during'][1]:.2f} ms; otherwise p50 "
        f"{half['quiet'][0]:.2f} ms, p99 {half['quiet'][1]:.2f} ms (inside the service, whole "
        f"phase: p99 <= {half['server_mixed_p99_ms']:.1f} ms)"
    )
    print(f"admin calls: {', '.join(half['log'])}")
    print(
        f"canary phase, rounds alternating with steady ones (10% canary of domain "
        f"{canary['domain']} plus {canary['feedback_events']} feedback events in "
        f"{canary['feedback_calls']} calls): p50 "
        f"{canary['p50_ms']:.2f} ms, p99 {canary['p99_ms']:.2f} ms; steady rounds p50 "
        f"{canary['steady_p50_ms']:.2f} ms, p99 {canary['steady_p99_ms']:.2f} ms; "
        f"feedback p99 {canary['feedback_p99_ms']:.2f} ms; canary share "
        f"{canary['canary_share']:.2f}% of {canary['domain_users']} distinct users; users "
        f"answered by both versions: {canary['users_on_both_versions']}"
    )
    if canary["failures"]:
        print(f"canary phase failures: {canary['failures']}")
    if half["failures"]:
        print(f"failed requests: {half['failures']}")
    result = {
        # median of the paired rounds: each ratio compares runs under the same background load
        "service_over_inprocess": round(float(np.median(peak["ratios"])), 3),
        "service_over_inprocess_with_encode": round(
            peak["service_rps"] / peak["inprocess_rps_with_encode"], 3
        ),
        "candidates_per_s": round(peak["service_rps"] * c),
        "inprocess_candidates_per_s": round(peak["inprocess_rps"] * c),
        "rows_per_model_call": round(peak["rows_per_call"], 1),
        "p50_ms": round(peak["p50_ms"], 3),
        "p99_ms": round(peak["p99_ms"], 3),
        "p50_ms_half_load": round(half["steady"][0], 3),
        "p99_ms_half_load": round(half["steady"][1], 3),
        "server_p99_ms_half_load_at_most": half["server_p99_ms"],
        # the whole phase with adapter changes (one every ~0.6 s) against the steady phase
        "p99_ms_swap_phase": round(half["mixed"][1], 3),
        "p99_swap_over_steady": round(half["mixed"][1] / half["steady"][1], 3),
        # stricter: only requests due while a change was in progress, against the others
        "p99_ms_during_swap": round(half["during"][1], 3),
        "server_p99_ms_swap_phase_at_most": half["server_mixed_p99_ms"],
        "p99_ms_between_swaps": round(half["quiet"][1], 3),
        "p99_during_over_between_swaps": round(half["during"][1] / half["quiet"][1], 3),
        "swaps": len(half["log"]),
        # 10% canary of the busiest domain with feedback for its answers, against steady
        # rounds interleaved with it (the same requests and background load)
        "p99_ms_canary_phase": round(canary["p99_ms"], 3),
        "p99_ms_canary_steady_rounds": round(canary["steady_p99_ms"], 3),
        "p99_canary_over_steady": round(canary["p99_ms"] / canary["steady_p99_ms"], 3),
        "canary_share_error": round(canary["canary_share_error"], 3),
        "canary_domain_users": canary["domain_users"],
        "canary_users_on_both_versions": canary["users_on_both_versions"],
        "feedback_calls": canary["feedback_calls"],
        "feedback_events": canary["feedback_events"],
        "feedback_every_s": canary["feedback_every_s"],
        "feedback_p99_ms": round(canary["feedback_p99_ms"], 3),
        "errors": int(half["errors"]) + int(canary["errors"]),
        "load_average": round(os.getloadavg()[0], 2),
        "concurrency": args.concurrency,
        "micro_batch": not args.no_micro_batch,
        "scorer_thread": (device.type == "cuda") if args.scorer_thread == "auto"
        else args.scorer_thread == "on",
        "device": str(device),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
