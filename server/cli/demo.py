"""`guard demo`: build the demo model (cached) and moderate the showcase conversations."""

from __future__ import annotations


def cmd_demo(args) -> int:
    """Build (if needed) the demo model and moderate the showcase conversations."""
    from guard.demo.corpus import SHOWCASE
    from guard.demo.stream_model import demo_checkpoint_dir
    from guard.runtime import load_runtime
    from guard.text.conversation import Message

    path = demo_checkpoint_dir(rebuild=args.rebuild)
    if args.build_only:
        print(path)
        return 0
    runtime = load_runtime(str(path))
    try:
        print(f"model: {runtime.description}\n")
        for ex in SHOWCASE:
            _, response = runtime.tokenizer.split_response(
                [Message("user", ex.prompt), Message("assistant", ex.response)]
            )
            stream = runtime.moderator.open(messages=[Message("user", ex.prompt)])
            prompt = stream.prompt.result().verdict
            chunk = stream.feed_ids(response).result()
            stream.close()
            shown = runtime.tokenizer.hf.decode(
                response[: chunk.flag_index + 1] if chunk.flag_index is not None else response, skip_special_tokens=True
            )
            print(f"user:      {ex.prompt}")
            print(f"  prompt:  {prompt.risk_label}" + (f" ({prompt.category})" if prompt.category else ""))
            if chunk.flag_index is None:
                print(f"  response passed: {shown}\n")
            else:
                category = chunk.tokens[chunk.flag_index].verdict.category
                print(f"  response INTERRUPTED at token {chunk.flag_index} ({category}): {shown} [...]\n")
    finally:
        runtime.close()
    return 0


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="build the demo model and moderate the showcase conversations")
    demo.add_argument("--rebuild", action="store_true", help="retrain the demo model")
    demo.add_argument("--build-only", action="store_true", help="only build; print the checkpoint path")
    demo.set_defaults(func=cmd_demo)
