# Two commands from a fresh clone: `make smoke` and `make test`.
# Variables: WORKDIR (where runs and prepared datasets go), PYTHON, METHOD,
# TABLE_ROWS.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
WORKDIR ?= /tmp/contrastive
METHOD ?= supcon
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
PY := $(VENV)/bin/python
SIMULATED_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8
# When this make started (Unix seconds): the smoke run's closing time budget
# counts the venv and data steps in its set-up.
MAKE_STARTED := $(shell date +%s)

.PHONY: venv data smoke table table-biased table-lt table-open-world test \
	test-fast coverage clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The original Fashion-MNIST IDX files (Debian package dataset-fashion-mnist).
data: $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz

$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz:
	@echo "Fashion-MNIST not found in $(FASHION_MNIST_DIR); installing Debian's dataset-fashion-mnist."
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq dataset-fashion-mnist
	@test -f $@ || (echo "Still missing $@: set FASHION_MNIST_DIR to a folder with the four IDX .gz files." && false)

# Pretrain on 8 simulated CPU devices, then linear evaluation (prints a table
# and, last, the time budget: set-up, training, evaluation, total).
smoke: venv data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) CONTRASTIVE_STARTED_AT=$(MAKE_STARTED) \
	  $(SIMULATED_DEVICES) $(PY) -m contrastive.main \
	  --config=configs/smoke_fashion_mnist.py:$(METHOD) \
	  --workdir=$(WORKDIR)/smoke_$(METHOD) \
	  --config.input.data_dir=$(WORKDIR)/tensorflow_datasets

# The Fashion-MNIST result table (results/fashion_mnist.md and .png): every
# method with the same encoder and budget. By default the baseline rows at
# encoder width 1/2 (random init, CE, SimCLR, SupCon: 238 min on 2 cores);
# TABLE_ROWS=random_init,ce,simclr,supcon runs them at width 1/4, the width
# of every other method's row (about 2 h); TABLE_ROWS= runs every row of
# contrastive/result_table.py (each further method about 30 to 60 min; the
# README's table took 1763 min in all).
# Rows not run this time keep their entries in results/fashion_mnist.json.
TABLE_ROWS ?= random_init_width_half,ce_width_half,simclr_lr10_width_half,supcon_width_half
table: venv data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(PY) -m contrastive.result_table \
	  --workdir=$(WORKDIR)/table --data_dir=$(WORKDIR)/tensorflow_datasets \
	  --out=results --rows=$(TABLE_ROWS) --merge

table-biased: venv data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(PY) -m contrastive.result_table \
	  --table=biased_fashion_mnist --workdir=$(WORKDIR)/table_biased \
	  --data_dir=$(WORKDIR)/tensorflow_datasets --out=results

table-lt: venv data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(PY) -m contrastive.result_table \
	  --table=fashion_mnist_lt --workdir=$(WORKDIR)/table_lt \
	  --data_dir=$(WORKDIR)/tensorflow_datasets --out=results

table-open-world: venv data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(PY) -m contrastive.result_table \
	  --table=open_world --workdir=$(WORKDIR)/table_open_world \
	  --data_dir=$(WORKDIR)/tensorflow_datasets --out=results

# Two pytest-xdist workers (one per core: most of a test is single-threaded
# XLA compilation), work-stealing since test times range from 0.1 s to a
# minute. The 30 slowest tests are listed so the time budget is watched.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal

test: venv data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(PYTEST) --durations=30

test-fast: venv
	$(PYTEST) -m "not slow"

# The whole suite under coverage.py (.coveragerc): a terminal report and
# coverage.json.
coverage: venv data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(PYTEST) --durations=30 \
	  --cov=contrastive --cov-report=term --cov-report=json:coverage.json

clean:
	rm -rf $(WORKDIR)
