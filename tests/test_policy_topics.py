"""Policy topics: validated in the YAML, refused without the Embedder (file and line), matched
against prompts with the real Embedder, reported in the prompt verdict and in Policies.Evaluate,
and stricter than the model's action when they say so."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from servers import policies_with, running_sidecar

from guard.policy.actions import Action
from guard.policy.loader import PolicyError, PolicyStore, load_policies
from guard.policy.topics import TopicMatcher
from guard.retrieval.checkpoint_writer import write_embedding_checkpoint
from guard.retrieval.embedder import Embedder
from server.embedding_service import EmbedderHolder, topic_embedder
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

BILLING = "How much does the premium plan cost per month?"
TOPICS = f"""extends: default
description: a support desk that must not discuss billing or competitors
topics:
  billing:
    action: BLOCK
    threshold: 0.999
    examples:
      - "{BILLING}"
      - "Can I get a refund for last month's invoice?"
  competitors:
    description: the other vendors
    action: FLAG
    threshold: 0.999
    examples: ["Is AcmeCloud better than you?"]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policies({"default": ("default.yaml", "description: d\n"), "support": ("support.yaml", text)})
    return [str(p) for p in info.value.problems]


def test_topics_compile_with_their_actions_thresholds_and_examples():
    policies, _ = load_policies({"default": ("default.yaml", "description: d\n"), "support": ("support.yaml", TOPICS)})
    topics = {t.name: t for t in policies["support"].topics}
    assert topics["billing"].action is Action.BLOCK and topics["billing"].threshold == 0.999
    assert topics["billing"].examples[0] == BILLING and topics["competitors"].description == "the other vendors"
    assert policies["default"].topics == ()


@pytest.mark.parametrize(
    "topic, message",
    [
        ("    action: BLOCK\n    threshold: 0.5\n", "support.yaml:3: topics.t.examples: required"),
        ("    action: INTERRUPT\n    threshold: 0.5\n    examples: [a]\n", "'INTERRUPT' is not one of BLOCK, FLAG"),
        ("    action: FLAG\n    threshold: 1.5\n    examples: [a]\n", "topics.t.threshold: must be between 0 and 1"),
        ("    action: FLAG\n    threshold: 0.5\n    examples: a\n", "topics.t.examples: expected a list"),
        ("    action: FLAG\n    threshold: 0.5\n    examples: []\n", "expected at least 1 item(s)"),
        (
            "    action: FLAG\n    threshold: 0.5\n    examples: [[a]]\n",
            "topics.t.examples[0]: expected a single value",
        ),
    ],
)
def test_bad_topics_are_errors_with_file_line_and_field(topic, message):
    found = problems(f"extends: default\ntopics:\n  t:\n{topic}")
    assert any(message in p for p in found), found


def test_topics_without_the_embedder_are_refused_naming_the_file_and_line(tmp_path):
    policies_with(tmp_path, support=TOPICS)
    with pytest.raises(PolicyError, match=r"support\.yaml:3: topics: topics need the Embedder"):
        PolicyStore(tmp_path, topics_available=False)
    store = PolicyStore(tmp_path)  # with the Embedder they load
    assert store.get("support").topics


def test_a_live_edit_adding_topics_without_the_embedder_is_rejected(tmp_path):
    policies_with(tmp_path)
    store = PolicyStore(tmp_path, topics_available=False)
    before = store.version
    (tmp_path / "support.yaml").write_text(TOPICS)
    result = store.reload()
    assert not result.ok and "need the Embedder" in result.error and store.version == before
    assert "support" not in store.policies


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory):
    return write_embedding_checkpoint(tmp_path_factory.mktemp("topics") / "emb", seed=21)


def test_the_matcher_finds_an_example_and_ranks_block_over_flag(embedding_dir):
    holder = EmbedderHolder()
    holder.model = Embedder(embedding_dir)
    try:
        policy = load_policies({"default": ("default.yaml", "description: d\n"), "s": ("s.yaml", TOPICS)})[0]["s"]
        matcher = TopicMatcher(topic_embedder(holder), max_cached_examples=2)
        match = asyncio.run(matcher.match(policy, BILLING))
        assert match is not None and match.topic.name == "billing" and match.similarity > 0.999
        assert match.action is Action.BLOCK
        assert asyncio.run(matcher.match(policy, "Is AcmeCloud better than you?")).topic.name == "competitors"
        assert asyncio.run(matcher.match(policy, "Tell me a story about a dragon")) is None
        assert asyncio.run(matcher.match(policy, "   ")) is None
        assert len(matcher._examples) == 3  # every example of the policy, bounded by what one match needs
    finally:
        holder.model.close()


@pytest.fixture(scope="module")
def topics_sidecar(tmp_path_factory, demo_dir, embedding_dir):
    directory = policies_with(tmp_path_factory.mktemp("policies"), support=TOPICS)
    with running_sidecar(model=str(demo_dir), judge="", embedder=str(embedding_dir), policies=str(directory)) as s:
        yield s


async def open_prompt(address: str, text: str, domain: str = "support") -> pb.PromptVerdict:
    """Open a Moderate stream on one user turn and close it at once: the prompt verdict."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.StreamGuardStub(channel).Moderate()
        opened = pb.OpenRequest(messages=[pb.ChatMessage(role="user", content=text)], domain=domain)
        await call.write(pb.ModerateRequest(open=opened))
        await call.write(pb.ModerateRequest(close=pb.CloseRequest()))
        await call.done_writing()
        replies = []
        while (reply := await call.read()) != grpc.aio.EOF:
            replies.append(reply)
        assert await call.code() == grpc.StatusCode.OK
        return replies[0].prompt


def test_a_prompt_under_a_topic_gets_its_action_and_name(topics_sidecar):
    m = topics_sidecar.sidecar.metrics
    before = (
        m.registry.get_sample_value(
            "guard_topic_matches_total", {"domain": "support", "topic": "billing", "action": "BLOCK"}
        )
        or 0.0
    )
    blocked = topics_sidecar.loop.run(open_prompt(topics_sidecar.address, BILLING))
    assert blocked.topic == "billing" and blocked.topic_similarity > 0.999
    assert blocked.verdict.action == pb.BLOCK  # the demo model finds this prompt safe: the topic decides
    assert blocked.verdict.risk == pb.SAFE
    after = m.registry.get_sample_value(
        "guard_topic_matches_total", {"domain": "support", "topic": "billing", "action": "BLOCK"}
    )
    assert after == before + 1
    other = topics_sidecar.loop.run(open_prompt(topics_sidecar.address, "What is a good way to learn Python?"))
    assert other.topic == "" and other.verdict.action == pb.ALLOW
    plain = topics_sidecar.loop.run(open_prompt(topics_sidecar.address, BILLING, domain="default"))
    assert plain.topic == "" and plain.verdict.action == pb.ALLOW  # the default domain has no topics


def test_policies_evaluate_reports_the_topic(topics_sidecar):
    with grpc.insecure_channel(topics_sidecar.address) as channel:
        stub = pb_grpc.PoliciesStub(channel)
        flagged = stub.Evaluate(
            pb.EvaluateRequest(domain="support", stage=pb.PROMPT, risk=pb.SAFE, text="Is AcmeCloud better than you?"),
            timeout=30,
        )
        unsafe = stub.Evaluate(
            pb.EvaluateRequest(
                domain="support",
                stage=pb.PROMPT,
                risk=pb.UNSAFE,
                category="Violent",
                text="Is AcmeCloud better than you?",
            ),
            timeout=30,
        )
        no_text = stub.Evaluate(pb.EvaluateRequest(domain="support", stage=pb.PROMPT, risk=pb.SAFE), timeout=30)
    assert (flagged.topic, flagged.action) == ("competitors", pb.FLAG) and flagged.topic_similarity > 0.999
    assert (unsafe.topic, unsafe.action) == ("competitors", pb.BLOCK)  # the model's BLOCK is stricter than FLAG
    assert (no_text.topic, no_text.action) == ("", pb.ALLOW)


def test_a_sidecar_without_the_embedder_refuses_a_policy_with_topics(tmp_path, demo_dir):
    directory = policies_with(tmp_path / "p", support=TOPICS)
    with pytest.raises(PolicyError, match=r"support\.yaml:3: topics: topics need the Embedder"):
        with running_sidecar(model=str(demo_dir), judge="", policies=str(directory)):
            pass


def test_the_embedder_failing_applies_the_fail_mode(tmp_path, demo_dir, embedding_dir):
    """Closed: the prompt is blocked with a reason; open: the model's own action stands."""
    directory = policies_with(tmp_path / "p", support=TOPICS, support_open="extends: support\nfail_mode: open\n")
    with running_sidecar(model=str(demo_dir), judge="", embedder=str(embedding_dir), policies=str(directory)) as s:
        s.sidecar.service("Embedder").state.model.close()  # the Embedder shuts down under the sidecar
        closed = s.loop.run(open_prompt(s.address, BILLING))
        opened = s.loop.run(open_prompt(s.address, BILLING, domain="support_open"))
    assert closed.verdict.action == pb.BLOCK and "the topic check (Embedder) failed" in closed.reason
    assert "fail closed" in closed.reason and closed.topic == ""
    assert opened.verdict.action == pb.ALLOW and opened.topic == ""
    assert "the topic check (Embedder) failed" in opened.reason and "fail open" in opened.reason


def test_policy_explain_lists_the_topics(tmp_path):
    from cli_runner import guard_main

    directory = policies_with(tmp_path / "p", support=TOPICS)
    done = guard_main("policy", "explain", "support", "--policies", str(directory))
    assert done.returncode == 0, done.stderr
    assert "topic billing          BLOCK similarity >= 0.999, 2 examples" in done.stdout
    assert "topic competitors      FLAG  similarity >= 0.999, 1 examples" in done.stdout


def test_evaluate_while_the_embedder_is_still_loading_is_unavailable(topics_sidecar):
    holder = topics_sidecar.sidecar.service("Embedder").state
    model, holder.model = holder.model, None  # the state between start-up and the model loaded
    try:
        with grpc.insecure_channel(topics_sidecar.address) as channel, pytest.raises(grpc.RpcError) as error:
            pb_grpc.PoliciesStub(channel).Evaluate(
                pb.EvaluateRequest(domain="support", stage=pb.PROMPT, risk=pb.SAFE, text=BILLING), timeout=30
            )
    finally:
        holder.model = model
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the embedding model is still loading" in error.value.details()


def test_a_prompt_that_gives_up_still_leaves_the_examples_embedded_once(embedding_dir):
    """The examples of a new policy are embedded once, even when the first prompt gives up
    (its timeout: the fail mode decides) and several prompts ask at the same time."""
    holder = EmbedderHolder()
    holder.model = Embedder(embedding_dir)
    embed = topic_embedder(holder)
    embedded: list[str] = []

    async def run():
        release = asyncio.Event()

        async def slow_then_real(texts):  # the real Embedder, slow until released
            embedded.extend(texts)
            await release.wait()
            return await embed(texts)

        policy = load_policies({"default": ("default.yaml", "description: d\n"), "s": ("s.yaml", TOPICS)})[0]["s"]
        matcher = TopicMatcher(slow_then_real)
        first = asyncio.ensure_future(matcher.match(policy, "first prompt"))
        for _ in range(100):
            if matcher._embedding:
                break
            await asyncio.sleep(0)
        assert matcher._embedding, "the examples are being embedded"
        first.cancel()  # the prompt gives up; the examples' embedding goes on
        await asyncio.gather(first, return_exceptions=True)
        release.set()
        return await asyncio.gather(*(matcher.match(policy, BILLING) for _ in range(3)))

    try:
        matches = asyncio.run(run())
    finally:
        holder.model.close()
    assert [m.topic.name for m in matches] == ["billing"] * 3
    assert embedded.count("Can I get a refund for last month's invoice?") == 1
    assert embedded.count("Is AcmeCloud better than you?") == 1
    assert embedded.count(BILLING) == 1 + 3  # once as an example, then once per prompt
