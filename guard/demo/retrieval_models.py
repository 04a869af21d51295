"""The demo retrieval models: a tiny Qwen3-Embedding and a tiny Qwen3-Reranker in the released
layouts, trained in seconds on a synthetic corpus of everyday questions so that the retrieval
services run and can be tested without downloadable weights.

They are NOT retrieval models: they know the handful of topics below. Training reads exactly the
token sequences the serving classes build (the query template and ``<|endoftext|>``, the
reranker's official prompt), and a build only succeeds once the written checkpoint, loaded
through ``Embedder`` / ``Reranker``, ranks every ``SHOWCASE`` query's own document first.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from guard.cache import cached_build
from guard.demo.threads import one_thread
from guard.model.config import DEMO_MARKER
from guard.retrieval.checkpoint import DEFAULT_EMBED_TASK, DEFAULT_RERANK_INSTRUCTION
from guard.text.offline_tokenizer import cached_qwen3_tokenizer_dir

log = logging.getLogger(__name__)

EMBEDDER_VERSION = "embedder-demo-v1"
RERANKER_VERSION = "reranker-demo-v1"
EMBEDDER_NOTICE = "DEMO EMBEDDER: trained in seconds on a synthetic retrieval corpus; it is not a retrieval model"
RERANKER_NOTICE = "DEMO RERANKER: trained in seconds on a synthetic retrieval corpus; it is not a retrieval model"


@dataclass(frozen=True)
class DemoTopic:
    """One everyday subject: hand-written queries and documents (the first of each is its
    ``SHOWCASE`` pair) and the phrases that ``QUERY_TEMPLATES`` turn into more queries."""

    queries: tuple[str, ...]
    documents: tuple[str, ...]
    tasks: tuple[str, ...]  # verb phrases: "reset my router password"
    subjects: tuple[str, ...]  # noun phrases: "router password"


TOPICS: tuple[DemoTopic, ...] = (
    DemoTopic(
        ("How do I reset my router password?", "I forgot the admin password of my wifi router."),
        (
            "To reset a router password, hold the reset button on the back of the router for ten seconds, then "
            "log in with the default admin password printed on its label.",
            "A forgotten wifi router password can be restored to the factory default with the reset button.",
        ),
        ("reset my router password", "change the wifi password"),
        ("router password", "wifi router login"),
    ),
    DemoTopic(
        ("How long should I boil an egg?", "What is the cooking time for a soft boiled egg?"),
        (
            "Boil an egg for about six minutes for a soft yolk and ten minutes for a hard boiled egg, then cool it "
            "in cold water.",
            "Soft boiled eggs need six minutes in boiling water; hard boiled eggs need around ten.",
        ),
        ("boil an egg", "cook hard boiled eggs"),
        ("boiled eggs", "egg cooking time"),
    ),
    DemoTopic(
        ("How do I fix a flat bicycle tire?", "My bike has a puncture in the inner tube."),
        (
            "To fix a flat bicycle tire, remove the wheel, pull out the inner tube, find the puncture and cover it "
            "with a patch, then pump the tire up again.",
            "Patch the punctured inner tube of the bike or replace it, and pump the tire to the pressure on its side.",
        ),
        ("fix a flat bike tire", "patch a bicycle inner tube"),
        ("flat bicycle tire", "bike puncture"),
    ),
    DemoTopic(
        ("How do I renew my passport?", "My passport expires next month, what should I do?"),
        (
            "To renew a passport, fill in the renewal form, attach a recent photo and your old passport, and pay "
            "the fee at the passport office or online.",
            "Passport renewal needs the application form, a new photo and the expired passport.",
        ),
        ("renew my passport", "apply for a new passport"),
        ("passport renewal", "expired passport"),
    ),
    DemoTopic(
        ("How can I get a red wine stain out of a carpet?", "I spilled red wine on the rug."),
        (
            "Blot a red wine stain with a clean cloth, cover it with salt or baking soda, then wash the carpet "
            "with cold water and a little dish soap.",
            "Wine spills on a rug come out with cold water, salt and gentle blotting; never rub the stain.",
        ),
        ("remove a red wine stain", "clean wine off the carpet"),
        ("red wine stain", "wine spill on a rug"),
    ),
    DemoTopic(
        ("How can I fall asleep faster at night?", "I lie awake in bed for hours every night."),
        (
            "To fall asleep faster, go to bed at the same time every night, keep the bedroom dark and cool, and "
            "put screens away an hour before sleep.",
            "A regular bedtime, no coffee in the evening and a dark room help against insomnia.",
        ),
        ("fall asleep faster", "sleep better at night"),
        ("insomnia", "trouble sleeping"),
    ),
    DemoTopic(
        ("What are the easiest guitar chords for beginners?", "I just bought a guitar, which chords should I learn?"),
        (
            "Beginners on the guitar usually start with the open chords G, C, D, E minor and A minor, which cover "
            "many simple songs.",
            "Learn the open guitar chords first and practise switching between them slowly.",
        ),
        ("learn guitar chords", "start playing the guitar"),
        ("beginner guitar chords", "guitar lessons"),
    ),
    DemoTopic(
        ("How do I unclog a kitchen sink drain?", "The water in my sink will not drain away."),
        (
            "To unclog a kitchen sink, pour boiling water down the drain, then use a plunger; baking soda and "
            "vinegar loosen grease that is left in the pipe.",
            "A blocked sink drain clears with a plunger, hot water or a drain snake.",
        ),
        ("unclog a sink drain", "clear a blocked drain"),
        ("clogged sink", "blocked kitchen drain"),
    ),
    DemoTopic(
        ("How do I jump start a car with a dead battery?", "My car battery is flat and the engine will not start."),
        (
            "To jump start a car, connect the red jumper cable to both positive terminals and the black cable to "
            "the good battery and to bare metal on the dead car, then start the engine.",
            "A dead car battery can be started with jumper cables from another car's battery.",
        ),
        ("jump start my car", "charge a dead car battery"),
        ("dead car battery", "jumper cables"),
    ),
    DemoTopic(
        ("Why are the leaves of my houseplant turning yellow?", "My indoor plant has yellow leaves."),
        (
            "Yellow leaves on a houseplant usually mean too much water: let the soil dry out between waterings and "
            "make sure the pot drains.",
            "Overwatering and too little light turn the leaves of indoor plants yellow.",
        ),
        ("save a houseplant with yellow leaves", "care for an indoor plant"),
        ("yellow plant leaves", "houseplant care"),
    ),
    DemoTopic(
        ("What should I do after a bee sting?", "A bee stung me on the arm and it is swelling."),
        (
            "After a bee sting, scrape the stinger out with a fingernail, wash the skin and hold ice on it; get "
            "help at once if breathing becomes difficult.",
            "Remove the bee stinger quickly and cool the swelling with an ice pack.",
        ),
        ("treat a bee sting", "stop bee sting swelling"),
        ("bee sting", "insect sting first aid"),
    ),
    DemoTopic(
        ("How do I back up the photos on my phone?", "I do not want to lose the pictures on my smartphone."),
        (
            "Back up phone photos by turning on cloud photo backup in the settings, or copy them to a computer "
            "with a USB cable.",
            "Smartphone pictures are safe once they are synced to cloud storage or copied to a laptop.",
        ),
        ("back up my phone photos", "save pictures from my smartphone"),
        ("phone photo backup", "smartphone pictures"),
    ),
    DemoTopic(
        ("How can I save more money each month?", "I never have any money left at the end of the month."),
        (
            "To save money each month, write a budget, move a fixed amount to a savings account on payday and cut "
            "subscriptions you do not use.",
            "A monthly budget and an automatic transfer to savings help you keep more of your salary.",
        ),
        ("save money every month", "make a monthly budget"),
        ("personal budget", "saving money"),
    ),
    DemoTopic(
        ("How do I stop my cat from scratching the sofa?", "My kitten keeps clawing the furniture."),
        (
            "Give a cat a sturdy scratching post next to the sofa, reward it for using the post and cover the "
            "furniture with double sided tape.",
            "Cats scratch furniture less when they have a scratching post and their claws are trimmed.",
        ),
        ("stop my cat scratching furniture", "train a kitten to use a scratching post"),
        ("cat scratching", "kitten claws"),
    ),
    DemoTopic(
        ("What should I pack for a beach holiday?", "I am going to the seaside for a week."),
        (
            "For a beach holiday pack sunscreen, a swimsuit, a hat, sunglasses, sandals and a light towel.",
            "Seaside trips need sun protection, swimwear and something to read under the umbrella.",
        ),
        ("pack for a beach holiday", "prepare for a week at the seaside"),
        ("beach holiday packing list", "seaside trip"),
    ),
    DemoTopic(
        ("How do I make my laptop battery last longer?", "My notebook battery drains too fast."),
        (
            "Make a laptop battery last longer by lowering the screen brightness, closing background apps and "
            "using the power saving mode.",
            "Dim the display and turn on battery saver so that the notebook runs longer unplugged.",
        ),
        ("make my laptop battery last longer", "save battery on my notebook"),
        ("laptop battery life", "notebook battery"),
    ),
)

# The fixed pairs the finished models are checked on (and the tests and demos show).
SHOWCASE: tuple[tuple[str, str], ...] = tuple((t.queries[0], t.documents[0]) for t in TOPICS)

QUERY_TEMPLATES = (
    "How do I {task}?",
    "how to {task}",
    "What is the best way to {task}?",
    "Can you tell me how to {task}?",
    "I need to {task}. Any tips?",
    "Please help me {task}",
    "Tips for {subject}",
    "{subject}",
    "Question about {subject}",
    "What should I know about {subject}?",
    "{subject} help",
)


def topic_queries(topic: DemoTopic) -> list[str]:
    """The hand-written queries and every template filled with the topic's phrases."""
    out = list(topic.queries)
    for template in QUERY_TEMPLATES:
        fills = topic.tasks if "{task}" in template else topic.subjects
        out += [template.format(task=f, subject=f) for f in fills]
    return out


def topic_documents(topic: DemoTopic) -> list[str]:
    """The hand-written documents, each also as its first sentence and with a lead-in line."""
    out = list(topic.documents)
    for doc in topic.documents:
        out.append(f"Answer: {doc}")
        first = doc.split(". ")[0].split("; ")[0].rstrip(".") + "."
        if first != doc:
            out.append(first)
    return out


def training_pairs(n: int, seed: int = 0) -> list[tuple[int, str, str]]:
    """``n`` (topic index, query, document) variations drawn with a seeded ``random.Random``."""
    rng = random.Random(seed)
    queries = [topic_queries(t) for t in TOPICS]
    documents = [topic_documents(t) for t in TOPICS]
    out = []
    for _ in range(n):
        k = rng.randrange(len(TOPICS))
        query = rng.choice(queries[k])
        if rng.random() < 0.2:
            query = query.lower()
        out.append((k, query, rng.choice(documents[k])))
    return out


def _marker(version: str, notice: str) -> dict[str, dict[str, str]]:
    return {DEMO_MARKER: {"version": version, "notice": notice}}


def _right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, attention mask and each row's last index. Right padding: under causal attention a
    row's real tokens never see the padding after them, so each row computes what it computes
    alone (the serving side left-pads with shifted positions to the same result)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask, torch.tensor([len(s) - 1 for s in sequences])


# ---------------------------------------------------------------------------- the embedder


class _EmbedderTrainer:
    """In-batch InfoNCE over (query, document) pairs, one pair per topic per batch, on the
    Embedder's own input recipe; the 151,936-row embedding matrix stays frozen."""

    temperature = 0.05

    def __init__(self, seed: int) -> None:
        from transformers import AutoTokenizer, Qwen3Model

        from guard.retrieval.checkpoint_writer import qwen3_config

        self.tokenizer = AutoTokenizer.from_pretrained(str(cached_qwen3_tokenizer_dir()))
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        torch.manual_seed(seed)  # the same initial weights as write_embedding_checkpoint(seed=seed)
        self.model = Qwen3Model(qwen3_config("tiny"))
        self.model.embed_tokens.weight.requires_grad_(False)
        self.rng = random.Random(seed)
        self.pools: list[list[tuple[list[int], list[int]]]] = [[] for _ in TOPICS]
        for k, query, doc in training_pairs(2400, seed):
            self.pools[k].append((self.encode(query, query=True), self.encode(doc, query=False)))

    def encode(self, text: str, *, query: bool) -> list[int]:
        """As ``Embedder.sequence``: the query template with the default task, then ``<|endoftext|>``."""
        if query:
            text = f"Instruct: {DEFAULT_EMBED_TASK}\nQuery:{text}"
        return [*self.tokenizer.encode(text, add_special_tokens=False), self.end_id]

    def embed(self, sequences: list[list[int]]) -> torch.Tensor:
        """Last-token pooled, L2-normalised vectors."""
        ids, mask, last = _right_padded(sequences, self.end_id)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(hidden[torch.arange(len(sequences)), last], dim=-1)

    def train(self, steps: int, peak: float) -> None:
        from guard.demo.judge_model import one_cycle_lr

        opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=peak, weight_decay=0.0)
        labels = torch.arange(len(TOPICS))
        self.model.train()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = one_cycle_lr(step / steps, peak)
            batch = [self.rng.choice(pool) for pool in self.pools]  # no in-batch negative shares the topic
            vectors = self.embed([q for q, _ in batch] + [d for _, d in batch])
            logits = vectors[: len(batch)] @ vectors[len(batch) :].T / self.temperature
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                log.info("event=embedder_train step=%d loss=%.4f", step, loss.item())
        self.model.eval()


def _embedder_misses(path: Path, expected: Callable[..., list[int]]) -> list[int]:
    """The SHOWCASE queries whose own document is not the nearest, through ``Embedder`` itself
    (which must read what ``expected`` trained on)."""
    from guard.retrieval.embedder import Embedder, EmbedInput, finish

    embedder = Embedder(path)
    try:
        queries = embedder.sequences([EmbedInput(q, query=True) for q, _ in SHOWCASE])
        documents = embedder.sequences([EmbedInput(d) for _, d in SHOWCASE])
        if queries + documents != [expected(q, query=True) for q, _ in SHOWCASE] + [
            expected(d, query=False) for _, d in SHOWCASE
        ]:
            raise RuntimeError("the embedder serves other token sequences than the demo was trained on")
        futures = embedder.submit(queries + documents)
        vectors = np.stack([finish(f.result(timeout=60).value, embedder.dimension, True) for f in futures])
    finally:
        embedder.close()
    n = len(SHOWCASE)
    scores = vectors[:n] @ vectors[n:].T
    return [i for i in range(n) if int(scores[i].argmax()) != i]


def train_demo_embedder(out_dir: Path, *, steps: int = 240, seed: int = 0, max_rounds: int = 8) -> Path:
    """Train and write the demo embedder; go on training (bounded) until the written checkpoint,
    served by ``Embedder``, ranks every SHOWCASE pair first (float rounding differs between CPUs)."""
    from guard.retrieval.checkpoint_writer import write_embedding_checkpoint

    started = time.perf_counter()
    with one_thread():
        trainer = _EmbedderTrainer(seed)
        trainer.train(steps, 3e-3)
        for round_ in range(max_rounds + 1):
            state = {k: v.detach() for k, v in trainer.model.state_dict().items()}
            write_embedding_checkpoint(out_dir, state=state, extra_config=_marker(EMBEDDER_VERSION, EMBEDDER_NOTICE))
            misses = _embedder_misses(out_dir, trainer.encode)
            log.info("event=embedder_check round=%d misses=%d of=%d", round_, len(misses), len(SHOWCASE))
            if not misses:
                break
            if round_ == max_rounds:
                raise RuntimeError(f"demo embedder still misranks {len(misses)} of {len(SHOWCASE)} showcase queries")
            trainer.train(60, 1e-3)
    log.info("event=embedder_built path=%s seconds=%.1f", out_dir, time.perf_counter() - started)
    return out_dir


# ---------------------------------------------------------------------------- the reranker


class _RerankerTrainer:
    """Binary cross-entropy on ``l_yes - l_no`` at the last position of the official prompt, for
    each topic's positive pair and a negative drawn from another topic.

    Whether a query and a document share a topic is an XOR-like question, and a tiny model asked
    only that sits on the 0.693 plateau for hundreds of steps. Two aids get it off in seconds:
    an auxiliary head (discarded) asks the first layer which topics the pair mentions, so the
    second has features to compare; and the embedding rows the corpus uses train as a small delta
    table (folded in before writing), the 151,936-row matrix itself and the yes/no rows stay frozen.
    """

    aux_weight = 1.0

    def __init__(self, seed: int) -> None:
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        from guard.retrieval.checkpoint_writer import qwen3_config
        from guard.retrieval.reranker import PREFIX, SUFFIX

        tokenizer = AutoTokenizer.from_pretrained(str(cached_qwen3_tokenizer_dir()))
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.prefix_ids = tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix_ids = tokenizer.encode(SUFFIX, add_special_tokens=False)
        torch.manual_seed(seed)  # the same initial weights as write_reranker_checkpoint(seed=seed)
        self.model = Qwen3ForCausalLM(qwen3_config("tiny"))
        self.embedding = self.model.model.embed_tokens.weight  # tied: also the LM head
        self.embedding.requires_grad_(False)
        yes, no = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no"))
        self.direction = (self.embedding[yes] - self.embedding[no]).detach().clone()
        self.aux = torch.nn.Linear(self.model.config.hidden_size, len(TOPICS))
        self.rng = random.Random(seed)
        self.queries: list[list[str]] = [[] for _ in TOPICS]
        self.documents: list[list[str]] = [[] for _ in TOPICS]
        for k, query, doc in training_pairs(1600, seed):
            self.queries[k].append(query)
            self.documents[k].append(doc)
        self._cache: dict[tuple[str, str], list[int]] = {}
        # A query's tokens do not depend on the document beside it (the pre-tokenizer splits at
        # the newline between them), so pairing each text once finds every token training reads.
        texts = [(q, SHOWCASE[0][1]) for pool in self.queries for q in pool] + [(q, d) for q, d in SHOWCASE]
        texts += [(SHOWCASE[0][0], d) for pool in self.documents for d in pool]
        used = sorted({t for q, d in texts for t in self.encode(q, d)} - {yes, no})
        self.used = torch.tensor(used)
        self.row_of = torch.full((self.embedding.shape[0],), len(used), dtype=torch.long)
        self.row_of[self.used] = torch.arange(len(used))
        self.delta = torch.nn.Parameter(torch.zeros(len(used) + 1, self.embedding.shape[1]))  # last row: unused

    def encode(self, query: str, document: str) -> list[int]:
        """As ``Reranker.sequence``: prefix, the tokenized body, suffix (each encoded alone)."""
        from guard.retrieval.reranker import body

        key = (query, document)
        if key not in self._cache:
            text = self.tokenizer.encode(body(DEFAULT_RERANK_INSTRUCTION, query, document), add_special_tokens=False)
            self._cache[key] = [*self.prefix_ids, *text, *self.suffix_ids]
        return self._cache[key]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        # F.embedding's backward is deterministic across threads (indexing's accumulate is not).
        return self.embedding[ids] + F.embedding(self.row_of[ids], self.delta, padding_idx=len(self.used))

    def forward(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw scores, and the first layer's output at the last position (for the auxiliary head).

        Every pair starts with the same system prompt and instruction (about 60 tokens): that
        part runs once and its cache is shared by the rows, which then only run their own tails
        (right padded: under causal attention a row's real tokens never see the padding after
        them; the serving side left-pads with shifted positions to the same result)."""
        shortest = min(len(s) for s in sequences)
        shared = next((i for i in range(shortest - 1) if len({s[i] for s in sequences}) > 1), shortest - 1)
        head = self.model.model(inputs_embeds=self._embed(torch.tensor([sequences[0][:shared]])), use_cache=True)
        cache = head.cache
        cache.batch_repeat_interleave(len(sequences))
        ids, mask, last = _right_padded([s[shared:] for s in sequences], self.pad_id)
        out = self.model.model(
            inputs_embeds=self._embed(ids),
            attention_mask=torch.cat([torch.ones(len(sequences), shared, dtype=torch.long), mask], dim=1),
            position_ids=(shared + torch.arange(ids.shape[1])).expand(len(sequences), -1),
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        rows = torch.arange(len(sequences))
        return out.last_hidden_state[rows, last] @ self.direction, out.hidden_states[1][rows, last]

    def sample(self, hard: list[tuple[int, int]] | None = None) -> list[tuple[list[int], float, int, int]]:
        """(sequence, label, query topic, document topic) in (positive, negative) row pairs that
        share the query: each topic against its own and another topic's document, a few SHOWCASE
        pairs (what the finished model is checked on), and up to 8 of those ``hard`` names as
        still confused."""
        rng = self.rng
        n = len(TOPICS)
        batch = []
        for k in range(n):
            query, other = rng.choice(self.queries[k]), rng.choice([j for j in range(n) if j != k])
            batch.append((self.encode(query, rng.choice(self.documents[k])), 1.0, k, k))
            batch.append((self.encode(query, rng.choice(self.documents[other])), 0.0, k, other))
        showcase = [(k, rng.choice([j for j in range(n) if j != k])) for k in rng.sample(range(n), 4)]
        for k, j in showcase + rng.sample(hard or [], min(len(hard or []), 8)):
            batch.append((self.encode(SHOWCASE[k][0], SHOWCASE[k][1]), 1.0, k, k))
            batch.append((self.encode(SHOWCASE[k][0], SHOWCASE[j][1]), 0.0, k, j))
        return batch

    def train(self, steps: int, peak: float, hard: list[tuple[int, int]] | None = None) -> None:
        from guard.demo.judge_model import one_cycle_lr

        params = [p for p in self.model.parameters() if p.requires_grad] + [*self.aux.parameters(), self.delta]
        opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.0)
        self.model.train()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = one_cycle_lr(step / steps, peak)
            batch = self.sample(hard)
            raw, first = self.forward([s for s, _, _, _ in batch])
            bce = F.binary_cross_entropy_with_logits(raw, torch.tensor([y for _, y, _, _ in batch]))
            topics = torch.zeros(len(batch), len(TOPICS))
            for row, (_, _, k, j) in enumerate(batch):
                topics[row, k] += 0.5
                topics[row, j] += 0.5
            rank = F.softplus(raw[1::2] - raw[0::2]).mean()  # each positive above its own negative
            loss = bce + rank + self.aux_weight * F.cross_entropy(self.aux(first), topics)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                log.info("event=reranker_train step=%d bce=%.4f loss=%.4f", step, bce.item(), loss.item())
        self.model.eval()

    @torch.no_grad()
    def fold(self) -> None:
        """Move the delta table into the embedding matrix (what gets written)."""
        self.embedding[self.used] += self.delta[: len(self.used)]
        self.delta.zero_()


def _reranker_misses(path: Path, expected: Callable[[str, str], list[int]]) -> list[tuple[int, int]]:
    """(query, document) SHOWCASE index pairs where another document scores at least as high as
    the query's own, through ``Reranker`` itself (which must read what ``expected`` trained on)."""
    from guard.retrieval.reranker import Reranker

    reranker = Reranker(path)
    documents = [d for _, d in SHOWCASE]
    try:
        sequences = [reranker.sequences(q, documents) for q, _ in SHOWCASE]
        if sequences != [[expected(q, d) for d in documents] for q, _ in SHOWCASE]:
            raise RuntimeError("the reranker serves other token sequences than the demo was trained on")
        futures = [reranker.submit(row) for row in sequences]
        scores = np.array([[f.result(timeout=60).value for f in row] for row in futures])
    finally:
        reranker.close()
    n = len(SHOWCASE)
    return [(i, j) for i in range(n) for j in range(n) if j != i and scores[i, j] >= scores[i, i]]


def train_demo_reranker(out_dir: Path, *, steps: int = 400, seed: int = 0, max_rounds: int = 8) -> Path:
    """Train and write the demo reranker; go on training (bounded, on the confused pairs) until the
    written checkpoint, served by ``Reranker``, scores every SHOWCASE query's own document highest."""
    from guard.retrieval.checkpoint_writer import write_reranker_checkpoint

    started = time.perf_counter()
    marker = _marker(RERANKER_VERSION, RERANKER_NOTICE)
    with one_thread():
        trainer = _RerankerTrainer(seed)
        trainer.train(steps, 4e-3)
        for round_ in range(max_rounds + 1):
            trainer.fold()
            write_reranker_checkpoint(out_dir, model=trainer.model, extra_config=marker)
            misses = _reranker_misses(out_dir, trainer.encode)
            log.info("event=reranker_check round=%d misses=%d", round_, len(misses))
            if not misses:
                break
            if round_ == max_rounds:
                raise RuntimeError(f"demo reranker still scores {len(misses)} showcase pairs above the right one")
            trainer.train(60, 1e-3, hard=misses)
    log.info("event=reranker_built path=%s seconds=%.1f", out_dir, time.perf_counter() - started)
    return out_dir


def demo_embedder_dir(rebuild: bool = False) -> Path:
    """The cached demo embedder checkpoint, trained on first use."""
    return cached_build(EMBEDDER_VERSION, train_demo_embedder, rebuild=rebuild)


def demo_reranker_dir(rebuild: bool = False) -> Path:
    """The cached demo reranker checkpoint, trained on first use."""
    return cached_build(RERANKER_VERSION, train_demo_reranker, rebuild=rebuild)
