"""The SLO-aware server against the same server without objectives, at overload and at light load.

    python -m benchmarks.slo_serving --model DIR --out RESULTS_DIR [--slo-tpot-ms 30] [--slo-ttft-ms 2000]
        [--num-requests 400] [--server-args "..."] [--sustainable-rate R]

1. Start the server without objectives and find the rate it sustains: the highest Poisson
   arrival rate at which its P99 TPOT and P99 TTFT meet the objectives and nothing fails
   (doubling or halving from --start-rate until it changes, then bisecting --bisect times); or take
   --sustainable-rate.
2. At --overload x that rate (default 1.5) and at --light x it (default 0.3): run the same
   seeded workload (the ShareGPT-like mix, streamed, ignore_eos) against the server without
   objectives and against the server with `--slo-ttft-ms --slo-tpot-ms`.
   Both servers get the same warm-up before their light run (64 requests at --start-rate, then
   --warmup-requests at the light rate); every recorded run keeps a trace of /metrics (running,
   waiting, the controller's caps, requests shed) sampled every 0.5 s.
3. Print one table, write RESULTS_DIR/slo_serving.json (every run, the search's probes, the
   environment) and RESULTS_DIR/slo_serving.png (matplotlib; an .svg without it): goodput,
   P99 TPOT against the target, P99 TTFT and the share shed, per load and server.

--overload-repeats N runs the overload load N times on each SLO-aware server (one row each,
`repeat` 1..N, plotted side by side; the server without objectives runs it once), so that one call
shows the spread between runs of one configuration.

--slo-variant SPEC adds an SLO-aware server whose controller takes PAGEDSERVE_SLO_CONTROLLER=SPEC
(e.g. setpoint=0.7); --skip-plain (with --sustainable-rate) and --skip-slo leave servers out, so
that one variant can be measured alone.

What should show: at overload the SLO-aware server keeps the P99 TPOT of the requests it admits
under the target (it sheds with 429 what it cannot serve in time) and its goodput beats the
server without objectives, which breaks the target; at light load both are alike.
On the CPU with the tiny model (an end-to-end check of the script, not a measurement):
    python -m benchmarks.slo_serving --model TINY --out /tmp/slo --device-cpu-tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import environment, print_table
from benchmarks.serving import default_client_procs, measure_rate, running_server
from pagedserve.core.slo_controller import ENV_OVERRIDES
from pagedserve.tune.workload import sharegpt_like

CPU_TINY_FLAGS = ["--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-bytes", str(16 << 20),
                  "--device", "cpu"]  # fmt: skip


def _meets(row: dict[str, Any], args: argparse.Namespace) -> bool:
    return (row["failed"] == 0 and row["tpot_p99_ms"] <= args.slo_tpot_ms
            and row["ttft_p99_ms"] <= args.slo_ttft_ms)  # fmt: skip


# the series sampled from /metrics during a recorded run: the engine's queue and the controller's caps
TRACE_SERIES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
                "max_num_seqs": "pagedserve:slo_max_num_seqs",
                "token_budget": "pagedserve:slo_max_num_batched_tokens",
                "rejected": "pagedserve:slo_rejected_requests_total",
                "tpot_signal_s": "pagedserve:slo_tpot_signal_seconds",
                "mixed_step_model_s": "pagedserve:slo_mixed_step_model_seconds",
                "prefill_allowance": "pagedserve:slo_prefill_allowance_tokens"}  # fmt: skip


def parse_series(text: str) -> dict[str, float]:
    """TRACE_SERIES' values in one /metrics page (labelled samples of a name summed)."""
    values: dict[str, float] = {}
    wanted = {metric: key for key, metric in TRACE_SERIES.items()}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            key = wanted[name]
            values[key] = values.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


class MetricsTrace:
    """Samples TRACE_SERIES from the server's /metrics every `period` seconds in a thread, so a
    run's result shows how the queue and the caps moved (why a run shed, or waited)."""

    def __init__(self, base: str, period: float = 0.5) -> None:
        self.base, self.period = base, period
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        began = time.perf_counter()
        with httpx.Client(base_url=self.base, timeout=5.0) as http:
            while not self._stop.is_set():
                try:
                    values = parse_series(http.get("/metrics").text)
                except httpx.HTTPError:
                    values = {}
                self.samples.append({"t_s": round(time.perf_counter() - began, 3), **values})
                self._stop.wait(self.period)

    def __enter__(self) -> MetricsTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _run(base: str, work: Any, rate: float, args: argparse.Namespace, seed: int, n: int | None = None,
         trace: bool = False) -> dict:  # fmt: skip
    n = n or len(work.prompts)
    sampler = MetricsTrace(base) if trace else None
    with sampler or contextlib.nullcontext():
        row = measure_rate(base, "bench", work.prompts[:n], work.output_lens[:n], rate, seed,
                           slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                           client_procs=args.client_procs)
    if sampler is not None:
        row["trace"] = sampler.samples
    return row


def _warm_up(base: str, work: Any, args: argparse.Namespace, rate: float, n: int) -> None:
    """n unrecorded requests at rate (seed 98). Both servers get the same: 64 at --start-rate
    first (compiles kernels), then, right before the light run, --warmup-requests at the light
    rate, so neither light run is the first traffic its server (and its controller) sees."""
    if n > 0:
        _run(base, work, rate, args, seed=98, n=min(n, len(work.prompts)))


def _size(least: int, rate: float, args: argparse.Namespace) -> int:
    """Requests of a probe or overload run: --seconds of arrivals at rate (at least `least`, at
    most the workload's --num-requests). A short burst measures a transient, not a rate: 500
    requests at 128 req/s arrive in 4 s and met the objectives on an H200 whose server completes
    about 43 req/s (2026-12-02)."""
    return min(args.num_requests, max(least, math.ceil(rate * args.seconds)))


def find_sustainable_rate(base: str, work: Any, args: argparse.Namespace) -> tuple[float, list[dict]]:
    """The highest rate (of those probed) at which the server meets both objectives at P99."""
    probes: list[dict] = []

    def probe(rate: float) -> bool:
        row = _run(base, work, rate, args, seed=100 + len(probes), n=_size(args.probe_requests, rate, args))
        row["meets_slo"] = _meets(row, args)
        probes.append(row)
        print(f"probe {rate:8.2f} req/s: P99 TPOT {row['tpot_p99_ms']:.1f} ms, P99 TTFT {row['ttft_p99_ms']:.0f} ms"
              f" -> {'meets' if row['meets_slo'] else 'breaks'} the objectives", flush=True)
        return bool(row["meets_slo"])

    low, high = 0.0, min(args.start_rate, args.max_rate)
    if probe(high):  # double until it breaks them (or --max-rate meets them)
        while high < args.max_rate:
            low, high = high, min(high * 2, args.max_rate)
            if not probe(high):
                break
        else:
            return high, probes
    else:  # halve until it meets them
        for _ in range(6):
            high, low = high / 2, 0.0
            if probe(high):
                low, high = high, high * 2
                break
        if low == 0.0:
            raise SystemExit(f"the server meets the objectives at no probed rate (lowest {high:.3g} req/s)")
    for _ in range(args.bisect):
        mid = (low + high) / 2
        if probe(mid):
            low = mid
        else:
            high = mid
    return low, probes


def _load_label(row: dict) -> str:
    """A run's place on the plot's x axis: its load, and its repeat when the load ran more than once."""
    return row["load"] if row["repeat"] == 1 else f"{row['load']} #{row['repeat']}"


def plot(rows: list[dict], args: argparse.Namespace, out: Path, servers: list[str]) -> Path:
    loads = list(dict.fromkeys(_load_label(r) for r in rows))  # x categories in run order
    width = 0.76 / len(servers)
    panels = [("goodput_rps", "goodput (req/s)"), ("tpot_p99_ms", "P99 TPOT of admitted (ms)"),
              ("ttft_p99_ms", "P99 TTFT of admitted (ms)"), ("shed_share", "share shed (429)")]  # fmt: skip
    missing = {key: math.nan for key, _ in panels}  # a server that did not run a repeat
    value = {(lo, s): missing for lo in loads for s in servers} | {(_load_label(r), r["server"]): r for r in rows}
    rate_of = {_load_label(r): r["rate_rps"] for r in rows}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_svg(rows, args, out, loads, servers, panels, value)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        for j, server in enumerate(servers):
            xs = [i + (j - (len(servers) - 1) / 2) * width for i in range(len(loads))]
            ax.bar(xs, [value[(load, server)][key] for load in loads], width=width * 0.95, label=server)
        ax.set_xticks(range(len(loads)), [f"{load}\n{rate_of[load]:.3g} req/s" for load in loads])
        ax.set_title(title, fontsize=10)
        if key == "tpot_p99_ms":
            ax.axhline(args.slo_tpot_ms, color="red", linestyle="--", linewidth=1, label="target")
        if key == "ttft_p99_ms":
            ax.axhline(args.slo_ttft_ms, color="red", linestyle="--", linewidth=1)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"SLO-aware vs no objectives (TPOT {args.slo_tpot_ms:g} ms, TTFT {args.slo_ttft_ms:g} ms)")
    fig.tight_layout()
    path = out / "slo_serving.png"
    fig.savefig(path, dpi=120)
    return path


def plot_trace(rows: list[dict], out: Path) -> Path | None:
    """slo_trace.png: per recorded run, the running batch, the queue and the controller's seat
    cap over the run (matplotlib; nothing without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    traced = [r for r in rows if r.get("trace")]
    if not traced:
        return None
    fig, axes = plt.subplots(1, len(traced), figsize=(4 * len(traced), 3.2), squeeze=False)
    for ax, row in zip(axes[0], traced):
        t = [x["t_s"] for x in row["trace"]]
        for key in ("running", "waiting", "max_num_seqs"):
            if row["server"] == "no objectives" and key == "max_num_seqs":
                continue  # no controller
            ax.plot(t, [x.get(key, float("nan")) for x in row["trace"]], label=key, linewidth=1)
        ax.set_title(f"{_load_label(row)}, {row['server']} ({row['rate_rps']:.3g} req/s)", fontsize=9)
        ax.set_xlabel("s")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "slo_trace.png"
    fig.savefig(path, dpi=110)
    return path


def _plot_svg(rows: list[dict], args: argparse.Namespace, out: Path, loads: list[str], servers: list[str],
              panels: list[tuple[str, str]], value: dict) -> Path:  # fmt: skip
    """The same bars as SVG text (no matplotlib on the machine)."""
    w, h, pad = 260, 220, 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(panels)}" height="{h + 40}" '
             'font-family="sans-serif" font-size="11">']
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for p, (key, title) in enumerate(panels):
        x0 = p * w
        top = max([v for lo in loads for s in servers if math.isfinite(v := value[(lo, s)][key])] + [1e-9])
        parts.append(f'<text x="{x0 + w / 2}" y="14" text-anchor="middle">{title}</text>')
        for i, load in enumerate(loads):
            for j, server in enumerate(servers):
                v = value[(load, server)][key]
                bar = 0 if not math.isfinite(v) else (h - 2 * pad) * v / top
                x = x0 + pad + i * 100 + j * 42
                parts.append(f'<rect x="{x}" y="{h - pad - bar}" width="38" height="{bar}" fill="{colors[j % len(colors)]}"/>')
                parts.append(f'<text x="{x + 19}" y="{h - pad - bar - 3}" text-anchor="middle">{v:.3g}</text>')
            parts.append(f'<text x="{x0 + pad + i * 100 + 40}" y="{h - 12}" text-anchor="middle">{load}</text>')
    for j, server in enumerate(servers):
        parts.append(f'<rect x="{10 + j * 140}" y="{h + 15}" width="10" height="10" fill="{colors[j % len(colors)]}"/>'
                     f'<text x="{24 + j * 140}" y="{h + 24}">{server}</text>')
    parts.append("</svg>")
    path = out / "slo_serving.svg"
    path.write_text("\n".join(parts))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, help="results directory (JSON, plot)")
    parser.add_argument("--slo-tpot-ms", type=float, default=30.0)
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--num-requests", type=int, default=400)
    parser.add_argument("--probe-requests", type=int, default=None, help="requests per search probe (default: --num-requests / 2)")
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="make each probe and overload run about this many seconds of arrivals (rate x seconds "
                             "requests, at least --probe-requests, at most --num-requests)")
    parser.add_argument("--slo-variant", action="append", default=[],
                        help="one more SLO-aware server with PAGEDSERVE_SLO_CONTROLLER=SPEC (controller overrides, "
                             "e.g. setpoint=0.7); repeatable")
    parser.add_argument("--skip-plain", action="store_true",
                        help="do not run the server without objectives (needs --sustainable-rate)")
    parser.add_argument("--skip-slo", action="store_true",
                        help="do not run the SLO-aware server at the default controller (only --slo-variant ones)")
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--server-args", default="", help="flags for both servers (the SLO flags are added to one)")
    parser.add_argument("--sustainable-rate", type=float, default=None, help="skip the search")
    parser.add_argument("--start-rate", type=float, default=4.0)
    parser.add_argument("--max-rate", type=float, default=1024.0)
    parser.add_argument("--bisect", type=int, default=3)
    parser.add_argument("--overload", type=float, default=1.5)
    parser.add_argument("--light", type=float, default=0.3)
    parser.add_argument("--light-requests", type=int, default=None, help="requests of the light runs (default: half)")
    parser.add_argument("--client-procs", type=int, default=default_client_procs(),
                        help="client processes sending the requests (default: one per 4 cores, at most 8)")
    parser.add_argument("--loads", nargs="+", choices=["light", "overload"], default=["light", "overload"])
    parser.add_argument("--overload-repeats", type=int, default=1,
                        help="run the overload load this many times on each SLO-aware server (the spread between runs)")
    parser.add_argument("--warmup-requests", type=int, default=300,
                        help="requests at the light rate on each server right before its light run")
    parser.add_argument("--device-cpu-tiny", action="store_true",
                        help="CPU flags for a tiny test model (a check of the script end to end)")
    args = parser.parse_args()
    args.probe_requests = args.probe_requests or max(8, args.num_requests // 2)
    if args.skip_plain and args.sustainable_rate is None:
        parser.error("--skip-plain needs --sustainable-rate (the search runs on the plain server)")
    if args.skip_plain and args.skip_slo and not args.slo_variant:
        parser.error("--skip-plain and --skip-slo leave no server to run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server_args = args.server_args.split() + (CPU_TINY_FLAGS if args.device_cpu_tiny else [])
    slo_args = [*server_args, "--slo-ttft-ms", f"{args.slo_ttft_ms:g}", "--slo-tpot-ms", f"{args.slo_tpot_ms:g}"]
    work = sharegpt_like(args.vocab_size, args.num_requests)
    if args.device_cpu_tiny:
        work = work.clipped(64, 32, 256)
    rows: list[dict] = []
    probes: list[dict] = []
    servers: list[str] = []
    rate = args.sustainable_rate

    def save(partial: bool, plot_name: str | None = None) -> Path:
        """Write slo_serving.json (also after each run, so a run cut short keeps what it measured)."""
        result = {"environment": environment(), "command": "python -m benchmarks.slo_serving " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False, "")),
            "sustainable_rate_rps": rate, "runs": rows, "probes": probes, "args": vars(args),
            "partial": partial, "plot": plot_name}  # fmt: skip
        path = out / "slo_serving.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        return path

    def record(load: str, server: str, row: dict, repeat: int = 1) -> None:
        rows.append({"load": load, "repeat": repeat, "server": server, **row})
        print(f"{load} {server}: {row['rate_rps']:.2f} req/s, goodput {row['goodput_rps']:.2f}, "
              f"P99 TPOT {row['tpot_p99_ms']:.1f} ms, P99 TTFT {row['ttft_p99_ms']:.0f} ms, "
              f"shed {row['shed_429']}", flush=True)
        save(partial=True)

    def loads_and_sizes(rate: float) -> tuple[dict[str, float], dict[str, int]]:
        loads = {load: factor * rate for load, factor in (("light", args.light), ("overload", args.overload))
                 if load in args.loads}  # fmt: skip
        sizes = {"light": args.light_requests or max(8, args.num_requests // 2),
                 "overload": _size(args.probe_requests, args.overload * rate, args) if args.seconds else args.num_requests}
        return loads, sizes

    if not args.skip_plain:
        servers.append("no objectives")
        with running_server(args.model, server_args, str(out / "server-no-objectives.log")) as (base, _):
            _warm_up(base, work, args, args.start_rate, 64)
            if rate is None:  # the first probe is not the first load either
                _warm_up(base, work, args, args.start_rate / 2, args.warmup_requests)
                rate, found = find_sustainable_rate(base, work, args)
                probes.extend(found)
            print(f"sustainable rate without objectives: {rate:.3f} req/s", flush=True)
            loads, sizes = loads_and_sizes(rate)
            _warm_up(base, work, args, args.light * rate, args.warmup_requests)
            for load, r in loads.items():
                record(load, "no objectives", _run(base, work, r, args, 1, sizes[load], trace=True))
    assert rate is not None  # --skip-plain requires --sustainable-rate
    loads, sizes = loads_and_sizes(rate)
    for variant in ([] if args.skip_slo else [""]) + args.slo_variant:
        name, log = ("SLO-aware", "server-slo-aware.log") if not variant else (
            f"SLO-aware ({variant})", f"server-slo-aware-{len(servers)}.log")
        servers.append(name)
        env = {ENV_OVERRIDES: variant} if variant else None
        with running_server(args.model, slo_args, str(out / log), extra_env=env) as (base, _):
            _warm_up(base, work, args, args.start_rate, 64)
            _warm_up(base, work, args, args.light * rate, args.warmup_requests)
            for load, r in loads.items():
                for repeat in range(1, (args.overload_repeats if load == "overload" else 1) + 1):
                    # the same seeded arrivals each repeat: the spread is the server's, not the workload's
                    record(load, name, _run(base, work, r, args, 1, sizes[load], trace=True), repeat)
    for row in rows:
        row["shed_share"] = row["shed_429"] / row["requests"]
    columns = ["load", "repeat", "server", "rate_rps", "goodput_rps", "slo_attainment", "tpot_p50_ms", "tpot_p99_ms",
               "ttft_p50_ms", "ttft_p99_ms", "shed_429", "failed", "output_tokens_per_s"]  # fmt: skip
    print_table(f"SLO-aware serving (TPOT target {args.slo_tpot_ms:g} ms, TTFT {args.slo_ttft_ms:g} ms; "
                f"sustainable {rate:.3g} req/s)", [{c: r[c] for c in columns} for r in rows])  # fmt: skip
    path = plot(rows, args, out, servers)
    plot_trace(rows, out)
    save(partial=False, plot_name=os.path.basename(path))
    print(f"wrote {out / 'slo_serving.json'} and {path}")


if __name__ == "__main__":
    main()
