"""Stop conditions the scheduler can decide from token ids alone.

Stop strings need text and are checked by the output processor, which then aborts the request.
"""

from __future__ import annotations

from pagedserve.core.request import Request, RequestStatus


def check_stop(request: Request, token: int, max_model_len: int) -> RequestStatus | None:
    """Decide, after `token` was appended, whether the request is done; sets stop_reason."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        if token == request.eos_token_id and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if params.stop_token_ids and token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
