# One-command entry points; every target creates the virtual environment first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/ropim_mnist.yaml

.PHONY: setup pretrain test lint format clean bench compare bench-pretrain bench-data bench-dense reproduce-table2 report gpu-check published-checkpoints

# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes PyTorch's CPU build (no CUDA wheels)
# before the rest; unset, pip takes torch from PyPI (the CUDA build on Linux x86_64).
TORCH_INDEX ?=

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet -c constraints.txt --index-url $(TORCH_INDEX) torch torchvision)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed  ## create .venv and install the project with its test tools (TORCH_INDEX: see above)

pretrain: setup  ## ROPIM on the bundled MNIST digits (2 CPU cores: a few minutes)
	$(BIN)/ropim pretrain --config $(CONFIG) $(ARGS)

test: setup  ## lint, then the whole test suite (CPU, about 10 minutes on 2 cores)
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache

bench: setup  ## ROPIM training-step speed: ViT-B/16 at 224 px (bf16 on CUDA; slow on CPU)
	$(BIN)/ropim bench-step --config configs/ropim_vit_b16_imagenet.yaml train.batch_size=$(or $(BATCH),128) $(ARGS)

compare: setup  ## ROPIM, MAE and SimMIM on the bundled digits under one budget
	$(BIN)/ropim compare --config configs/compare_mnist.yaml $(ARGS)

bench-pretrain: setup  ## images/s of each method's step; projection vs. bmm; harness vs. plain loop
	$(BIN)/ropim bench-pretrain --config $(or $(BENCH_CONFIG),configs/compare_mnist.yaml) $(ARGS)
	$(BIN)/ropim bench-loop --config configs/ropim_mnist.yaml

bench-data: setup  ## JPEG views/s per core vs. the decoder alone, with workers, vs. the step rate
	$(BIN)/ropim bench-data --config $(or $(BENCH_CONFIG),configs/ropim_vit_b16_imagenet.yaml) \
		train.batch_size=$(or $(BATCH),16) $(ARGS)

bench-dense: setup  ## one ViTDet iteration at 1024 px (windowed vs. global) and UperNet at 512: CPU time, memory
	$(BIN)/ropim bench-dense $(ARGS)

SCALE ?= smoke
reproduce-table2: setup  ## pre-train all methods x seeds, evaluate, write reports/table2_$(SCALE).md
	$(BIN)/ropim reproduce --config configs/table2_$(SCALE).yaml $(if $(IMAGENET_DIR),data.root=$(IMAGENET_DIR)) \
		$(if $(ADE20K_DIR),segmentation.root=$(ADE20K_DIR)) $(if $(COCO_DIR),detection.root=$(COCO_DIR)) $(ARGS)

published-checkpoints: setup  ## the authors' MAE/SimMIM (ROPIM) checkpoints in CHECKPOINTS through every task vs. their papers
	$(BIN)/ropim published --checkpoints $(CHECKPOINTS) $(if $(IMAGENET_DIR),data.root=$(IMAGENET_DIR)) \
		$(if $(ADE20K_DIR),segmentation.root=$(ADE20K_DIR)) $(if $(COCO_DIR),detection.root=$(COCO_DIR)) $(ARGS)

RESULTS ?= results/results.csv
report: setup  ## rebuild reports/table2_$(SCALE).md from $(RESULTS) (RESULTS=results/reference.csv: the committed rows)
	$(BIN)/ropim report --config configs/table2_$(SCALE).yaml --results $(RESULTS)

gpu-check: setup  ## on a CUDA machine (minutes): ViT-B/16 step speed per method, exact resume, classification
	$(BIN)/ropim gpu-check --out results/gpu_check $(ARGS)
