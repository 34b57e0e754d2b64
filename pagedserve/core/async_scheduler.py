"""The scheduler under async scheduling (vLLM's AsyncScheduler): step n+1 is planned while step n
is in flight, so a request may hold a pending token (num_pending 1 or 2) when it is scheduled.

    step n planned ─ launched ──────────── collected, updated
                  step n+1 planned ─ launched ─────────── collected, updated
                    ^ here the requests of step n have num_pending 1: their token of step n is
                      not known yet (the worker takes it from step n's output on the device)

The pending-token bookkeeping itself is the base Scheduler's (it is a no-op synchronously); the
two decisions that only arise with a token in flight are made here:

  * a pending token that reaches max_tokens or max_model_len ends the request: no step after it
    may be planned (it would sample past the end);
  * a request preempted with a token in flight resumes only after that token's update.
"""

from __future__ import annotations

from pagedserve.core.request import Request
from pagedserve.core.scheduler import Scheduler


class AsyncScheduler(Scheduler):
    def _pending_ends(self, request: Request) -> bool:
        if not request.num_pending:
            return False
        max_tokens = request.sampling_params.max_tokens
        return (
            (max_tokens is not None and request.num_output_tokens + request.num_pending >= max_tokens)
            or request.num_tokens + request.num_pending >= self.config.max_model_len
        )

    def _token_in_flight(self, request: Request) -> bool:
        return request.num_pending > 0
