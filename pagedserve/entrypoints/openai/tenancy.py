"""What the generation routes do for tenants (ops/tenants.py): one TenantGate per request.

    gate = tenancy.gate(raw, request, path)   model allowed? request rate / concurrency pre-check,
                                              max_tokens cap, required output constraint, deid mode
    gate.redact_messages(request) / gate.redact_prompts(prompts)    before the template / tokenizer
    gate.cap(params)                          max_tokens default from the tenant's cap
    gate.admit(prompt_tokens, max_completion) the atomic limit check + reservation (just before
                                              the engine gets the request); the lease ends in
                                              TenantMiddleware when the response is over
    gate.salted(prompt)                       the prompt dict with the tenant's cache_salt
    gate.outputs(gen, offset)                 the engine's outputs re-identified ("reversible"),
                                              counted, and post-checked when they finish
    gate.annotate(body) / gate.validation_event(...)   the post-check results in the response

Errors are OpenAI errors: 403 (model not allowed), 400 (max_tokens over the cap, a conflicting
constraint, token-id prompts with de-identification), 429 + Retry-After naming the limit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from prometheus_client import CollectorRegistry

from pagedserve.entrypoints.openai.errors import BadRequestError, OpenAIError, RateLimitError
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest, _SamplingRequest
from pagedserve.ops.deid import Deidentifier, StreamRestorer, recognizers_for
from pagedserve.ops.output_check import OutputCheck, Validation, check_for
from pagedserve.ops.rate_limit import Lease, LimitExceeded, TenantLimiter
from pagedserve.ops.tenant_metrics import TenantMetrics
from pagedserve.ops.tenants import TenantContext, TenantRegistry
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams


class Tenancy:
    """Server-wide: the registry, the limiter and the per-tenant metrics."""

    def __init__(self, registry: TenantRegistry, metrics: TenantMetrics, model_names: list[str]) -> None:
        self.registry = registry
        self.metrics = metrics
        self.model_names = model_names
        self.limiter = TenantLimiter(on_release=self._released)

    def context(self, raw: Request) -> TenantContext:
        ctx = getattr(raw.state, "tenant", None)
        if ctx is None:  # no TenantMiddleware in front (an app built without it): resolve here
            principal = getattr(raw.state, "principal", None)
            ctx = self.registry.resolve(getattr(principal, "tenant", None), getattr(principal, "policy", None))
            raw.state.tenant = ctx
        return ctx

    def gate(self, raw: Request, request: _SamplingRequest, path: str) -> TenantGate:
        return TenantGate(self, raw, request, path)

    def _released(self, lease: Lease) -> None:
        model, label, key = lease.meta
        in_flight = self.limiter.state(key).in_flight
        self.metrics.finished(model, label, lease.prompt_tokens, lease.completion_tokens, in_flight)


class TenantGate:
    def __init__(self, tenancy: Tenancy, raw: Request, request: _SamplingRequest, path: str) -> None:
        self.tenancy = tenancy
        self.raw = raw
        self.ctx = ctx = tenancy.context(raw)
        self.model = request.model if request.model is not None else tenancy.model_names[0]
        policy = ctx.policy
        if policy.allowed_models is not None and self.model not in policy.allowed_models:
            self._reject("model", OpenAIError(
                f"Tenant {ctx.name!r} may not use the model `{self.model}`.", status=403,
                type="permission_error", param="model", code="model_not_allowed"))  # fmt: skip
        try:
            tenancy.limiter.precheck(ctx)
        except LimitExceeded as e:
            self._reject(e.limit, _rate_limited(e))
        requested = request.requested_max_tokens()
        if policy.max_tokens is not None and requested is not None and requested > policy.max_tokens:
            name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
            self._reject("max_tokens", BadRequestError(
                f"{name} ({requested}) is over the limit of tenant {ctx.name!r} (max_tokens {policy.max_tokens}).",
                param=name))  # fmt: skip
        self._require_output(request, path)
        mode = request.deidentify or policy.deidentify
        self.deid = Deidentifier(mode, recognizers_for(policy.mrn_patterns)) if mode else None  # type: ignore[arg-type]
        self.cache_salt = ctx.cache_salt(request.cache_salt)
        self.delta = request.is_streaming
        self.check: OutputCheck | None = None
        self.validations: dict[int, Validation] = {}
        self.lease: Lease | None = None

    def _reject(self, limit: str, err: OpenAIError) -> None:
        self.tenancy.metrics.rejected_by(self.model, self.ctx.label, limit)
        raise err

    def _require_output(self, request: _SamplingRequest, path: str) -> None:
        """A tenant's (else the route's) required constraint: added to a request without one; a
        request asking for another is a 400."""
        required = self.ctx.policy.output or self.tenancy.registry.route_output(path)
        if required is None:
            return
        given = request._structured_outputs()
        wanted = StructuredOutputsParams(**required.as_structured_outputs())
        if given is None:
            request.structured_outputs = required.as_structured_outputs()
        elif given.key != wanted.key:
            kind = "JSON schema" if required.json_schema is not None else "regex"
            raise BadRequestError(f"Outputs of tenant {self.ctx.name!r} must match its {kind}; the request "
                                  "asks for another constraint.", param=request.structured_outputs_param())

    # ------------------------------------------------------------------ inputs

    def redact_messages(self, request: ChatCompletionRequest) -> None:
        if self.deid is None:
            return
        for m in request.messages:
            if isinstance(m.content, str):
                m.content = self.deid.redact(m.content)
            elif m.content is not None:
                for part in m.content:
                    part.text = self.deid.redact(part.text)
        self._count_redacted()

    def redact_prompts(self, prompts: list[str | list[int]]) -> list[str | list[int]]:
        if self.deid is None:
            return prompts
        if any(not isinstance(p, str) for p in prompts):
            raise BadRequestError("deidentify needs text prompts: token ids cannot be de-identified.", param="prompt")
        out: list[str | list[int]] = [self.deid.redact(p) for p in prompts if isinstance(p, str)]
        self._count_redacted()
        return out

    def _count_redacted(self) -> None:
        assert self.deid is not None
        self.tenancy.metrics.deidentified_entities(self.model, self.ctx.label, self.deid.counts)
        self.deid.counts = {}

    def cap(self, params: SamplingParams) -> None:
        """A request without max_tokens gets at most the tenant's cap; its post-check follows the
        constraint the request ended up with."""
        cap = self.ctx.policy.max_tokens
        if cap is not None and params.max_tokens is not None and params.max_tokens > cap:
            params.max_tokens = cap
        self.check = check_for(params.structured_outputs)

    def admit(self, prompt_tokens: int, max_completion_tokens: int) -> None:
        try:
            lease = self.tenancy.limiter.admit(self.ctx, prompt_tokens, max_completion_tokens)
        except LimitExceeded as e:
            self._reject(e.limit, _rate_limited(e))
        lease.meta = (self.model, self.ctx.label, self.ctx.limiter_key)
        self.lease = lease
        self.raw.scope.setdefault("state", {})["tenant_lease"] = lease  # ended by TenantMiddleware
        st = self.tenancy.limiter.state(self.ctx.limiter_key)
        self.tenancy.metrics.admitted(self.model, self.ctx.label, st.in_flight, st.peak_in_flight)

    def salted(self, prompt: dict[str, Any]) -> Any:  # a TextPrompt / TokensPrompt dict
        return {**prompt, "cache_salt": self.cache_salt} if self.cache_salt is not None else prompt

    # ------------------------------------------------------------------ outputs

    async def outputs(self, gen: AsyncIterator[RequestOutput], offset: int = 0) -> AsyncIterator[RequestOutput]:
        """`gen`'s outputs with text re-identified and tokens counted; each choice (index
        offset + output index) is post-checked on its last output."""
        restorers: dict[int, StreamRestorer] = {}
        texts: dict[int, list[str]] = {}
        counted: dict[int, int] = {}
        try:
            async for ro in self._rewritten(gen, offset, restorers, texts, counted):
                yield ro
        finally:
            await gen.aclose()  # type: ignore[attr-defined]  # closing aborts the engine request

    async def _rewritten(self, gen: AsyncIterator[RequestOutput], offset: int, restorers: dict[int, StreamRestorer],
                         texts: dict[int, list[str]], counted: dict[int, int]) -> AsyncIterator[RequestOutput]:  # fmt: skip
        async for ro in gen:
            for out in ro.outputs:
                index = offset + out.index
                done = out.finish_reason is not None
                raw = out.text  # what the model generated: the constraint applies to it
                if self.deid is not None:
                    if self.delta:
                        out.text = restorers.setdefault(index, self.deid.stream_restorer()).feed(out.text, done)
                    else:
                        out.text = self.deid.restore(out.text)
                n = len(out.token_ids)
                if self.lease is not None:
                    self.lease.completion_tokens += n if self.delta else n - counted.get(index, 0)
                counted[index] = counted.get(index, 0) + n if self.delta else n
                if self.check is not None:
                    parts = texts.setdefault(index, [])
                    if not self.delta:
                        parts.clear()
                    parts.append(raw)
                    if done:
                        self._validate(index, "".join(parts))
            if self.deid is not None and ro.prompt is not None:
                ro.prompt = self.deid.restore(ro.prompt)
            yield ro

    def _validate(self, index: int, text: str) -> None:
        assert self.check is not None
        error = self.check.check(text)
        self.validations[index] = Validation(error is None, error)
        self.tenancy.metrics.validated(self.model, self.ctx.label, error is None)

    def restore(self, text: str) -> str:
        return self.deid.restore(text) if self.deid is not None else text

    def annotate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Each checked choice of a response body gets `output_validation: {valid, error}`."""
        for choice in body.get("choices", []):
            v = self.validations.get(choice.get("index"))
            if v is not None:
                choice["output_validation"] = v.as_json()
        return body

    def validation_event(self, response_id: str, obj: str) -> str | None:
        """A stream's post-check results: one chunk with no choices before `data: [DONE]`."""
        if not self.validations:
            return None
        results = [{"index": i, **v.as_json()} for i, v in sorted(self.validations.items())]
        chunk = {"id": response_id, "object": obj, "created": int(time.time()), "model": self.model,
                 "choices": [], "output_validation": results}  # fmt: skip
        return f"data: {json.dumps(chunk)}\n\n"


def tenancy_of(extra: dict[str, Any], model_names: list[str]) -> Tenancy:
    """The server's Tenancy (ServerState.extra["tenancy"], set by build_app); a state built
    without it gets default policies and metrics of its own."""
    tenancy = extra.get("tenancy")
    if tenancy is None:
        tenancy = extra["tenancy"] = Tenancy(TenantRegistry(), TenantMetrics(CollectorRegistry()), model_names)
    return tenancy  # type: ignore[no-any-return]


def _rate_limited(e: LimitExceeded) -> RateLimitError:
    err = RateLimitError(e.message, retry_after_s=max(1, math.ceil(e.retry_after_s)))
    err.param = e.limit
    err.code = "rate_limit_exceeded"
    return err
