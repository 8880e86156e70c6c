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
tools: deps ## Build etcd, kube-apiserver, kubectl, helm and promtool once into ~/.cache/nodepulse (test tooling)
	@bash $(TOOLS) etcd kube-apiserver kubectl helm promtool >/dev/null

.PHONY: build
build: deps ## Build every binary (debug)
	$(CARGO) build --workspace --bins

.PHONY: release
release: deps ## Build the release binaries the image ships
	$(CARGO) build --release --bins -p nodepulse-agent -p nodepulse-controller -p nodepulsectl

.PHONY: test
test: tools build ## Unit and integration tests against a real etcd and kube-apiserver
	$(CARGO) test --workspace --no-fail-fast

.PHONY: lint
lint: deps ## cargo fmt --check, clippy -D warnings, helm lint --strict, kube-score
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@bash $(TOOLS) helm >/dev/null
	$$(bash $(TOOLS) helm)/helm lint --strict charts/nodepulse
	@for f in charts/nodepulse/ci/*-values.yaml; do \
	  echo "helm lint --strict -f $$f"; \
	  $$(bash $(TOOLS) helm)/helm lint --strict --quiet charts/nodepulse -f $$f || exit 1; \
	done
	bash hack/kube-score.sh

.PHONY: generate
generate: ## Regenerate the CRD YAML from the Rust types, and the plain manifests from the chart
	$(CARGO) run -q -p nodepulse-crd --bin crdgen > manifests/00-crds.yaml
	cp manifests/00-crds.yaml charts/nodepulse/crds/nodepulse.io_crds.yaml
	bash hack/manifests.sh

.PHONY: manifests
manifests: ## Render manifests/ from the Helm chart (1-replica etcd, and etcd-3-replicas/)
	bash hack/manifests.sh

.PHONY: image
IMAGE ?=
image: release ## Build the image with buildah from the Dockerfile and `make release` (nodepulse:<appVersion>, or IMAGE=...); imported into the local cluster when it runs
	IMAGE=$(IMAGE) bash hack/image.sh nodepulse

.PHONY: cluster
NODES ?= 3
cluster: deps ## A local Kubernetes cluster in network namespaces of its own: control-plane, worker-1, worker-2 (NODES=1: one node); prints the KUBECONFIG
	NODEPULSE_CLUSTER_NODES=$(NODES) bash hack/cluster.sh up

.PHONY: cluster-down
cluster-down: ## Stop the local cluster and remove every process, mount, namespace and file it made
	bash hack/cluster.sh down

.PHONY: e2e-cluster
e2e-cluster: release ## helm install the chart on the three-node local cluster and check what a user sees, faults included (testkit/tests/cluster.rs)
	NODEPULSE_CLUSTER_NODES=3 bash hack/cluster.sh up
	bash hack/image.sh all
	$(CARGO) test -p testkit --test cluster -- --ignored --test-threads=1 --nocapture

.PHONY: demo
# Only what the demo runs: etcd and two binaries (debug: the quicker first build), plus
# kube-apiserver, kubectl and the controller with DEMO_K8S=1, and the demo itself
# (testkit/src/demo.rs) without testkit's default `test-env` feature (the kube-rs client of the
# tests). One cargo invocation: features unify within one, so the demo shares every dependency
# build with the agent and adds only its own few (rcgen). `--no-default-features` reaches the
# other packages too, which have no default features. See README, "The two commands".
DEMO_K8S ?= 0
demo: deps ## The original specification's scenario on one machine: watcher, agent, config push, kill -9 (DEMO_K8S=1 adds the controller)
	@bash $(TOOLS) etcd $(if $(filter 1,$(DEMO_K8S)),kube-apiserver kubectl) >/dev/null
	$(CARGO) build --bins -p nodepulse-agent -p nodepulsectl $(if $(filter 1,$(DEMO_K8S)),-p nodepulse-controller) -p testkit --no-default-features
	DEMO_K8S=$(DEMO_K8S) $(or $(CARGO_TARGET_DIR),target)/debug/nodepulse-demo

.PHONY: e2e
e2e: tools build ## Only the end-to-end tests (real apiserver, etcd, agents, controller)
	$(CARGO) test -p nodepulse-controller --test '*'

.PHONY: bench
bench: deps ## Benchmarks; writes bench/RESULTS.md
	@bash $(TOOLS) etcd kube-apiserver node_exporter otelcol >/dev/null
	$(CARGO) build --release --workspace --bins
	$(CARGO) run --release -p bench -- --out bench/RESULTS.md
