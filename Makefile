# d2prune: `make demo` and `make test` each do their own set-up on a fresh machine.
# D2PRUNE_DETECTRON2=sdist|git|present picks how detectron2 is installed (see README).

VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= output/demo

.PHONY: setup demo demo-prune benchmark test data lint clean

setup:
	@bash tools/setup/install.sh

data: setup
	$(PY) tools/make_synthetic.py

# Source-domain pre-training from scratch on the synthetic data, evaluated on its val split.
demo: data
	$(PY) tools/train_net.py --resume --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		OUTPUT_DIR $(DEMO_OUT)/source
	$(PY) tools/summarize.py $(DEMO_OUT)/source

# One-shot pruning of the demo's source model (run `make demo` first): 30 % and 50 % of the
# `block` channels by l1 norm, reports in $(DEMO_OUT)/prune_l1_{30,50}/report.md.
demo-prune: setup
	$(PY) tools/prune_net.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		--criterion l1 --ratio 0.3 --output $(DEMO_OUT)/prune_l1_30 MODEL.WEIGHTS $(DEMO_OUT)/source/model_final.pth
	$(PY) tools/prune_net.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		--criterion l1 --ratio 0.5 --output $(DEMO_OUT)/prune_l1_50 MODEL.WEIGHTS $(DEMO_OUT)/source/model_final.pth

# Engine benchmark on R50-FPN (CPU): surgery time, ResNet latency cut per FLOPs cut.
benchmark: setup
	$(PY) tools/benchmark_pruning.py --side 512 --output docs/benchmark_pruning.md

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check d2prune tools tests

clean:
	rm -rf output
