"""ParScale on tiny random checkpoints in the released layout: P = 1 is transformers' Qwen2, the
P-stream model equals a straightforward implementation written here, incremental decoding equals
the full forward, a batch equals each request alone, the aggregation weights are a smoothed
distribution, and the engine frees what it holds."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from guard.errors import FailedPrecondition, InvalidInput, LimitExceeded
from guard.parscale.checkpoint_writer import parscale_config_dict, random_parscale_state, write_parscale_checkpoint
from guard.parscale.config import ParScaleCheckpointError
from guard.parscale.engine import ParScaleEngine, ParScaleLimits
from guard.parscale.model import ParScaleLM

VOCAB = 151936


@pytest.fixture(scope="module")
def p4_dir(tmp_path_factory):
    return write_parscale_checkpoint(tmp_path_factory.mktemp("p4"), config=parscale_config_dict(parscale_n=4))


@pytest.fixture(scope="module")
def p4(p4_dir) -> ParScaleLM:
    return ParScaleLM.load(p4_dir)


def sequence(seed: int, length: int) -> list[int]:
    return torch.randint(0, 5000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(model: ParScaleLM, ids: list[int], chunks: list[int] | None = None) -> torch.Tensor:
    """Logits at every position, the sequence fed in ``chunks`` (one prefill by default) through
    the serving path: a KV pool, stream slots, the prefix."""
    cache = model.new_cache(max_slots=model.streams, max_tokens=len(ids))
    slots = [cache.allocate() for _ in range(model.streams)]
    model.write_prefix(cache, slots)
    cache.reserve_tokens(model.config.prefix_tokens + len(ids))
    out, done = [], 0
    for size in chunks or [len(ids)]:
        part = ids[done : done + size]
        hidden = model.step(torch.tensor(part), model.layout([(slots, done, len(part))]), cache)
        out.append(model.logits(hidden))
        done += size
    return torch.cat(out)


def reference_logits(state: dict[str, torch.Tensor], config: dict, ids: list[int]) -> torch.Tensor:
    """ParScale written out plainly from the paper and the released code: P copies of the input,
    each stream's attention over its prefix (no RoPE) and its causal past, the streams mixed by
    the smoothed softmax of the aggregation MLP over their interleaved outputs."""
    p = config["parscale_n"]
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d, eps, n = h // heads, config["rms_norm_eps"], len(ids)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # [heads, n, d], positions 0..n-1
        inv = 1.0 / (config["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
        angles = torch.arange(n).float()[:, None] * inv[None, :]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos + rotated * sin

    streams = []
    for s in range(p):
        x = state["model.embed_tokens.weight"][ids]
        for layer in range(config["num_hidden_layers"]):
            w = lambda name, layer=layer: state[f"model.layers.{layer}.{name}"]  # noqa: E731
            a = norm(x, w("input_layernorm.weight"))
            q = (a @ w("self_attn.q_proj.weight").T + w("self_attn.q_proj.bias")).view(n, heads, d).transpose(0, 1)
            k = (a @ w("self_attn.k_proj.weight").T + w("self_attn.k_proj.bias")).view(n, kv, d).transpose(0, 1)
            v = (a @ w("self_attn.v_proj.weight").T + w("self_attn.v_proj.bias")).view(n, kv, d).transpose(0, 1)
            q, k = rope(q), rope(k)
            if p > 1:
                k = torch.cat([w("self_attn.prefix_k")[s], k], dim=1)
                v = torch.cat([w("self_attn.prefix_v")[s], v], dim=1)
            k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
            prefix = k.shape[1] - n
            visible = torch.ones(n, prefix + n, dtype=torch.bool)
            visible[:, prefix:] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            scores = (q @ k.transpose(1, 2)) / d**0.5
            attn = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v  # [heads, n, d]
            x = x + attn.transpose(0, 1).reshape(n, h) @ w("self_attn.o_proj.weight").T
            m = norm(x, w("post_attention_layernorm.weight"))
            gate, up = m @ w("mlp.gate_proj.weight").T, m @ w("mlp.up_proj.weight").T
            x = x + (torch.nn.functional.silu(gate) * up) @ w("mlp.down_proj.weight").T
        streams.append(norm(x, state["model.norm.weight"]))
    if p == 1:
        mixed = streams[0]
    else:
        interleaved = torch.stack(streams, -1).reshape(n, h * p)  # (h p): hidden unit major
        z = torch.nn.functional.silu(interleaved @ state["model.aggregate_layer.0.weight"].T
                                     + state["model.aggregate_layer.0.bias"])  # fmt: skip
        weights = torch.softmax(
            z @ state["model.aggregate_layer.2.weight"].T + state["model.aggregate_layer.2.bias"], -1
        )
        weights = weights * (1 - config["parscale_attn_smooth"]) + config["parscale_attn_smooth"] / p
        mixed = sum(weights[:, i : i + 1] * streams[i] for i in range(p))
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    return mixed @ head.T


def test_p1_equals_transformers_qwen2_on_the_same_weights(tmp_path):
    from transformers import Qwen2ForCausalLM

    from guard.parscale.checkpoint_writer import qwen2_config

    config = parscale_config_dict(parscale_n=1)
    path = write_parscale_checkpoint(tmp_path, config=config)
    ids = sequence(1, 23)
    ours = full_logits(ParScaleLM.load(path), ids)
    plain = Qwen2ForCausalLM(qwen2_config(config)).eval()
    plain.load_state_dict(random_parscale_state(config), strict=False)
    plain.tie_weights()
    with torch.inference_mode():
        theirs = plain(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("p", [2, 4])
def test_the_p_stream_model_equals_a_straightforward_implementation(tmp_path, p):
    config = parscale_config_dict(parscale_n=p, prefix_tokens=5, tie_word_embeddings=False)
    state = random_parscale_state(config, seed=p)
    path = write_parscale_checkpoint(tmp_path, config=config, state=state)
    ids = sequence(p, 19)
    torch.testing.assert_close(full_logits(ParScaleLM.load(path), ids), reference_logits(state, config, ids),
                               atol=5e-5, rtol=1e-4)  # fmt: skip


def test_bfloat16_serving_stays_close_to_the_float32_reference(tmp_path):
    config = parscale_config_dict(parscale_n=4, prefix_tokens=5)
    state = random_parscale_state(config, seed=7)
    path = write_parscale_checkpoint(tmp_path, config=config, state=state)
    ids = sequence(7, 17)
    reference = reference_logits(state, config, ids)
    served = full_logits(ParScaleLM.load(path, dtype=torch.bfloat16), ids)
    assert served.dtype == torch.float32  # logits come out in float32 whatever the weights
    assert float((served - reference).abs().max()) < 0.05 * float(reference.abs().max())
    assert bool((served.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9)


def test_incremental_decoding_equals_the_full_forward(p4):
    ids = sequence(2, 30)
    whole = full_logits(p4, ids)
    torch.testing.assert_close(full_logits(p4, ids, [11] + [1] * 19), whole, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(full_logits(p4, ids, [7, 8, 15]), whole, atol=2e-5, rtol=1e-4)


def test_the_aggregation_weights_sum_to_one_and_respect_the_smoothing(p4):
    p, eps = p4.streams, p4.config.smoothing
    hidden = torch.randn(p, 64, p4.config.shape.hidden_size) * 3
    weights = p4.aggregation_weights(hidden)
    assert weights.dtype == torch.float32 and weights.shape == (64, p)
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))
    assert bool((weights >= eps / p - 1e-7).all()) and bool((weights.max(-1).values > 1.5 / p).any())


def test_a_sharded_checkpoint_loads_the_same_and_a_bad_one_is_refused_by_name(tmp_path, p4_dir, p4):
    config = json.loads((p4_dir / "config.json").read_text())
    sharded = write_parscale_checkpoint(tmp_path / "sharded", config=config, shards=3)
    ids = sequence(3, 9)
    torch.testing.assert_close(full_logits(ParScaleLM.load(sharded), ids), full_logits(p4, ids))
    state = random_parscale_state(config)
    state.pop("model.layers.1.self_attn.prefix_v")
    with pytest.raises(ParScaleCheckpointError, match=r"missing \['model.layers.1.self_attn.prefix_v'\]"):
        ParScaleLM.load(write_parscale_checkpoint(tmp_path / "missing", config=config, state=state))
    wrong = dict(config, parscale_n_tokens=3)
    with pytest.raises(ParScaleCheckpointError, match="prefix_k has shape"):
        ParScaleLM.load(
            write_parscale_checkpoint(tmp_path / "shape", config=wrong, state=random_parscale_state(config))
        )
    with pytest.raises(ParScaleCheckpointError, match="model_type 'llama'"):
        (tmp_path / "shape" / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
        ParScaleLM.load(tmp_path / "shape")


# ---------------------------------------------------------------------- the engine


async def greedy(engine: ParScaleEngine, prompt: list[int], steps: int) -> list[int]:
    request = engine.open()
    try:
        argmax = lambda logits: int(logits.argmax())  # noqa: E731
        out = await asyncio.wrap_future(request.step(prompt, sample=argmax))
        tokens = [out.value.next_id]
        for _ in range(steps - 1):
            out = await asyncio.wrap_future(request.step([tokens[-1]], sample=argmax))
            tokens.append(out.value.next_id)
        return tokens
    finally:
        request.close()


def reference_greedy(model: ParScaleLM, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(full_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


async def test_batched_requests_equal_each_alone_and_share_forward_passes(p4):
    engine = ParScaleEngine(p4, ParScaleLimits(max_requests=8, wait_ms=20))
    try:
        prompts = [sequence(10 + k, 5 + 3 * k) for k in range(5)]
        together = await asyncio.gather(*(greedy(engine, prompt, 6) for prompt in prompts))
        assert engine.stats.rows / engine.stats.steps > 1.5  # requests shared forward passes
        assert together == [reference_greedy(p4, prompt, 6) for prompt in prompts]
        assert engine.live == 0 and engine.pool.live == 0  # all freed; the pool keeps only its first allocation
        assert engine.pool.nbytes() <= engine.pool.idle_bytes
    finally:
        engine.close()


async def test_scores_are_log_probabilities_of_the_given_tokens(p4):
    engine = ParScaleEngine(p4)
    try:
        ids = sequence(20, 12)
        request = engine.open()
        targets = [*ids[1:], ids[0]]
        out = (await asyncio.wrap_future(request.step(ids, targets=targets, top_k=3))).value
        request.close()
        expected = torch.log_softmax(full_logits(p4, ids), -1)
        torch.testing.assert_close(torch.tensor(out.logprobs), expected[torch.arange(12), torch.tensor(targets)],
                                   atol=2e-5, rtol=1e-4)  # fmt: skip
        assert [t for t, _ in out.top] == expected[-1].topk(3).indices.tolist()
    finally:
        engine.close()


async def test_a_request_closed_during_its_step_or_with_a_queued_step_is_freed(p4):
    import threading

    engine = ParScaleEngine(p4, ParScaleLimits(max_requests=4, wait_ms=0))
    try:
        running, release = threading.Event(), threading.Event()

        def held(logits: torch.Tensor) -> int:  # runs on the worker, inside the step
            running.set()
            release.wait(30)
            return int(logits.argmax())

        busy = engine.open()
        future = busy.step(sequence(1, 4), sample=held)
        assert await asyncio.to_thread(running.wait, 30)
        with pytest.raises(FailedPrecondition, match="step in flight"):
            busy.step([1])  # one step at a time per request
        busy.close()  # the worker holds the pool: the slots are freed when its step ends
        assert engine.live == 0 and engine.pool.live == p4.streams
        release.set()
        await asyncio.wrap_future(future)
        assert engine.pool.live == 0

        slow = ParScaleEngine(p4, ParScaleLimits(max_requests=4, wait_ms=60_000))  # steps wait in its queue
        try:
            queued = slow.open()
            pending = queued.step(sequence(2, 4))
            assert pending.cancel()  # withdrawn before it ran: it never takes slots
            queued.close()
            assert slow.live == 0 and slow.pool.live == 0 and not queued.busy
        finally:
            slow.close()
    finally:
        engine.close()


async def test_the_engine_refuses_by_name_and_frees_what_it_held(p4):
    engine = ParScaleEngine(p4, ParScaleLimits(max_requests=2, max_tokens_per_request=16, max_step_tokens=8))
    try:
        first, second = engine.open(), engine.open()
        with pytest.raises(LimitExceeded, match="max_requests=2"):
            engine.open()
        with pytest.raises(InvalidInput, match="at most 8"):
            first.step(sequence(1, 9))
        with pytest.raises(InvalidInput, match=r"token ids must be in \[0, 151936\)"):
            first.step([VOCAB])
        await asyncio.wrap_future(first.step(sequence(1, 8)))
        await asyncio.wrap_future(first.step(sequence(2, 8)))
        with pytest.raises(LimitExceeded, match="limit is 16 per request"):
            first.step([1])
        assert engine.pool.live == p4.streams
        first.close()
        first.close()  # idempotent
        second.close()
        assert engine.live == 0 and engine.pool.live == 0
    finally:
        engine.close()
