# syntax=docker/dockerfile:1
# vLLM plus its gRPC server's optional dependency (smg-grpc-servicer: the VllmEngine servicer
# behind `python -m vllm.entrypoints.launchers.grpc_server`), which the published vLLM images do
# not promise to include. No build context is needed:
#   GPU: docker build -t ghcr.io/example/vllm-openai-grpc:v0.32.0 - < deploy/vllm-grpc.Dockerfile
#   CPU: docker build --build-arg VLLM_IMAGE=public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0 \
#          -t ghcr.io/example/vllm-cpu-grpc:v0.32.0 - < deploy/vllm-grpc.Dockerfile
# Keep the tag of VLLM_IMAGE and of the image you push equal (the manifests pin v0.32.0).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}
# The servicer version the sidecar's GuardedGeneration tests run against vLLM 0.32.0.
ARG SMG_GRPC_SERVICER=smg-grpc-servicer==0.14.1
# Pinned through SMG_GRPC_SERVICER, which hadolint cannot see.
# hadolint ignore=DL3013
RUN if command -v uv > /dev/null; then uv pip install --system --no-cache "${SMG_GRPC_SERVICER}"; \
    else python3 -m pip install --no-cache-dir "${SMG_GRPC_SERVICER}"; fi \
    && python3 -c "import smg_grpc_servicer.vllm.servicer, vllm.entrypoints.launchers.grpc_server"
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.launchers.grpc_server"]
