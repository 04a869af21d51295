"""Incremental tokenizer benchmark: cost of one text delta against how long the stream already is.

For each corpus the stream is brought to a length (one large push, which leaves the same
bounded state as many small ones), then ``--pushes`` deltas of ``--delta`` characters are timed.
Ours must cost the same after 1k and 100k characters. The baseline, ``naive re-split`` below,
is the previous algorithm reimplemented here for comparison: it re-normalises and re-splits its
whole buffer on every push and holds back the last pieces without a bound, so on text without
piece boundaries (letters, CJK) its buffer is the whole stream. Both run in the same process and
run, so the ratios are meaningful on a shared, noisy machine. Usage:

    python benchmarks/tokenizer_bench.py --json benchmarks/results/tokenizer.json
    python benchmarks/tokenizer_bench.py --lengths 1000,10000,100000 --delta 4 --pushes 300
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

from guard.text.incremental_tokenizer import IncrementalTokenizer

PROSE = (
    "The committee reviewed the proposal carefully, and after a long discussion it decided to "
    "postpone the vote until the next meeting, when more data would be available. "
)


def corpus(name: str, length: int) -> str:
    rng = random.Random(0)
    if name == "prose":
        return (PROSE * (length // len(PROSE) + 1))[:length]
    if name == "letters":
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
    if name == "cjk":
        return "".join(rng.choice("我们今天去公园散步天气很好中国人民历史悠久文化灿烂发展迅速") for _ in range(length))
    raise ValueError(f"unknown corpus {name!r}; expected prose, letters or cjk")


class NaiveResplit:
    """BASELINE ONLY (the previous algorithm): re-normalise and re-split the whole buffer per push."""

    def __init__(self, hf_tokenizer: Any, hold_back: int = 2) -> None:
        backend = hf_tokenizer.backend_tokenizer
        self._backend, self._normalizer, self._pre = backend, backend.normalizer, backend.pre_tokenizer
        self._specials = sorted({t.content for t in hf_tokenizer.added_tokens_decoder.values()}, key=len)
        self.hold_back = hold_back
        self.buffer = ""

    def push(self, delta: str) -> list[int]:
        text = self._normalizer.normalize_str(self.buffer + delta)
        pieces = self._pre.pre_tokenize_str(text)
        cut = pieces[-self.hold_back][1][0] if len(pieces) > self.hold_back else 0
        for special in self._specials:  # never split a special token, keep an unfinished one
            start = text.find(special)
            while start != -1:
                if start < cut < start + len(special):
                    cut = start
                start = text.find(special, start + 1)
            for k in range(min(len(special) - 1, len(text)), 0, -1):
                if text.endswith(special[:k]):
                    cut = min(cut, len(text) - k)
                    break
        self.buffer = text[max(cut, 0) :]
        return self._backend.encode(text[:cut], add_special_tokens=False).ids if cut > 0 else []


def time_pushes(make: Any, text: str, at: int, delta: int, pushes: int, repeats: int) -> float:
    """Seconds per push of ``delta`` characters after the first ``at`` characters of ``text``
    (the best of ``repeats`` runs, each with a fresh tokenizer: the machine is shared)."""
    deltas = [text[at + i * delta : at + (i + 1) * delta] for i in range(pushes)]
    best = float("inf")
    for _ in range(repeats):
        tokenizer = make()
        tokenizer.push(text[:at])
        start = time.perf_counter()
        for d in deltas:
            tokenizer.push(d)
        best = min(best, (time.perf_counter() - start) / pushes)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", default="prose,letters,cjk", help="comma-separated: prose, letters, cjk")
    p.add_argument("--lengths", default="1000,10000,100000", help="stream lengths (characters) to measure at")
    p.add_argument("--delta", type=int, default=4, help="characters per pushed delta")
    p.add_argument("--pushes", type=int, default=300, help="timed pushes per measurement (ours)")
    p.add_argument("--naive-pushes", type=int, default=20, help="timed pushes per measurement (baseline)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    p.add_argument("--no-naive", action="store_true", help="skip the baseline")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    from guard.text.conversation import GuardTokenizer
    from guard.text.offline_tokenizer import cached_qwen3_tokenizer_dir

    hf = GuardTokenizer.from_dir(cached_qwen3_tokenizer_dir()).hf
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for name in args.corpora.split(","):
        text = corpus(name, max(lengths) + args.delta * max(args.pushes, args.naive_pushes))
        base = None
        for length in lengths:
            ours = time_pushes(lambda: IncrementalTokenizer(hf), text, length, args.delta, args.pushes, args.repeats)
            naive = None
            if not args.no_naive:
                naive = time_pushes(lambda: NaiveResplit(hf), text, length, args.delta, args.naive_pushes, args.repeats)
            base = base or ours
            rows.append(
                {
                    "corpus": name,
                    "stream_chars": length,
                    "delta_chars": args.delta,
                    "ours_us_per_push": ours * 1e6,
                    "ours_vs_first_length": ours / base,
                    "naive_us_per_push": None if naive is None else naive * 1e6,
                    "naive_over_ours": None if naive is None else naive / ours,
                }
            )

    print(f"{'corpus':8} {'chars':>8} {'ours us/push':>13} {'vs first':>9} {'naive us/push':>14} {'naive/ours':>11}")
    for r in rows:
        naive = "-" if r["naive_us_per_push"] is None else f"{r['naive_us_per_push']:.1f}"
        ratio = "-" if r["naive_over_ours"] is None else f"{r['naive_over_ours']:.1f}x"
        print(
            f"{r['corpus']:8} {r['stream_chars']:>8} {r['ours_us_per_push']:>13.1f} "
            f"{r['ours_vs_first_length']:>8.2f}x {naive:>14} {ratio:>11}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {"python": sys.version.split()[0], "machine": platform.machine(), "args": vars(args)}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
