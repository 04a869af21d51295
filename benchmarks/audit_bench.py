"""What the decision audit log costs a guarded stream: the same streams through ResponseSession with
the audit log off and on (a real AuditLog writing JSON lines to a file), interleaved in one run.

    .venv/bin/python benchmarks/audit_bench.py [--streams 8] [--tokens 256] [--chunk 1] [--repeat 3] [--json PATH]

Two policies: `default` (safe text: nearly every chunk is a plain CONTINUE, the audit writes one
end record per stream) and `always_flag` (every token FLAG: one decision record per chunk, the
worst case). Prints µs per token, median of the repeats, and on/off ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from guard.demo.stream_model import demo_checkpoint_dir  # noqa: E402
from guard.policy.loader import PolicyStore  # noqa: E402
from guard.runtime import load_runtime  # noqa: E402
from guard.session.audit import AuditContext  # noqa: E402
from guard.session.release import ReleaseMode  # noqa: E402
from guard.session.response_session import ResponseSession  # noqa: E402
from guard.text.conversation import Message  # noqa: E402
from server.audit import AuditLog  # noqa: E402
from server.metrics import Metrics  # noqa: E402

TEXT = "Rivers carry water from the mountains to the sea, shaping valleys and feeding farms along the way. " * 20


async def run_streams(runtime, policy, audit: AuditLog | None, streams: int, tokens: int, chunk: int) -> float:
    """Seconds per token over ``streams`` concurrent streams of ``tokens`` tokens in ``chunk``-token chunks."""
    ids = runtime.tokenizer.hf.encode(TEXT, add_special_tokens=False)[:tokens]
    rendered = runtime.tokenizer.render_prompt([Message("user", "Tell me about rivers.")])

    async def one(k: int) -> None:
        stream = runtime.moderator.open(prompt_ids=rendered.prompt_ids, preamble_ids=rendered.preamble_ids,
                                        policy=policy, loop=asyncio.get_running_loop())  # fmt: skip
        trail = audit.trail(policy, AuditContext(f"bench-{k}", "bench", model="demo")) if audit else None
        session = ResponseSession(stream, policy, ReleaseMode.HOLD_BACK, runtime.tokenizer.hf, audit=trail)
        try:
            await session.judge_prompt()
            for i in range(0, len(ids), chunk):
                await session.resolve(session.submit_ids(ids[i : i + chunk]))
            session.final()
        finally:
            session.close("bench")

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(streams)))
    return (time.perf_counter() - started) / (streams * len(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runtime = load_runtime(str(demo_checkpoint_dir()))
    with tempfile.TemporaryDirectory() as tmp:
        policies = Path(tmp) / "policies"
        policies.mkdir()
        (policies / "default.yaml").write_text("description: bench\n")
        flag = "extends: default\nthresholds:\n  unsafe: 0.0\nresponse:\n  unsafe: FLAG\nprompt:\n  unsafe: ALLOW\n"
        (policies / "always_flag.yaml").write_text(flag)
        store = PolicyStore(policies, "default")
        audit = AuditLog(str(Path(tmp) / "audit.jsonl"), Metrics(), max_bytes=1 << 30, backups=1, log_content=False)
        results = []
        for domain in ("default", "always_flag"):
            policy = store.get(domain)
            asyncio.run(run_streams(runtime, policy, None, 2, 32, args.chunk))  # warm-up
            times: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(args.repeat):  # interleaved: the machine's noise hits both alike
                for mode in ("off", "on"):
                    sink = audit if mode == "on" else None
                    times[mode].append(asyncio.run(run_streams(runtime, policy, sink, args.streams, args.tokens,
                                                               args.chunk)))  # fmt: skip
            off, on = statistics.median(times["off"]) * 1e6, statistics.median(times["on"]) * 1e6
            results.append({"domain": domain, "us_per_token_off": off, "us_per_token_on": on, "ratio": on / off})
        audit.close()
        records = sum(1 for _ in (Path(tmp) / "audit.jsonl").open())
    runtime.close()
    print(f"{args.streams} streams x {args.tokens} tokens, {args.chunk}-token chunks, median of {args.repeat}")
    print(f"{'domain':<12} {'off us/token':>13} {'on us/token':>12} {'on/off':>7}")
    for r in results:
        print(f"{r['domain']:<12} {r['us_per_token_off']:>13.1f} {r['us_per_token_on']:>12.1f} {r['ratio']:>7.3f}")
    print(f"audit records written: {records}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "records": records}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
