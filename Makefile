# d2prune: `make demo` and `make test` each do their own set-up on a fresh machine.
# D2PRUNE_DETECTRON2=sdist|git|present picks how detectron2 is installed (see README).

VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo study study-full study-schedule whole-detector-study overfit-curve study-regime study-regime-detector source demo-prune explain export benchmark benchmark-gpu test test-fast test-d2main visualize data lint clean

setup:
	@bash tools/setup/install.sh

data: setup
	$(PY) tools/make_synthetic.py

STUDY_CONFIG := configs/synthetic/study/faster_rcnn_R18_FPN_study.yaml

# The whole story at small scale (about 15 minutes on 2 cores): the shipped source model
# fine-tuned on 40 target images, unpruned and pruned while training (half of the block channels)
# by three criteria, one seed; prints the table and the paths of the report and the plot.
demo: data
	$(PY) tools/study.py --config-file $(STUDY_CONFIG) --output output/demo \
		--criteria l1 taylor mi --ratios 0.5 --seeds 0 --train-sizes 40 --jobs 1

# The transfer study (resumes where it stopped): every registered criterion at 30/50/70 % of the
# block channels, 3 seeds, beside the unpruned fine-tune, 40 target images, two runs at a time
# with one thread each (100-120 s per run measured on 2 cores, chip's runs included, so about
# 4 hours for the 129 runs);
# writes docs/results.md with the reading in docs/results_notes.md. `make study-full` adds 20
# and 100 target images for l1 and taylor.
STUDY_ARGS := --config-file $(STUDY_CONFIG) --output output/study --ratios 0.3 0.5 0.7 --seeds 0 1 2 \
	--jobs 2 --report docs/results.md --notes docs/results_notes.md \
	--title "Transfer study: 200 iterations on 40 images, where the fine-tune underfits"

study: data
	$(PY) tools/study.py $(STUDY_ARGS) --train-sizes 40

study-full: data
	$(PY) tools/study.py $(STUDY_ARGS) --train-sizes 20 40 100 --size-criteria l1 taylor

# The study's schedule checked on the unpruned fine-tune (26 minutes measured on 2 cores for the
# first three lines; the last line's runs took 270-990 s each on a shared machine): 100 and 400
# iterations beside the study's 200, the 200 with one thread per run (the study's own baselines)
# and with two, one run at a time (how far float summation order alone moves AP). Each writes
# output/study_schedule/*/results.md.
SCHEDULE_ARGS := --config-file $(STUDY_CONFIG) --baselines-only --seeds 0 1 2 --train-sizes 40 --jobs 2

study-schedule: data
	$(PY) tools/study.py $(SCHEDULE_ARGS) --output output/study_schedule/iter100 \
		SOLVER.MAX_ITER 100 SOLVER.STEPS "(75, 92)" SOLVER.CHECKPOINT_PERIOD 50
	$(PY) tools/study.py $(SCHEDULE_ARGS) --output output/study_schedule/iter400 \
		SOLVER.MAX_ITER 400 SOLVER.STEPS "(300, 370)"
	$(PY) tools/study.py $(SCHEDULE_ARGS) --output output/study_schedule/iter200_1thread
	$(PY) tools/study.py $(SCHEDULE_ARGS) --output output/study_schedule/iter200_2threads --jobs 1

# Whole-detector pruning to a latency target against block-only pruning, on the study's fine-tune
# (40 target images, 5 seeds, one thread per run): l1 on the block channels at 70 and 90 %, and
# l1 over every kind of group to -40 % of the detector's predicted time (mode cost), with the
# groups weighed uniformly and by their measured loss sensitivity (PRUNE.COST_WEIGHTING). Then
# every architecture is timed as deployed on real target images, and the report compares AP at
# the measured latency -> docs/whole_detector.md (about 35 minutes on 2 cores: 35 runs of 1-1.5
# minutes, two at a time).
WHOLE_ARGS := --config-file $(STUDY_CONFIG) --output output/whole_detector --criteria l1 --seeds 0 1 2 3 4 \
	--train-sizes 40 --jobs 2 --threads 1

whole-detector-study: data
	$(PY) tools/study.py $(WHOLE_ARGS) --ratios 0.7 0.9 --title "Block-only pruning"
	$(PY) tools/study.py $(WHOLE_ARGS) --latency-reduction 0.4 --kinds stem block stage fpn head --mode cost \
		--cost-weighting uniform sensitivity --report-all --report docs/whole_detector.md \
		--notes docs/whole_detector_notes.md \
		--title "Whole-detector pruning to a latency target against block-only pruning"

: 1500 iterations (7.5 times the study's),
# 10 and 40 target images, a validation split of 100 target images evaluated every 100 iterations
# (the curves, and the early-stopped model: each run's best validation checkpoint) and a test
# split of 200 other ones, which every run is reported on and which chooses nothing. One torch
# thread per run, two runs at a time.
REGIME_CONFIG := configs/synthetic/study/faster_rcnn_R18_FPN_regime.yaml
REGIME_SPLITS := --val-size 100 --test-size 200 --val-period 100 --jobs 2 --threads 1

# The unpruned fine-tune's validation curves on 10 and 40 images, 2 seeds: does validation AP
# peak and fall? -> docs/overfitting.md and docs/figures/overfitting_curves.png, with the
# reading in docs/overfitting_notes.md (the 4 runs took 21-33 min each on 2 shared cores); then
# 40 images for 3000 iterations, one seed (41 min) -> docs/overfitting_3000.md.
overfit-curve: data
	$(PY) tools/study.py --config-file $(REGIME_CONFIG) --output output/overfit --baselines-only \
		--seeds 0 1 --train-sizes 10 40 $(REGIME_SPLITS) --report docs/overfitting.md \
		--notes docs/overfitting_notes.md --title "Where fine-tuning overfits: validation curves of the unpruned fine-tune"
	$(PY) tools/study.py --config-file $(REGIME_CONFIG) --output output/overfit_long --baselines-only \
		--seeds 0 --train-sizes 40 $(REGIME_SPLITS) --report docs/overfitting_3000.md \
		--title "The unpruned fine-tune on 40 images for 3000 iterations" \
		SOLVER.MAX_ITER 3000 SOLVER.STEPS "(2250, 2760)" SOLVER.CHECKPOINT_PERIOD 500

# The grid of that regime (not run yet; resumes where it stopped): l1, taylor, lrp, mi and random
# at 50 and 70 % of the block channels, beside the unpruned fine-tune (final and early-stopped)
# and the unpruned one with a frozen backbone up to res3 and up to res4 (FREEZE_AT 3, 4), on 10
# and 40 images, 5 seeds: 130 runs.
REGIME_ARGS := --config-file $(REGIME_CONFIG) $(REGIME_SPLITS) --seeds 0 1 2 3 4 --train-sizes 10 40 --every-size \
	--criteria l1 taylor lrp mi random --freeze-at 3 4

study-regime: data
	$(PY) tools/study.py $(REGIME_ARGS) --ratios 0.5 0.7 --output output/study_regime \
		--title "Transfer study where fine-tuning can overfit (10 and 40 images, 1500 iterations)"

# The same grid pruning the whole detector (every kind of group) to a latency target, on the
# score per millisecond saved (the latency model is timed once on this machine and cached).
study-regime-detector: data
	$(PY) tools/study.py $(REGIME_ARGS) --kinds stem block stage fpn head --latency-reduction 0.3 0.5 \
		--mode cost --cost-weighting sensitivity --output output/study_regime_detector \
		--title "Whole-detector pruning to a latency target where fine-tuning can overfit"

# Rebuild the shipped source model (about an hour on 2 cores): pre-training from scratch on the
# synthetic source domain, then packed as models/faster_rcnn_R18_FPN_source.pth.
source: data
	$(PY) tools/train_net.py --resume --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml
	$(PY) tools/summarize.py output/synthetic/source
	$(PY) tools/pack_model.py output/synthetic/source/model_final.pth models/faster_rcnn_R18_FPN_source.pth \
		--note "make source at commit $$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# One-shot pruning of the shipped source model: 30 % and 50 % of the
# `block` channels by l1 norm, reports in output/synthetic/oneshot/l1_{30,50}/report.md.
demo-prune: data
	$(PY) tools/prune_net.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		--criterion l1 --ratio 0.3 --output output/synthetic/oneshot/l1_30 MODEL.WEIGHTS models/faster_rcnn_R18_FPN_source.pth
	$(PY) tools/prune_net.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		--criterion l1 --ratio 0.5 --output output/synthetic/oneshot/l1_50 MODEL.WEIGHTS models/faster_rcnn_R18_FPN_source.pth

# What pruning removes, explained: output/explain/demo/report.html (about 4 minutes).
explain: data
	$(PY) tools/explain_net.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		--split synthetic_target_val --criterion mi --ratio 0.5 --output output/explain/demo \
		MODEL.WEIGHTS models/faster_rcnn_R18_FPN_source.pth

# The source model's detections beside those of its one-shot l1 50 % pruning (made by
# `make demo-prune` when missing), with the ground truth, on 8 source val images:
# output/visualize/l1_50/index.html.
L1_50 := output/synthetic/oneshot/l1_50/model_pruned.pth

visualize: data
	test -f $(L1_50) || $(MAKE) demo-prune
	$(PY) tools/visualize.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		--unpruned models/faster_rcnn_R18_FPN_source.pth --pruned $(L1_50) \
		--split synthetic_source_val --images 8 --output output/visualize/l1_50

# TorchScript and ONNX exports of the source model and of its one-shot l1 50 % pruning, with
# parity checks, sizes and latency in output/export/*/export.json.
export: demo-prune
	$(PY) tools/export_model.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		--format torchscript --format onnx --output output/export/source \
		--latency-repeats 50 --threads 1 --clock cpu MODEL.WEIGHTS models/faster_rcnn_R18_FPN_source.pth
	$(PY) tools/export_model.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
		--format torchscript --format onnx --output output/export/l1_50 \
		--latency-repeats 50 --threads 1 --clock cpu MODEL.WEIGHTS output/synthetic/oneshot/l1_50/model_pruned.pth

# Benchmarks on CPU (random weights, about 15 + 5 minutes on 2 cores): speed-up per FLOPs cut,
# surgery, scoring overhead of every criterion, memory of a pruning event; d2prune beside
# Torch-Pruning and torch.nn.utils.prune. One thread and CPU time keep a shared machine from
# distorting the figures.
benchmark: setup
	$(PY) tools/benchmark.py --threads 1 --clock cpu --repeats 3 --rounds 5 --output docs/benchmark.md
	$(PY) tools/benchmark_peers.py --side 320 --threads 1 --clock cpu --output docs/benchmark_peers.md

# For a machine with one CUDA GPU (no venv, no network; about 5 minutes on an H200): the CUDA
# tests, then the GPU latency of an R50-FPN Faster R-CNN unpruned and pruned to -50 % FLOPs
# (tools/benchmark_gpu.py), into $OUT (default output/gpu). Needs python3 with torch+CUDA and
# torchvision, and .devwheels/ (the missing wheels) and .devd2/ (detectron2 main's source, used
# uncompiled) prepared on a networked machine by
# `D2_SRC=<detectron2 checkout> bash tools/setup/device_gpu.sh --prepare`.
benchmark-gpu:
	bash tools/setup/device_gpu.sh

# Every test (about 10 minutes on 2 cores; cuda ones skip themselves without a GPU).
test: setup
	$(PY) -m pytest -q tests

# The whole suite on detectron2 main, built with its C++ ops from the source tree D2_SRC (a
# snapshot of main, e.g. `git archive HEAD | tar -x -C DIR` in a clone) into its own venv
# $(D2MAIN_VENV) through the `git` install route; rebuilt only when that tree changes. On 2 cores
# the set-up took 220 s (133 s of it building detectron2), the suite 17 minutes on a shared machine.
D2MAIN_VENV ?= .venv-d2main

test-d2main:
	@test -n "$(D2_SRC)" || { echo "test-d2main: give D2_SRC=DIR, a detectron2 source tree (e.g. a git archive of main)." >&2; exit 2; }
	VENV=$(D2MAIN_VENV) D2PRUNE_DETECTRON2=git D2_SRC="$(D2_SRC)" bash tools/setup/install.sh
	$(D2MAIN_VENV)/bin/python -m pytest -q tests

# The in-process tests only (surgery exactness, budgets, criteria, checkpoints, config checks):
# no slow, subprocess, two-process or GPU tests.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not subprocess and not ddp and not cuda" tests

lint: setup
	$(VENV)/bin/ruff check d2prune projects tools tests

clean:
	rm -rf output
