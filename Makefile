# rec: everything a user runs goes through these targets. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REC := $(VENV)/bin/rec
DATASET ?= industrial
K8S_ENV ?= dev
RUN ?=
export JAX_PLATFORMS ?= cpu

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

# The virtual environment is created on first use: CPU JAX plus test tools, pinned.
$(VENV)/.ok: pyproject.toml requirements/ci.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/ci.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

venv: $(VENV)/.ok ## create .venv (CPU JAX, test tools)

demo: $(VENV)/.ok ## whole pipeline on generated data, on CPU; prints the report path
	$(REC) demo --out runs/demo

test: $(VENV)/.ok ## the test suite (CPU; includes the slow end-to-end tests)
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-fast: $(VENV)/.ok ## the test suite without tests marked slow
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

lint: $(VENV)/.ok ## ruff
	$(VENV)/bin/ruff check rec tools tests image

bench: $(VENV)/.ok ## eval benchmark on the tiny shape with the real Office valid split
	$(REC) bench eval --shape tiny --beams 50 --data ../shared/data/minionerec/Office_Products

bench-data: ## copy Industrial's valid split + catalogue to .bench-data/ (ignored) for a device machine without ../shared
	mkdir -p .bench-data/Industrial_and_Scientific
	cp ../shared/data/minionerec/Industrial_and_Scientific/{valid.csv,info.txt,index.json,item.json} .bench-data/Industrial_and_Scientific/

bench-device: ## the performance-issue benchmarks (Qwen2.5-1.5B shape) on an accelerator: tools/bench_device.sh
	tools/bench_device.sh

# ---- GKE TPU deployment (docs/DEPLOY.md) ------------------------------------------------------
# K8S_ENV=<k8s/values/env/*.yaml> DATASET=industrial|office (|all for render/status) RUN=<run name>
# TIMEOUT=<per step, e.g. 48h> DRY_RUN=1 (print the plan only) STEP=<sft|rl|upload|eval|grpo> TAIL=<lines>
# (logs). A missing kube context is one line that says how to get one.
DEPLOY_ARGS = --env $(K8S_ENV) $(if $(RUN),--run $(RUN))
CLUSTER_ARGS = $(if $(TIMEOUT),--timeout $(TIMEOUT)) $(if $(DRY_RUN),--dry-run)

render: $(VENV)/.ok ## render k8s manifests for DATASET (or all) and GRPO into k8s/rendered/
	$(PY) tools/render.py render $(DEPLOY_ARGS) --dataset $(DATASET)

validate: $(VENV)/.ok ## validate rendered manifests (JobSet CRD schema, batch/v1, GKE TPU rules)
	$(PY) tools/render.py validate

train: $(VENV)/.ok ## render, validate, submit and wait: sft then rl JobSets of DATASET (v6e-16)
	$(PY) tools/render.py train $(DEPLOY_ARGS) --dataset $(DATASET) $(CLUSTER_ARGS)

upload: $(VENV)/.ok ## publish the trained checkpoint to the verified handoff prefix (CPU Job)
	$(PY) tools/render.py upload $(DEPLOY_ARGS) --dataset $(DATASET) $(CLUSTER_ARGS)

eval: $(VENV)/.ok ## evaluate the verified handoff on a v6e-8 host
	$(PY) tools/render.py eval $(DEPLOY_ARGS) --dataset $(DATASET) $(CLUSTER_ARGS)

pipeline: $(VENV)/.ok ## sft -> rl -> upload -> eval, stopping at the first failure
	$(PY) tools/render.py pipeline $(DEPLOY_ARGS) --dataset $(DATASET) $(CLUSTER_ARGS)

grpo: $(VENV)/.ok ## GSM8K GRPO on GKE (rollout fast paths on unless ROLLOUT_FAST_*=0)
	$(PY) tools/render.py grpo $(DEPLOY_ARGS) $(CLUSTER_ARGS)

preflight: $(VENV)/.ok ## check the cluster: reachable, JobSet controller >= v0.10.0 (train/pipeline do this too)
	$(PY) tools/render.py preflight $(DEPLOY_ARGS)

status: $(VENV)/.ok ## state of DATASET's JobSets/Job and GRPO's JobSet
	$(PY) tools/render.py status $(DEPLOY_ARGS) --dataset $(DATASET) $(if $(DRY_RUN),--dry-run)

logs: $(VENV)/.ok ## last log lines of each pod of STEP (default: DATASET's latest submitted step)
	$(PY) tools/render.py logs $(DEPLOY_ARGS) --dataset $(DATASET) $(if $(STEP),--step $(STEP)) $(if $(TAIL),--tail $(TAIL))

image: $(if $(IMAGE),,$(VENV)/.ok) ## build the container image with docker or buildah (IMAGE=..., PUSH=1; without IMAGE the tag comes from the env values)
	K8S_ENV=$(K8S_ENV) bash image/build.sh

clean: ## remove runs/ (rendered manifests are committed: re-create them with make render)
	rm -rf runs

.PHONY: help venv demo test test-fast lint bench bench-data bench-device render validate preflight train upload eval pipeline grpo status logs image clean
