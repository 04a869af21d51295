"""`qwen3guard.reasoning.v1.Reasoner`: reasoning models with thinking control, SAE steering and the
memory agent, every streamed token guarded.

One generation, on the response session of StreamGuard (its runtime, policies, metrics):
1. the prompt is judged (BLOCK ends the stream before anything is generated);
2. with a document beyond the window, the memory agent reads it chunk by chunk (progress events);
3. the backend generates on the token path (Qwen3 ids: local, or a vLLM upstream whose tokenizer
   is Qwen3's); ``PhaseTracker`` splits the response into reasoning and answer. The answer always
   goes through the session; the reasoning too unless the policy says ``moderate_reasoning:
   false`` (then the guard sees the answer in its usual frame, after an empty think block, and the
   reasoning streams unjudged). An interrupt aborts the backend's request;
4. a thinking budget: at N reasoning tokens the request is stopped and continued with
   ``</think>`` appended, so the model answers (every backend: the continuation is a new request
   on the same prefix, which vLLM's prefix cache serves cheaply).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from guard.errors import FailedPrecondition, InvalidInput
from guard.policy.rules import FailMode, Policy
from guard.reasoning.thinking import ANSWER, REASONING, PhaseTracker, ThinkTokens
from guard.session.release import IncrementalDetokenizer, ReleaseMode, special_token_ids
from guard.session.response_session import ChunkOutcome, FinalOutcome, PromptOutcome, ResponseSession
from guard.text.conversation import Message, parse_messages
from server.guarded_generation import MAX_TOKENS, TOKENIZER_PROBE, GuardedGenerationService
from server.qwen3guard.reasoning.v1 import reasoning_pb2 as pb
from server.qwen3guard.reasoning.v1 import reasoning_pb2_grpc as pb_grpc
from server.qwen3guard.v1 import guard_pb2 as gpb
from server.retrieval_calls import ModelHolder, NotLoaded
from server.stream_guard import StreamGuardService, prompt_pb, requested_release_mode
from server.upstream import Sampling, UpstreamError, UpstreamPrompt, take_finish_reason
from server.wire import check_token_detail, error_status, fill_chunk

log = logging.getLogger(__name__)

DEFAULT_RECALL_TOP_K, DEFAULT_RECALL_MIN_HITS, DEFAULT_RECALL_LIMIT = 10, 2, 100
MAX_RECALL_TOP_K = 1000
MAX_KEYWORDS = 64


# A document the memory agent reads is judged in windows (``ReasonerModel.document_window`` guard
# tokens) that overlap by a quarter, up to this many, so that nothing is judged only in pieces; a few
# windows at once, so the engine batches their prefills.
DOCUMENT_WINDOW_OVERLAP, DOCUMENT_WINDOWS_AT_ONCE = 128, 4
DOCUMENT_TEMPLATE_TOKENS = 64  # the chat template around one window and the question

MAX_STEERS = 8  # steers in one request
MAX_TRIGGER_CHARS = 256  # a trigger is matched on every token: keep it short


def trigger_starts(triggered: list, response: list[int], decode: Callable[[list[int]], str]) -> list[int | None]:
    """Where each triggered steer started in ``response`` (None: its trigger never appeared), found
    the way the decode loop finds them (``TriggerWatch``), token by token."""
    from guard.reasoning.steering import TriggerWatch

    starts: list[int | None] = []
    for steer in triggered:
        watch, start = TriggerWatch([steer], decode), None
        for k in range(1, len(response) + 1):
            fired = watch.observe(response[:k])
            if fired:
                start = fired[0].start
                break
        starts.append(start)
    return starts


@dataclass
class ReasonerModel:
    """What the Reasoner generates with: a backend speaking ``server.upstream.Upstream`` (the local
    model, or a vLLM upstream), and what the local backend adds (the SAE)."""

    backend: Any
    name: str
    context_window: int
    tokenizer: Any  # Qwen3's (the local model's, or the guard's for a vLLM upstream)
    memory_config: Any  # guard.reasoning.memory_agent.MemoryAgentConfig
    memory_templates: Any  # guard.reasoning.memory_agent.MemoryTemplates
    sae: Any = None  # guard.reasoning.sae.SparseAutoencoder
    unembedding: Any = None  # the local model's LM head weight (recall)
    memory_window: int = 0  # documents longer than this (tokens) go through the memory agent
    document_window: int = 2048  # such a document is judged in windows of this many guard tokens
    demo: dict | None = None
    steer_limits: Any = None  # guard.reasoning.steering.SteerLimits

    @property
    def can_steer(self) -> bool:
        return bool(getattr(self.backend, "can_steer", False)) and self.sae is not None


def check_window(model: ReasonerModel, prompt_tokens: int, max_tokens: int, what: str = "the prompt") -> None:
    """A request fits the model's context window, prompt and all it may generate (as vLLM checks)."""
    if prompt_tokens + max_tokens > model.context_window:
        raise InvalidInput(
            f"{what} has {prompt_tokens} tokens and up to {max_tokens} may be generated (sampling.max_tokens); "
            f"together that exceeds the model's context window of {model.context_window} tokens"
        )


class ReasonerHolder(ModelHolder[ReasonerModel]):
    def __init__(self) -> None:
        super().__init__("reasoning")


def generation_preamble(
    tokenizer: Any, messages: list[Message], prompt_ids: tuple[int, ...], thinking: bool
) -> list[int]:
    """The assistant header the model is prompted with (the chat template's generation prompt,
    thinking on or off), checked to follow the judged prompt exactly."""
    text = tokenizer.apply_chat_template(
        [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tuple(ids[: len(prompt_ids)]) != prompt_ids:
        raise InvalidInput("the chat template renders the generation prompt differently from the judged prompt")
    return ids[len(prompt_ids) :]


class ReasonerService(pb_grpc.ReasonerServicer):
    def __init__(self, holder: ReasonerHolder, guard: StreamGuardService) -> None:
        self.holder = holder
        self.guard = guard  # its runtime, policies, metrics and fail-mode logic
        self._token_path: bool | None = None  # a vLLM upstream's ids are Qwen3 ids (checked once)

    async def _check_token_path(self, model: ReasonerModel, runtime) -> None:
        """The Reasoner reads ids (phases, budget, guard): a vLLM upstream must tokenize as Qwen3."""
        if getattr(model.backend, "name", "") == "local":
            return
        if self._token_path is None:
            theirs = await model.backend.tokenize(TOKENIZER_PROBE)
            self._token_path = list(theirs) == runtime.tokenizer.hf.encode(TOKENIZER_PROBE, add_special_tokens=False)
        if not self._token_path:
            raise FailedPrecondition("the Reasoner needs an upstream serving a Qwen3 model (its tokenizer differs)")

    # ------------------------------------------------------------------ Generate

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        session: ResponseSession | None = None
        request_id = request.request_id or uuid.uuid4().hex
        code, message = grpc.StatusCode.OK, ""
        try:
            model = self.holder.get()
            runtime = self.guard.holder.ready()
            await self._check_token_path(model, runtime)
            sampling = GuardedGenerationService._sampling(request.sampling)
            check_token_detail(request.token_detail, "GenerateRequest")
            policy = self.guard.policies.get(request.domain)
            thinking = request.enable_thinking if request.HasField("enable_thinking") else True
            steering = self._steering(model, request.steer)
            memory_mode = False
            if request.HasField("document"):
                if request.messages:
                    raise InvalidInput("give `messages` or `document`, not both")
                question, document = request.document.question.strip(), request.document.text
                if not question or not document.strip():
                    raise InvalidInput("`document` needs both `text` and `question`")
                agent = self._memory_agent(model, thinking)
                memory_mode = await asyncio.to_thread(agent.needs_memory, document, model.memory_window)
                # within the window the document is read in one pass, as part of the user turn
                messages = [Message("user", question if memory_mode else f"{document}\n\n{question}")]
            else:
                messages = parse_messages([{"role": m.role, "content": m.content} for m in request.messages])
            rendered = runtime.tokenizer.render_prompt(messages)
            preamble = generation_preamble(runtime.tokenizer.hf, messages, rendered.prompt_ids, thinking)
            moderate_reasoning = policy.moderate_reasoning
            tokens = ThinkTokens.of(runtime.tokenizer.hf)
            # the guard's frame: the whole response after the assistant header, or (reasoning not
            # moderated) the answer after an empty think block, as the guard was trained
            guard_preamble = preamble if thinking and moderate_reasoning else rendered.preamble_ids
            stream = runtime.moderator.open(
                prompt_ids=rendered.prompt_ids, preamble_ids=guard_preamble, policy=policy,
                loop=asyncio.get_running_loop(),
            )  # fmt: skip
            session = ResponseSession(
                stream,
                policy,
                requested_release_mode(request.release_mode, policy),
                runtime.tokenizer.hf,
                draining=lambda: self.guard.holder.draining,
                audit=self.guard.audit_trail(policy, request_id, "reasoner"),
            )
            generation_prompt = [*rendered.prompt_ids, *preamble]
            if not memory_mode:  # the memory agent's answer prompt is checked once it exists
                check_window(model, len(generation_prompt), sampling.max_tokens)
            prompt = await session.judge_prompt(self.guard.topic_check(policy, messages))
            self.guard.record_prompt(policy, prompt)
            blocked_by = ""
            if memory_mode and not prompt.blocked:  # the document is input too: judged before it is read
                question = request.document.question.strip()
                found = await self._judge_document(model, runtime, policy, question, document, request_id)
                if found is not None:
                    prompt, blocked_by = found
            prompt_msg = prompt_pb(prompt, policy)
            yield pb.GenerateResponse(
                start=pb.GenerationStart(
                    prompt=prompt_msg,
                    backend=model.backend.name,
                    request_id=request_id,
                    moderate_reasoning=moderate_reasoning,
                    memory_agent=memory_mode,
                )
            )
            if prompt.blocked:
                self.guard.metrics.reasoner_generations.labels(model.backend.name, "blocked").inc()
                category = prompt_msg.verdict.category
                what = blocked_by or "prompt"
                reason = prompt.model_failure or f"{what} blocked by the {policy.name} policy ({category})"
                yield pb.GenerateResponse(end=pb.GenerationEnd(finish_reason="blocked", stopped=True, reason=reason))
                return
            memory_calls = 0
            if memory_mode:
                async for event in self._read_document(model, agent, request, sampling):
                    if isinstance(event, list):
                        generation_prompt = event
                    else:
                        memory_calls += 1
                        yield pb.GenerateResponse(progress=event)
                check_window(model, len(generation_prompt), sampling.max_tokens)
            reasoning = _Reasoning(
                self, model, session, policy, request_id, tokens,
                thinking=thinking, moderate_reasoning=moderate_reasoning,
                budget=request.thinking_budget, detail=request.token_detail or gpb.ALL_TOKENS,
                prompt_tokens=len(generation_prompt), memory_calls=memory_calls,
            )  # fmt: skip
            async with contextlib.aclosing(reasoning.run(generation_prompt, sampling, steering)) as responses:
                async for response in responses:
                    yield response
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except UpstreamError as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, f"reasoning backend: {exc}"
        except NotLoaded as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except Exception as exc:
            code, message = error_status(exc, request_id=request_id, rpc="Reasoner.Generate")
        finally:
            if session is not None:
                session.close("ended" if code == grpc.StatusCode.OK else f"ended: {code.name}")
            if code != grpc.StatusCode.OK:
                self.guard.metrics.errors.labels(code.name).inc()
        if code != grpc.StatusCode.OK:
            await context.abort(code, message)

    @staticmethod
    def _memory_agent(model: ReasonerModel, thinking: bool):
        from guard.reasoning.memory_agent import MemoryAgent

        config = replace(model.memory_config, answer_thinking=thinking)
        return MemoryAgent(model.tokenizer, config, model.memory_templates)

    async def _read_document(self, model: ReasonerModel, agent, request, sampling: Sampling):
        """The memory agent over the backend: progress messages, then the answer prompt (a list)."""
        from guard.reasoning.memory_agent import ChunkDone, Ready

        limit = model.memory_config.memory_tokens

        async def complete(prompt_ids: list[int]) -> str:
            request_id = uuid.uuid4().hex
            step = replace(sampling, max_tokens=max(limit * 2, 16), stop=())
            check_window(model, len(prompt_ids), step.max_tokens, what="a memory-agent call's prompt")
            text = []
            deltas = model.backend.generate(request_id, UpstreamPrompt(token_ids=tuple(prompt_ids)), step)
            try:
                async with contextlib.aclosing(deltas):
                    async for delta in deltas:
                        text.append(delta.text)
            finally:
                take_finish_reason(model.backend, request_id)
            return "".join(text)

        async for event in agent.run(request.document.question.strip(), request.document.text, complete):
            if isinstance(event, ChunkDone):
                yield pb.Progress(
                    chunk=event.index + 1,
                    chunks=event.total,
                    memory_tokens=event.memory_tokens,
                    memory_truncated=event.truncated,
                )
            elif isinstance(event, Ready):
                yield list(event.answer_prompt_ids)

    async def _judge_document(
        self, model: ReasonerModel, runtime, policy: Policy, question: str, document: str, request_id: str
    ) -> tuple[PromptOutcome, str] | None:
        """A document read by the memory agent is longer than the guard reads at once: it is judged
        in overlapping windows, each as a user turn with the question, as the prompt is. The first
        window the policy blocks (its outcome and which window it was), or None."""
        hf = runtime.tokenizer.hf
        question_tokens = len(hf.encode(question, add_special_tokens=False))
        room = runtime.engine.limits.max_tokens_per_session - question_tokens - DOCUMENT_TEMPLATE_TOKENS
        size = min(model.document_window, room)
        overlap = min(DOCUMENT_WINDOW_OVERLAP, size // 4)
        if size < model.document_window // 2:
            raise InvalidInput(f"the question has {question_tokens} tokens: too long to judge the document beside it")
        ids = await asyncio.to_thread(hf.encode, document, add_special_tokens=False, split_special_tokens=True)
        starts = range(0, max(len(ids) - overlap, 1), size - overlap)
        loop = asyncio.get_running_loop()

        def render(start: int):
            text = hf.decode(ids[start : start + size])
            return runtime.tokenizer.render_prompt([Message("user", f"{text}\n\n{question}")])

        async def judge(start: int) -> PromptOutcome:
            rendered = await asyncio.to_thread(render, start)  # decoding and templating: off the event loop
            stream = runtime.moderator.open(
                prompt_ids=rendered.prompt_ids, preamble_ids=rendered.preamble_ids, policy=policy, loop=loop
            )
            audit = self.guard.audit_trail(policy, request_id, "reasoner_document", end_record=False)
            session = ResponseSession(stream, policy, ReleaseMode.HOLD_BACK, hf, audit=audit)
            try:
                outcome = await session.judge_prompt()
            finally:
                session.close("document window judged")
            self.guard.record_prompt(policy, outcome)
            return outcome

        for group in range(0, len(starts), DOCUMENT_WINDOWS_AT_ONCE):  # the engine batches a group's prefills
            batch = starts[group : group + DOCUMENT_WINDOWS_AT_ONCE]
            outcomes = await asyncio.gather(*(judge(start) for start in batch))
            for k, outcome in enumerate(outcomes):
                if outcome.blocked:
                    return outcome, f"the document (window {group + k + 1} of {len(starts)})"
        return None

    def _steering(self, model: ReasonerModel, steers) -> _SteerPlan:
        """The request's steers as directions, validated; FAILED_PRECONDITION where the backend
        cannot steer."""
        plan = _SteerPlan()
        if not steers:
            return plan
        if not getattr(model.backend, "can_steer", False):
            raise FailedPrecondition(
                f"steering needs the local backend (a transformers model with an SAE); this Reasoner runs on "
                f"{model.backend.name}"
            )
        if model.sae is None:
            raise FailedPrecondition("steering needs an SAE: start the Reasoner with --reasoner-sae DIR")
        limits = model.steer_limits
        if len(steers) > MAX_STEERS:
            raise InvalidInput(f"{len(steers)} steers; at most {MAX_STEERS} per request")
        from guard.reasoning.steering import Steer, TriggeredSteer

        for i, s in enumerate(steers):
            what = f"steer[{i}]"
            if not math.isfinite(s.alpha) or abs(s.alpha) > limits.max_alpha:
                raise InvalidInput(f"{what}.alpha is {s.alpha}; it must be finite and within ±{limits.max_alpha}")
            if not 1 <= s.tokens <= limits.max_tokens:
                raise InvalidInput(f"{what}.tokens is {s.tokens}; it must be in [1, {limits.max_tokens}]")
            direction, label = self._direction(model, s, what)
            which = s.WhichOneof("start")
            if which == "trigger":
                if not s.trigger or len(s.trigger) > MAX_TRIGGER_CHARS:
                    raise InvalidInput(f"{what}.trigger is empty or longer than {MAX_TRIGGER_CHARS} characters")
                plan.triggered.append(TriggeredSteer(s.trigger, direction, s.alpha, s.tokens))
                plan.labels.append((label, s.alpha, None, s.tokens))
            else:
                if s.offset >= MAX_TOKENS:
                    raise InvalidInput(f"{what}.offset is {s.offset}; a response has at most {MAX_TOKENS} tokens")
                plan.fixed.append(Steer(direction, s.alpha, s.offset, s.tokens))
                plan.labels.append((label, s.alpha, s.offset, s.tokens))
        return plan

    @staticmethod
    def _direction(model: ReasonerModel, steer, what: str):
        import torch

        sae = model.sae
        target = steer.WhichOneof("target")
        if target == "feature":
            if steer.feature >= sae.width:
                raise InvalidInput(f"{what}.feature {steer.feature} is not an SAE feature (width {sae.width})")
            return sae.direction(steer.feature), f"feature {steer.feature}"
        if target == "strategy":
            features = sae.strategies().get(steer.strategy)
            if not features:
                known = ", ".join(sorted(sae.strategies())) or "none: the SAE has no features file"
                raise InvalidInput(f"{what}.strategy {steer.strategy!r} is unknown; strategies: {known}")
            summed = sum(sae.direction(i) for i in features)
            return summed / summed.norm().clamp_min(1e-12), f"strategy {steer.strategy}"
        if target == "vector":
            values = torch.tensor(list(steer.vector.values), dtype=torch.float32)
            if values.numel() != sae.d_model or not torch.isfinite(values).all() or float(values.norm()) == 0.0:
                raise InvalidInput(
                    f"{what}.vector must be {sae.d_model} finite values, not all zero (got {values.numel()})"
                )
            return values / values.norm(), "vector"
        raise InvalidInput(f"{what} names no feature, strategy or vector")

    # ------------------------------------------------------------------ Info and the SAE

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        try:
            model = self.holder.get()
        except NotLoaded as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        sae = model.sae
        memory = model.memory_config
        return pb.InfoResponse(
            backend=model.backend.name,
            model=model.name,
            context_window=model.context_window,
            sae_loaded=sae is not None,
            sae_layer=sae.layer if sae is not None else 0,
            sae_width=sae.width if sae is not None else 0,
            strategies=sorted(sae.strategies()) if sae is not None else [],
            can_steer=model.can_steer,
            memory_window=model.memory_window,
            chunk_tokens=memory.chunk_tokens,
            memory_tokens=memory.memory_tokens,
            demo=bool(model.demo),
            max_alpha=model.steer_limits.max_alpha,
            max_steer_tokens=model.steer_limits.max_tokens,
        )

    async def ListFeatures(self, request, context: grpc.aio.ServicerContext) -> pb.ListFeaturesResponse:
        model = await self._with_sae(context)
        return pb.ListFeaturesResponse(
            features=[
                pb.Feature(index=i, strategy=name) for name, idx in sorted(model.sae.strategies().items()) for i in idx
            ]
        )

    async def RecallFeatures(self, request, context: grpc.aio.ServicerContext) -> pb.RecallFeaturesResponse:
        model = await self._with_sae(context)
        keywords = [k.strip() for k in request.keywords if k.strip()]
        problem = ""
        if not keywords:
            problem = "`keywords` is empty"
        elif len(keywords) > MAX_KEYWORDS:
            problem = f"{len(keywords)} keywords; at most {MAX_KEYWORDS}"
        elif request.top_k > MAX_RECALL_TOP_K:
            problem = f"top_k {request.top_k} is above {MAX_RECALL_TOP_K}"
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if model.unembedding is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "recall needs the local model's unembedding")
        top_k = request.top_k or DEFAULT_RECALL_TOP_K
        min_hits = request.min_hits or DEFAULT_RECALL_MIN_HITS
        found = await asyncio.to_thread(
            model.sae.recall, keywords, model.unembedding, model.tokenizer, top_k=top_k, min_hits=min_hits
        )
        strategy_of = {i: name for name, idx in model.sae.strategies().items() for i in idx}
        return pb.RecallFeaturesResponse(
            features=[
                pb.RecalledFeature(index=f.index, hits=f.hits, tokens=f.tokens, strategy=strategy_of.get(f.index, ""))
                for f in found[: request.limit or DEFAULT_RECALL_LIMIT]
            ]
        )

    async def _with_sae(self, context) -> ReasonerModel:
        try:
            model = self.holder.get()
        except NotLoaded as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if model.sae is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no SAE is loaded (--reasoner-sae DIR)")
        return model


@dataclass
class _SteerPlan:
    fixed: list = field(default_factory=list)  # guard.reasoning.steering.Steer
    triggered: list = field(default_factory=list)  # guard.reasoning.steering.TriggeredSteer
    labels: list = field(default_factory=list)  # (target, alpha, offset or None, tokens), in request order


class _Reasoning:
    """One guarded reasoning generation: backend deltas in, reasoning and answer deltas out."""

    def __init__(
        self,
        service: ReasonerService,
        model: ReasonerModel,
        session: ResponseSession,
        policy: Policy,
        request_id: str,
        tokens: ThinkTokens,
        *,
        thinking: bool,
        moderate_reasoning: bool,
        budget: int,
        detail: int,
        prompt_tokens: int,
        memory_calls: int,
    ) -> None:
        self.guard = service.guard
        self.model = model
        self.backend = model.backend
        self.session = session
        self.policy = policy
        self.request_id = request_id
        self.tokens = tokens
        self.moderate_reasoning = moderate_reasoning
        self.detail = detail
        self.prompt_tokens = prompt_tokens
        self.memory_calls = memory_calls
        self.thinking = thinking
        self.budget = budget
        self.tracker: PhaseTracker | None = None
        self.response: list[int] = []
        self.answer_start: int | None = None  # response index of the first answer token
        self.raw_reasoning = IncrementalDetokenizer(model.tokenizer)  # unjudged reasoning text
        self.hidden = special_token_ids(model.tokenizer)  # as released text: control tokens stay ids
        self.budget_reached = False
        self._interrupt: ChunkOutcome | None = None

    async def run(
        self, prompt: list[int], sampling: Sampling, steering: _SteerPlan
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.tracker = PhaseTracker(
            self.tokens, thinking=self.thinking, prompt_opened=self.tokens.opened_by(prompt), budget=self.budget
        )
        # a backend that writes the closing ids itself keeps one pass (KV cache, sampler, steering);
        # any other is stopped at the budget and asked again with them appended
        inline = self.budget > 0 and bool(getattr(self.backend, "closes_thinking", False))
        segment_prompt, segment, finish = list(prompt), 0, "stop"
        interrupt: ChunkOutcome | None = None
        error: UpstreamError | None = None
        while True:
            request_id = self.request_id if segment == 0 else f"{self.request_id}-{segment}"
            kwargs: dict[str, Any] = {}
            if steering.labels:  # only a backend that can steer gets here (and it closes inline)
                kwargs.update(steers=steering.fixed, triggered=steering.triggered)
            if inline:
                kwargs["close_thinking"] = self.tracker.copy()
            left = sampling.max_tokens - len(self.response)
            deltas = self.backend.generate(
                request_id,
                UpstreamPrompt(token_ids=tuple(segment_prompt)),
                replace(sampling, max_tokens=left),
                **kwargs,
            )
            cut = False
            try:
                async with contextlib.aclosing(deltas):
                    async for delta in deltas:
                        finish = delta.finish_reason or finish
                        ids = list(delta.token_ids)
                        if inline:  # what follows a spent budget is the backend's closing ids
                            self.budget_reached = self.budget_reached or (bool(ids) and self.tracker.budget_reached)
                        else:  # the budget cuts a delta exactly
                            taken = self.tracker.accept(ids)
                            ids, cut = ids[:taken], taken < len(ids)
                        async for response in self._push(ids):
                            yield response
                        if self._interrupt is not None:
                            interrupt = self._interrupt
                            break
                        if not inline and (cut or self.tracker.budget_reached):
                            cut = True
                            break
                    if interrupt is not None:
                        await self._abort(request_id)  # then closing the stream ends it everywhere
            except UpstreamError as exc:
                error = exc
            finally:
                take_finish_reason(self.backend, request_id)
            if error is not None or interrupt is not None or not cut or len(self.response) >= sampling.max_tokens:
                break
            # the thinking budget is spent: close the reasoning and let the model answer
            self.budget_reached = True
            async for response in self._push(list(self.tokens.closing_ids)):
                yield response
            if self._interrupt is not None:
                interrupt = self._interrupt
                break
            if len(self.response) >= sampling.max_tokens:  # no room left to answer
                finish = "length"
                break
            segment += 1
            segment_prompt = [*prompt, *self.response]
            finish = "stop"
        if error is not None:
            async for response in self._upstream_failed(error):
                yield response
            raise error
        if interrupt is not None:
            yield self._end(self.session.final(), "interrupted", steering)
            return
        tail = await self.session.resolve(self.session.submit_end())
        if tail is not None:
            for response in self._deltas(tail):
                yield response
        final = self.session.final()
        if final.interrupted:
            yield self._end(final, "interrupted", steering)
            return
        for response in self._deltas(final):
            yield response
        yield self._end(final, finish, steering)

    async def _push(self, ids: list[int]) -> AsyncIterator[pb.GenerateResponse]:
        """Route ``ids`` by phase: to the session (judged) or straight out (unjudged reasoning)."""
        for phase, run in self.tracker.push(ids):
            if phase == ANSWER and self.answer_start is None:
                self.answer_start = len(self.response)
                if self.moderate_reasoning:  # the session holds the whole response: split its releases here
                    self.session.mark_boundary(self.answer_start)
            self.response += run
            if phase == REASONING and not self.moderate_reasoning:
                text = self.raw_reasoning.push([i for i in run if i not in self.hidden])
                yield pb.GenerateResponse(reasoning=pb.Delta(token_ids=run, text=text))
                continue
            outcome = await self.session.resolve(self.session.submit_ids(run))
            if outcome is None:
                continue
            self.guard.record_chunk(self.policy, outcome)
            for response in self._deltas(outcome):
                yield response
            if outcome.interrupted:
                self._interrupt = outcome
                return

    def _deltas(self, outcome: ChunkOutcome | FinalOutcome) -> list[pb.GenerateResponse]:
        """What the session released, as reasoning and answer deltas: ids split at the answer's
        first token, text where the release crossed it (so redaction markers stay where they were
        put). A chunk's verdict goes on its last delta, or alone when nothing was released."""
        ids, text = list(outcome.released_ids), outcome.released_text
        if not self.moderate_reasoning:  # the session sees the answer only
            parts = [(ANSWER, ids, text)]
        else:
            first = outcome.released - len(ids)
            at = len(ids) if self.answer_start is None else min(max(self.answer_start - first, 0), len(ids))
            chars = self.session.boundary_chars
            start_chars = outcome.released_chars - len(text)
            cut = len(text) if chars is None else min(max(chars - start_chars, 0), len(text))
            parts = [(REASONING, ids[:at], text[:cut]), (ANSWER, ids[at:], text[cut:])]
        parts = [part for part in parts if part[1] or part[2]]
        chunk = isinstance(outcome, ChunkOutcome)
        if chunk and not parts:  # nothing released: the verdict still goes out (on the phase being judged)
            parts = [(ANSWER if self.answer_start is not None or not self.moderate_reasoning else REASONING, [], "")]
        responses = []
        for k, (phase, part_ids, part_text) in enumerate(parts):
            delta = pb.Delta(token_ids=part_ids, text=part_text)
            if chunk and k == len(parts) - 1:
                fill_chunk(delta.verdict, outcome, False, self.detail)
            responses.append(pb.GenerateResponse(**{phase: delta}))
        return responses

    async def _abort(self, request_id: str) -> bool:
        try:
            return await self.backend.abort(request_id)
        except UpstreamError:
            return False

    async def _upstream_failed(self, exc: UpstreamError) -> AsyncIterator[pb.GenerateResponse]:
        """As GuardedGeneration: fail open releases the partial response judged to its end; fail
        closed withholds what is held back. The caller then gets UNAVAILABLE."""
        self.guard.metrics.fail_mode.labels(self.policy.name, self.policy.fail_mode.value, "upstream").inc()
        if self.policy.fail_mode is FailMode.OPEN:
            self.session.fail_open(f"upstream failed: {exc}; fail open")
            tail = await self.session.resolve(self.session.submit_end())
            if tail is not None:
                for response in self._deltas(tail):
                    yield response
            final = self.session.final()
            for response in self._deltas(final):
                yield response
        else:
            final = self.session.withhold(f"backend failed: {exc}; fail closed")
        yield self._end(final, "upstream_error", None, stopped=self.policy.fail_mode is FailMode.CLOSED)

    def _end(self, final: FinalOutcome, finish: str, steering: _SteerPlan | None, stopped: bool | None = None):
        interrupted = finish == "interrupted"
        if interrupted:
            self.guard.metrics.interrupts.labels(final.category).inc()
        end = pb.GenerationEnd(
            finish_reason=finish,
            stopped=interrupted if stopped is None else stopped,
            reason=final.reason,
            category=final.category,
            usage=pb.Usage(
                prompt_tokens=self.prompt_tokens,
                reasoning_tokens=self.tracker.reasoning_tokens,
                answer_tokens=self.tracker.answer_tokens,
                memory_calls=self.memory_calls,
            ),
            thinking_budget_reached=self.budget_reached,
            # response positions: unmoderated reasoning went out unjudged, before the session's answer
            released_tokens=final.released + (0 if self.moderate_reasoning else self.tracker.reasoning_tokens),
        )
        if final.flag_index is not None:
            end.offset = final.flag_index + (0 if self.moderate_reasoning else self.answer_start or 0)
        metrics = self.guard.metrics
        metrics.reasoner_generations.labels(self.backend.name, finish).inc()
        metrics.reasoner_tokens.labels(REASONING).inc(self.tracker.reasoning_tokens)
        metrics.reasoner_tokens.labels(ANSWER).inc(self.tracker.answer_tokens)
        metrics.reasoner_memory_calls.inc(self.memory_calls)
        if self.budget_reached:
            metrics.reasoner_budget_reached.inc()
        if steering is not None:
            for target, *_ in steering.labels:
                metrics.reasoner_steers.labels(target.split(" ")[0]).inc()
            found = trigger_starts(steering.triggered, self.response, self.model.tokenizer.decode)
            starts = iter(found)
            for target, alpha, offset, tokens in steering.labels:
                start = offset if offset is not None else next(starts, None)
                start = -1 if start is None else start
                covered = 0 if start < 0 else max(0, min(tokens, len(self.response) - start))
                end.steered.add(target=target, alpha=alpha, start=start, tokens=covered)
        return pb.GenerateResponse(end=end)
