"""`qwen3guard.v1.Policies`: list, inspect, evaluate and reload the per-domain policies."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import grpc
import yaml

from guard.errors import EngineError, InvalidInput
from guard.model.labels import RiskLevel
from guard.policy.actions import PROMPT_ACTIONS
from guard.policy.loader import PolicyStore
from guard.policy.topics import TopicMatcher
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.replay import replay
from server.retrieval_calls import NotLoaded
from server.stream_guard import RuntimeHolder
from server.tenants import current_tenant
from server.wire import ACTION, RISK, Unavailable, status_of

LEVEL_OF = {pb.SAFE: RiskLevel.SAFE, pb.CONTROVERSIAL: RiskLevel.CONTROVERSIAL, pb.UNSAFE: RiskLevel.UNSAFE}
STAGE_OF = {pb.PROMPT: "prompt", pb.RESPONSE: "response"}
PROB_KEYS = {"safe": RiskLevel.SAFE, "unsafe": RiskLevel.UNSAFE, "controversial": RiskLevel.CONTROVERSIAL}


class PoliciesService(pb_grpc.PoliciesServicer):
    def __init__(self, store: PolicyStore, topics: TopicMatcher | None = None, holder: RuntimeHolder | None = None):
        self.store = store
        self.topics = topics  # the Embedder's topic matcher, for prompts evaluated with `text`
        self.holder = holder  # the stream model (StreamGuard's), for Replay

    def _summary(self, domain: str) -> pb.PolicySummary:
        policy = self.store.policies[domain]
        return pb.PolicySummary(
            domain=domain,
            description=policy.description,
            version=policy.version,
            extends=self.store.effective[domain].get("extends", ""),
            source=policy.source,
        )

    def _visible(self, domain: str) -> bool:
        """A tenant sees the domains it may use (all of them when the sidecar runs open)."""
        tenant = current_tenant.get()
        return tenant is None or tenant.may_use_domain(domain)

    async def List(self, request, context) -> pb.ListPoliciesResponse:
        store = self.store
        return pb.ListPoliciesResponse(
            policies=[self._summary(d) for d in sorted(store.policies) if self._visible(d)],
            generation=store.version,
            last_error=store.last_error,
            default_domain=store.default_domain,
            loaded_at_unix=store.loaded_at,
        )

    async def Get(self, request: pb.GetPolicyRequest, context) -> pb.PolicyDetail:
        domain = request.domain or self.store.default_domain
        if self.store.access_check is not None:
            self.store.access_check(domain)  # PermissionDenied: the interceptor answers PERMISSION_DENIED
        if domain not in self.store.policies:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no policy for domain {domain!r}")
        effective = {k: v for k, v in self.store.effective[domain].items() if k != "extends"}
        return pb.PolicyDetail(summary=self._summary(domain), effective_yaml=yaml.safe_dump(effective, sort_keys=True))

    async def Evaluate(self, request: pb.EvaluateRequest, context) -> pb.EvaluateResponse:
        try:
            if request.stage not in STAGE_OF:
                raise InvalidInput("`stage` must be PROMPT or RESPONSE")
            if request.risk not in LEVEL_OF:
                raise InvalidInput("`risk` must be SAFE, CONTROVERSIAL or UNSAFE")
            probs = None
            if request.probabilities:
                unknown = [k for k in request.probabilities if k.lower() not in PROB_KEYS]
                if unknown:
                    raise InvalidInput(f"`probabilities` keys must be Safe, Unsafe, Controversial; got {unknown}")
                for key, value in request.probabilities.items():
                    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                        raise InvalidInput(f"`probabilities[{key!r}]` must be a number between 0 and 1, got {value:g}")
                probs = {PROB_KEYS[k.lower()]: v for k, v in request.probabilities.items()}
            policy = self.store.get(request.domain)
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        level, action = policy.decide(STAGE_OF[request.stage], LEVEL_OF[request.risk], request.category or None, probs)
        out = pb.EvaluateResponse(action=ACTION[action], effective_risk=RISK[level.name], policy_version=policy.version)
        if request.text and request.stage == pb.PROMPT and policy.topics and self.topics is not None:
            try:
                match = await self.topics.match(policy, request.text)
            except EngineError as exc:
                await context.abort(status_of(exc), f"the topic check (Embedder) failed: {exc}")
            except NotLoaded as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"the topic check cannot run yet: {exc}")
            if match is not None:
                out.topic, out.topic_similarity = match.topic.name, match.similarity
                if PROMPT_ACTIONS.index(match.action) > PROMPT_ACTIONS.index(action):
                    out.action = ACTION[match.action]
        return out

    async def Reload(self, request, context) -> pb.ReloadResponse:
        result = await asyncio.to_thread(self.store.reload)
        return pb.ReloadResponse(ok=result.ok, changed=result.changed, generation=result.version, error=result.error)

    async def Replay(self, request_iterator, context) -> AsyncIterator[pb.ReplayResponse]:
        """`guard eval` on the sidecar's model (server/replay.py)."""
        try:
            if self.holder is None:
                raise Unavailable("Replay needs the StreamGuard service's model, which this sidecar does not serve")
            runtime = self.holder.ready()
            async for response in replay(request_iterator, context, self.store, runtime):
                yield response
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except EngineError as exc:  # a malformed exchange, an unknown domain, an invalid candidate, limits
            await context.abort(status_of(exc), str(exc))
