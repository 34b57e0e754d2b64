"""`pagedserve tune`: the engine settings with the highest goodput under the SLOs, found by optuna.

    pagedserve tune [--model M] [--workload sharegpt|FILE.jsonl] [--slo-ttft-ms MS] [--slo-tpot-ms MS]
                    [--request-rate R] [--trials N] [--patience K] [-o tuned.yaml]

Searched: max_num_seqs, max_num_batched_tokens, chunked prefill, async scheduling, block size.
Trial 0 is the defaults (so the choice is never worse than them on the measured workload); each
trial builds an in-process engine and replays the workload at the request rate (replay.py).
Without --request-rate the rate is the defaults' saturated throughput, measured first with every
request arriving at once. Early stopping: a trial whose goodput so far trails the median of the
earlier trials at the same point is pruned (optuna's MedianPruner), and the search stops after
--patience trials without a better one. The result is a YAML file of server flags for
`pagedserve serve --config FILE` (entrypoints/config_file.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pagedserve.config import EngineArgs, parse_slo_ms
from pagedserve.tune.replay import Objectives, ReplayResult, replay
from pagedserve.tune.workload import Workload, load_jsonl, poisson_arrivals, sharegpt_like

logger = logging.getLogger("pagedserve.tune")

SPACE: dict[str, list[Any]] = {
    "max_num_seqs": [8, 16, 32, 64, 128, 256, 512],
    "max_num_batched_tokens": [256, 512, 1024, 2048, 4096, 8192, 16384],
    "enable_chunked_prefill": [True, False],
    "async_scheduling": [False, True],
    "block_size": [8, 16, 32],
}
DEFAULTS: dict[str, Any] = {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "enable_chunked_prefill": True,
                            "async_scheduling": False, "block_size": 16}  # fmt: skip
CHECKPOINTS = 4  # intermediate reports per trial, for the pruner


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagedserve tune", allow_abbrev=False,
                                description="Search engine settings for the highest goodput under SLOs.")  # fmt: skip
    p.add_argument("--model", default=None, help="model directory or hub id (default: the demo model)")
    p.add_argument("--workload", default="sharegpt", help="'sharegpt' (the built-in mix) or a JSONL file")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--max-prompt-len", type=int, default=None, help="cut prompts to this many tokens")
    p.add_argument("--max-output-len", type=int, default=None, help="cut outputs to this many tokens")
    p.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrivals per second (default: the defaults' saturated throughput)")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--patience", type=int, default=8, help="stop after this many trials without improvement")
    p.add_argument("--trial-timeout", type=float, default=600.0, help="seconds a trial's replay may take")
    p.add_argument("--max-num-seqs-limit", type=int, default=None, help="search max_num_seqs up to this")
    p.add_argument("--with-slo", action="store_true",
                   help="trials run with the SLO controller on (--slo-*-ms), as the server would")
    p.add_argument("-o", "--output", default="pagedserve-tuned.yaml")
    p.add_argument("--json", default=None, help="also write every trial's measurements here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("engine (passed to every trial and written to the file)")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--enforce-eager", action="store_true")
    return p


class Tuner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.objectives = Objectives(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
        self.engine_flags = {k: v for k, v in {
            "dtype": args.dtype if args.dtype != "auto" else None, "max_model_len": args.max_model_len,
            "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "device": args.device if args.device != "auto" else None, "enforce_eager": args.enforce_eager or None,
        }.items() if v is not None}  # fmt: skip
        self.work: Workload | None = None
        self.rate: float | None = args.request_rate
        self.trials: list[dict[str, Any]] = []

    def engine_args(self, params: dict[str, Any]) -> EngineArgs:
        kwargs = dict(self.engine_flags, **params)
        if not params["enable_chunked_prefill"] and self.work is not None:
            # without chunking a prompt is scheduled whole: the budget must hold the longest
            longest = max(len(p) for p in self.work.prompts) + 1
            kwargs["max_num_batched_tokens"] = max(params["max_num_batched_tokens"], longest)
        if self.args.with_slo:
            kwargs.update(slo_ttft_ms=self.args.slo_ttft_ms, slo_tpot_ms=self.args.slo_tpot_ms)
        return EngineArgs(model=self.args.model, **kwargs)

    def measure(self, params: dict[str, Any], rate: float | None, trial: Any = None) -> ReplayResult:
        from pagedserve.engine.llm_engine import LLMEngine

        loading = self.work is None
        engine = LLMEngine.from_engine_args(self.engine_args(params))
        try:
            if loading:
                self.work = self.load_workload(engine)
                if not params["enable_chunked_prefill"]:  # its budget depends on the workload: rebuild
                    del engine
                    gc.collect()
                    engine = LLMEngine.from_engine_args(self.engine_args(params))
            work = self.work
            assert work is not None
            arrivals = poisson_arrivals(len(work.prompts), rate, self.args.seed)
            marks = {max(1, round(len(work.prompts) * (i + 1) / (CHECKPOINTS + 1))) for i in range(CHECKPOINTS)}

            def progress(done: int, goodput: float) -> bool:
                if trial is None or done not in marks:
                    return False
                trial.report(goodput, done)
                return bool(trial.should_prune())

            result = replay(engine, work, arrivals, self.objectives, progress, self.args.trial_timeout)
            if trial is not None and trial.should_prune():
                import optuna

                raise optuna.TrialPruned()
            return result
        finally:
            del engine
            gc.collect()

    def load_workload(self, engine: Any) -> Workload:
        a = self.args
        if a.workload == "sharegpt":
            work = sharegpt_like(engine.vocab_size, a.num_requests)
        else:
            work = load_jsonl(a.workload, lambda text: engine.tokenizer.encode(text), a.num_requests)
        return work.clipped(a.max_prompt_len, a.max_output_len, engine.config.scheduler_config.max_model_len)

    def objective(self, trial: Any) -> float:
        limit = self.args.max_num_seqs_limit
        params = {
            name: trial.suggest_categorical(
                name, [v for v in values
                       if name != "max_num_seqs" or limit is None or v <= limit or v == DEFAULTS[name]])
            for name, values in SPACE.items()
        }  # fmt: skip
        try:
            result = self.measure(params, self.rate, trial)
        except ValueError as e:  # settings the engine refuses (a block size the cache cannot hold...)
            logger.warning("trial %d refused: %s", trial.number, e)
            self.trials.append({"number": trial.number, "params": params, "error": str(e)})
            return 0.0
        row = {"number": trial.number, "params": params, **result.summary()}
        self.trials.append(row)
        for key, value in result.summary().items():
            trial.set_user_attr(key, value)
        return result.goodput_rps

    def run(self) -> dict[str, Any]:
        import optuna

        a = self.args
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self.rate is None:  # the defaults' saturated throughput: every request at once
            saturated = self.measure(dict(DEFAULTS), None)
            self.rate = saturated.throughput_rps
            logger.info("request rate: %.2f/s (the defaults' saturated throughput)", self.rate)
        sampler = optuna.samplers.TPESampler(seed=a.seed, n_startup_trials=min(5, max(1, a.trials // 3)))
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
        study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
        study.enqueue_trial(dict(DEFAULTS))
        best = {"value": -1.0, "since": 0}

        complete = optuna.trial.TrialState.COMPLETE

        def patience(study: Any, trial: Any) -> None:
            # (a pruned trial carries its last intermediate value: not a result)
            if trial.state == complete and trial.value > best["value"]:
                best["value"], best["since"] = trial.value, 0
            else:
                best["since"] += 1
            if best["since"] >= a.patience:
                study.stop()

        study.optimize(self.objective, n_trials=a.trials, callbacks=[patience],
                       show_progress_bar=not a.no_progress, gc_after_trial=True)  # fmt: skip
        completed = [t for t in study.trials if t.state == complete]
        chosen = max(completed, key=lambda t: (t.value, -t.number))
        default_row = next(r for r in self.trials if r["number"] == 0)
        return {"best": {"number": chosen.number, "params": chosen.params, **chosen.user_attrs},
                "defaults": default_row, "request_rate_rps": self.rate, "trials": self.trials,
                "objectives": {"slo_ttft_ms": a.slo_ttft_ms, "slo_tpot_ms": a.slo_tpot_ms}}  # fmt: skip


def config_yaml(tuner: Tuner, report: dict[str, Any]) -> str:
    """The serve --config file: flag names as keys; the searched settings, the engine flags the
    trials ran with and the objectives."""
    import yaml

    params = dict(report["best"]["params"])
    if not params["enable_chunked_prefill"]:
        params["max_num_batched_tokens"] = tuner.engine_args(params).max_num_batched_tokens
    flags: dict[str, Any] = {}
    if tuner.args.model:
        flags["model"] = tuner.args.model
    for key, value in {**tuner.engine_flags, **params}.items():
        flags[key.replace("_", "-")] = value
    flags["slo-ttft-ms"] = tuner.args.slo_ttft_ms
    flags["slo-tpot-ms"] = tuner.args.slo_tpot_ms
    best, defaults = report["best"], report["defaults"]
    header = (
        "# pagedserve tune: the highest goodput under the SLOs on the measured workload\n"
        f"# goodput {best.get('goodput_rps', 0):.3f} req/s (defaults: {defaults.get('goodput_rps', 0):.3f}) "
        f"at {report['request_rate_rps']:.3f} req/s; SLO attainment {best.get('slo_attainment', 0):.3f} "
        f"(defaults: {defaults.get('slo_attainment', 0):.3f})\n# use: pagedserve serve --config FILE\n"
    )
    return header + yaml.safe_dump(flags, sort_keys=False)


def tune_main(argv: Sequence[str]) -> int:
    args = make_parser().parse_args(argv)
    for name in ("slo_ttft_ms", "slo_tpot_ms"):
        parse_slo_ms(getattr(args, name), name)  # positive and finite
    if args.model is None:
        from pagedserve.testing.checkpoints import build_demo_checkpoint

        args.model = build_demo_checkpoint()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    tuner = Tuner(args)
    report = tuner.run()
    Path(args.output).write_text(config_yaml(tuner, report), encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    best, defaults = report["best"], report["defaults"]
    print(f"best (trial {best['number']}): {json.dumps(best['params'])}")
    print(f"goodput {best.get('goodput_rps', 0):.3f} req/s vs defaults {defaults.get('goodput_rps', 0):.3f} "
          f"at {report['request_rate_rps']:.3f} req/s; wrote {args.output}")  # fmt: skip
    return 0
