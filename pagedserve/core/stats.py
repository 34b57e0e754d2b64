"""The scheduler's snapshot after a step (or between steps): what the engine reports to the front
end with every OutputsMsg, and what metrics, SLO admission and the stats log read. Pure Python:
the HTTP layer imports it without the scheduler."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    kv_cache_usage: float  # fraction of GPU blocks in use
    prefix_cache_queries: int  # cumulative, in tokens
    prefix_cache_hits: int
    num_preemptions: int  # cumulative
    num_scheduled_tokens: int  # this step
    kv_slots_allocated: int  # this step: slots in blocks held by scheduled requests
    kv_slots_wasted: int  # of which not holding a token (partial last blocks)
    # the SLO controller (0 / None without objectives): its caps now, the batch-class share of
    # num_waiting, and each class's admission rate (requests/s; None: that class never waited)
    slo_max_num_seqs: int = 0
    slo_token_budget: int = 0
    num_waiting_batch: int = 0
    admit_rate_interactive: float | None = None
    admit_rate_batch: float | None = None
    slo_ramping: bool = False  # the controller's seat cap is still growing (SloController.ramping)
    # the controller's view of the last step: its TPOT signal (the moving high percentile of
    # `span`-step means, seconds; 0 before any), the step-time model's prediction for a decode
    # step of the running batch run as a mixed one (seconds; 0 without a model), the feedback
    # prefill allowance (tokens)
    slo_tpot_signal_s: float = 0.0
    slo_mixed_step_model_s: float = 0.0
    slo_prefill_allowance: int = 0
    # admission control's prefill side: prompt tokens a new request of each class queues behind
    # (the seated requests' rest and the waiting requests it does not pass), the saturated
    # prefill rate (tokens/s; None before any saturated step), the mean prompt of a seated request
    prefill_ahead_interactive: int = 0
    prefill_ahead_batch: int = 0
    slo_prefill_rate: float | None = None
    slo_mean_prompt_tokens: float = 0.0
