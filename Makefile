# d2prune: `make demo` and `make test` each do their own set-up on a fresh machine.
# D2PRUNE_DETECTRON2=sdist|git|present picks how detectron2 is installed (see README).

VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-prune benchmark test data lint clean

setup:
	@bash tools/setup/install.sh

data: setup
	$(PY) tools/make_synthetic.py

# Source-domain pre-training from scratch on the synthetic data, evaluated on its val split.
demo: data
	$(PY) tools/train_net.py --resume --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml
	$(PY) tools/summarize.py output/synthetic/source

# One-shot pruning of the demo's source model (run `make demo` first): 30 % and 50 % of the
# `block` channels by l1 norm, reports in output/synthetic/oneshot/l1_{30,50}/report.md.
demo-prune: setup
	$(PY) tools/prune_net.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		--criterion l1 --ratio 0.3 --output output/synthetic/oneshot/l1_30 MODEL.WEIGHTS output/synthetic/source/model_final.pth
	$(PY) tools/prune_net.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		--criterion l1 --ratio 0.5 --output output/synthetic/oneshot/l1_50 MODEL.WEIGHTS output/synthetic/source/model_final.pth

# Engine benchmark on R50-FPN (CPU): surgery time, ResNet latency cut per FLOPs cut.
benchmark: setup
	$(PY) tools/benchmark_pruning.py --side 512 --output docs/benchmark_pruning.md

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check d2prune tools tests

clean:
	rm -rf output
