# Every target installs what it needs into .venv first (torch pinned to the CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export GUARD_CACHE_DIR ?= $(CURDIR)/.cache

.PHONY: install serve demo eval test lint proto bench bench-0.6b bench-service bench-retrieval bench-reasoner bench-parscale bench-gateway bench-security bench-open soak profile-service load-test deploy-policies deploy-render clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[serve,test]'
	touch $@

install: $(BIN)/.installed

## Run the sidecar (gRPC :50051, metrics :9464) with the built-in demo models; Ctrl-C drains and stops.
serve: install
	$(BIN)/guard serve --model demo --embedder demo --reranker demo --reasoner demo --parscale demo

## Build the demo model (cached) and moderate the showcase conversations.
demo: install
	$(BIN)/guard demo

## Replay the shipped labelled set (guard/demo/eval_set.jsonl) under the default policy: F1,
## stop and false-interrupt rates, timeliness, and a sweep of the debounce.
eval: install
	$(BIN)/guard eval --data guard/demo/eval_set.jsonl --domain default --sweep debounce=1:4:1

## The whole test suite, lint included (what CI runs).
test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q --durations=15

lint: install
	$(BIN)/ruff check .

## Copy policies/ into the kustomize base (the ConfigMap's source; a test fails when they differ).
deploy-policies:
	cp policies/*.yaml deploy/base/policies/

## Render both Kubernetes overlays (kubectl from the test extras).
deploy-render: install
	$(BIN)/kubectl kustomize deploy/overlays/cpu-demo
	$(BIN)/kubectl kustomize deploy/overlays/gpu

## Regenerate the gRPC code from proto/ (a test fails when it is stale).
proto: install
	$(BIN)/python -m server.codegen

## Stream-engine benchmark on the demo model; results in benchmarks/results/.
bench: install
	$(BIN)/python benchmarks/stream_bench.py --model demo --json benchmarks/results/demo-cpu.json

bench-0.6b: install
	$(BIN)/python benchmarks/stream_bench.py --model 0.6B --contexts 128,512,1024,2048,4096 \
	  --naive-contexts 128,512,2048 --tokens 8 --naive-reps 1 --streams 1,4,16 --chunks 1,8 \
	  --tokens-per-stream 8 --json benchmarks/results/0.6B-cpu.json

## The whole sidecar against its engine alone and a model-free server of its contract (median of 3).
bench-service: install
	$(BIN)/python benchmarks/service_bench.py --streams 1,16,64 --chunks 1,8,32 --repeat 3 \
	  --json benchmarks/results/service-demo-cpu.json

## Embedder and Reranker: model vs batch size, 32 concurrent gRPC callers vs serial calls, padding.
bench-retrieval: install
	$(BIN)/python benchmarks/retrieval_bench.py --json benchmarks/results/retrieval-demo-cpu.json

bench-reasoner: install
	$(BIN)/python benchmarks/reasoner_bench.py --json benchmarks/results/reasoner-cpu.json

## ParScale decoding against P = 1, 2, 4, 8 at batch 1 and 8 (demo shape and the 1.8B shape).
bench-parscale: install
	$(BIN)/python benchmarks/parscale_bench.py --shape demo --tokens 16 --repeat 3 \
	  --json benchmarks/results/parscale-demo-cpu.json
	$(BIN)/python benchmarks/parscale_bench.py --shape 1.8B --tokens 4 --prompt-tokens 8 --repeat 1 \
	  --json benchmarks/results/parscale-1.8B-cpu.json

## Per SSE event: Envoy + the guard's ext_proc vs Envoy alone, the OpenAI endpoint vs its upstream.
bench-gateway: install
	$(BIN)/python benchmarks/gateway_bench.py --json benchmarks/results/gateway-cpu.json

## Per-chunk latency at 16 streams: plaintext vs TLS vs mTLS + tenants (API keys, limits).
bench-security: install
	$(BIN)/python benchmarks/security_bench.py --json benchmarks/results/security-cpu.json

## One stream's Moderate open (the prompt check) with the idle KV cache kept vs given back.
bench-open: install
	$(BIN)/python benchmarks/open_bench.py --json benchmarks/results/open-cpu.json

## 10 minutes of mixed, misbehaving load: RSS and live sessions over time (nothing may accumulate).
soak: install
	$(BIN)/python benchmarks/soak.py --minutes 10 --json benchmarks/results/soak-cpu.json

## Where the sidecar's time goes at 16 streams x 8 tokens (py-spy, from the bench extra).
profile-service: install
	$(BIN)/pip install --quiet -e '.[serve,test,bench]'
	$(BIN)/python benchmarks/service_bench.py --only '' --profile benchmarks/results/profile --profile-level 16x8

## N = 1, 16, 64 concurrent Moderate streams against a sidecar it starts (loopback).
load-test: install
	$(BIN)/python benchmarks/load_test.py --json benchmarks/results/load-demo-cpu.json

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
