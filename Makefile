# d2prune: `make demo` and `make test` each do their own set-up on a fresh machine.
# D2PRUNE_DETECTRON2=sdist|git|present picks how detectron2 is installed (see README).

VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= output/demo

.PHONY: setup demo test data lint clean

setup:
	@bash tools/setup/install.sh

data: setup
	$(PY) tools/make_synthetic.py

# Source-domain pre-training from scratch on the synthetic data, evaluated on its val split.
demo: data
	$(PY) tools/train_net.py --resume --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		OUTPUT_DIR $(DEMO_OUT)/source
	$(PY) tools/summarize.py $(DEMO_OUT)/source

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check d2prune tools tests

clean:
	rm -rf output
