"""Transport floor: a model-free ``qwen3guard.v1.StreamGuard`` server, to measure what gRPC and
protobuf alone cost on the Moderate path.

It speaks the real contract with the real server options (server/app.py) but judges nothing:
``open`` gets a SAFE/ALLOW ``PromptVerdict``, every ``chunk`` a ``ChunkVerdict`` with one SAFE
``TokenVerdict`` per token id (so the response messages have the sidecar's size and shape), and
``close`` a ``FinalResponse``. Info and the standard health check (SERVING) are answered too, so
the load generators that wait for the sidecar wait for it the same way. Whatever a level of
``service_bench.py`` reaches against this server is the ceiling of a sidecar with a free model.

    python benchmarks/transport_floor.py --address 127.0.0.1:50070
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

# The sidecar's own server options (server/app.py); its interceptors are left out on purpose.
SERVER_OPTIONS = [("grpc.max_receive_message_length", 8 * 2**20), ("grpc.so_reuseport", 0)]
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StreamGuard"].full_name
SAFE = pb.Verdict(risk=pb.SAFE, risk_label="Safe", risk_probability=1.0, action=pb.CONTINUE)

log = logging.getLogger("transport_floor")


class FloorStreamGuard(pb_grpc.StreamGuardServicer):
    """Answers every Moderate message at once, without a model."""

    def __init__(self) -> None:
        self.live = 0

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(version="transport-floor", model_name="transport-floor", live_sessions=self.live)

    async def Moderate(
        self, request_iterator: AsyncIterator[pb.ModerateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModerateResponse]:
        opened = False
        received = 0
        self.live += 1
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "open" and not opened:
                    opened = True
                    yield pb.ModerateResponse(
                        prompt=pb.PromptVerdict(
                            verdict=pb.Verdict(risk=pb.SAFE, risk_label="Safe", risk_probability=1.0, action=pb.ALLOW),
                            prompt_tokens=len(request.open.prompt_token_ids),
                        )
                    )
                elif kind == "chunk" and opened:
                    ids = request.chunk.token_ids
                    tokens = [pb.TokenVerdict(index=received + i, token_id=t, verdict=SAFE) for i, t in enumerate(ids)]
                    received += len(ids)
                    yield pb.ModerateResponse(
                        chunk=pb.ChunkVerdict(
                            tokens=tokens,
                            action=pb.CONTINUE,
                            released=received,
                            judged=received,
                            received=received,
                        )
                    )
                elif kind == "close" and opened:
                    yield pb.ModerateResponse(
                        final=pb.FinalResponse(
                            action=pb.CONTINUE,
                            judged=received,
                            released=received,
                        )
                    )
                    return
                else:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected `{kind}` (opened={opened})")
        finally:
            self.live -= 1


async def serve(address: str) -> int:
    """Listen until SIGTERM/SIGINT; health SERVING from the start (there is nothing to load)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_StreamGuardServicer_to_server(FloorStreamGuard(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(address) == 0:
        print(f"transport_floor: cannot listen on {address}", file=sys.stderr)
        return 1
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening on %s", address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(1.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="127.0.0.1:50070")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(serve(args.address))


if __name__ == "__main__":
    sys.exit(main())
