# nodepulse: `make demo` runs the system, `make test` passes the tests. `make help` lists the rest.
SHELL := bash
CARGO ?= cargo
TOOLS := hack/tools.sh

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## Install what a fresh machine lacks (protoc, clippy, rustfmt); idempotent
	@bash hack/deps.sh

.PHONY: tools
tools: deps ## Build etcd, kube-apiserver, kubectl and helm once into ~/.cache/nodepulse (test tooling)
	@bash $(TOOLS) etcd kube-apiserver kubectl helm >/dev/null

.PHONY: build
build: deps ## Build every binary (debug)
	$(CARGO) build --workspace --bins

.PHONY: release
release: deps ## Build the release binaries the image ships
	$(CARGO) build --release --bins -p nodepulse-agent -p nodepulse-controller -p nodepulsectl

.PHONY: test
test: tools build ## Unit and integration tests against a real etcd and kube-apiserver
	$(CARGO) test --workspace

.PHONY: lint
lint: deps ## cargo fmt --check, clippy -D warnings, helm lint --strict
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@bash $(TOOLS) helm >/dev/null
	$$(bash $(TOOLS) helm)/helm lint --strict charts/nodepulse
	@for f in charts/nodepulse/ci/*-values.yaml; do \
	  echo "helm lint --strict -f $$f"; \
	  $$(bash $(TOOLS) helm)/helm lint --strict --quiet charts/nodepulse -f $$f || exit 1; \
	done

.PHONY: generate
generate: ## Regenerate the CRD YAML from the Rust types, and the plain manifests from the chart
	$(CARGO) run -q -p nodepulse-crd --bin crdgen > manifests/00-crds.yaml
	cp manifests/00-crds.yaml charts/nodepulse/crds/nodepulse.io_crds.yaml
	bash hack/manifests.sh

.PHONY: manifests
manifests: ## Render manifests/ from the Helm chart (1-replica etcd, and etcd-3-replicas/)
	bash hack/manifests.sh

.PHONY: image
IMAGE ?= nodepulse:dev
image: ## Build the container image nodepulse:dev, or IMAGE=... (needs a Docker engine; none runs here: `make release` builds the same binaries)
	@docker info >/dev/null 2>&1 || { echo "make image: no Docker engine reachable; the Dockerfile builds what \`make release\` builds" >&2; exit 1; }
	docker build -t $(IMAGE) .

.PHONY: demo
demo: tools build ## The lab's scenario on one machine: watcher, agent, config push, kill -9 (DEMO_K8S=1 adds the controller)
	bash hack/demo.sh

.PHONY: e2e
e2e: tools build ## Only the end-to-end tests (real apiserver, etcd, agents, controller)
	$(CARGO) test -p nodepulse-controller --test '*'

.PHONY: bench
bench: deps ## Benchmarks; writes bench/RESULTS.md
	@bash $(TOOLS) etcd kube-apiserver node_exporter >/dev/null
	$(CARGO) build --release --workspace --bins
	$(CARGO) run --release -p bench -- --out bench/RESULTS.md
