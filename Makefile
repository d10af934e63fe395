# Two commands for a newcomer: `make test` and `make reproduce` (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test reproduce lab lint models bench clean-venv

# glibc keeps freed memory instead of handing it back to the OS after every large tensor: the attack's CPU steps
# ran about 25% faster with these (measured on the Shadow Attack, 2 processes side by side, with and without)
export MALLOC_TRIM_THRESHOLD_ ?= 10000000000
export MALLOC_MMAP_THRESHOLD_ ?= 10000000000

# (Re)install when the venv is missing or requirements changed.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check shadowlab tests
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax --nbval-current-env notebooks

reproduce: $(STAMP)
	$(PY) -m shadowlab evaluate
	$(PY) -m shadowlab reproduce all
	mkdir -p outputs/notebooks
	for nb in notebooks/*.ipynb; do \
	  $(VENV)/bin/papermill --cwd notebooks $$nb outputs/notebooks/$$(basename $$nb) || exit 1; \
	done

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

lint: $(STAMP)
	$(PY) -m ruff check shadowlab tests

CROWN_IBP := --optimizer adam --lr 1e-3 --weight-decay 0 --epochs 20 --batch-size 128 --warmup-frac 0.05 \
  --ramp-frac 0.6 --kappa-end 0.5 --seed 0 --no-augment
SHI := --warmup-reg 0.5 --init-scheme ibp

# Retrain the committed model zoo (about 1 hour on 2 CPU cores; needs the JPEG copy or official CIFAR-10).
models: $(STAMP)
	$(PY) -m shadowlab train --arch cnn --defense none --epochs 15 --seed 0
	$(PY) -m shadowlab train --arch cnn --defense gaussian --sigma 0.12 --epochs 6 --seed 0 --init cnn-undefended
	$(PY) -m shadowlab train --arch cnn --defense gaussian --sigma 0.25 --epochs 12 --seed 0 --init cnn-undefended
	$(PY) -m shadowlab train --arch cnn --defense gaussian --sigma 0.25 --epochs 6 --lr 0.1 --seed 1 --init smooth-sigma0.25
	$(PY) -m shadowlab train --arch cnn --defense gaussian --sigma 0.50 --epochs 10 --seed 0 --init smooth-sigma0.25
	$(PY) -m shadowlab train --arch cnn --defense gaussian --sigma 1.00 --epochs 10 --seed 0 --init smooth-sigma0.50
	$(PY) -m shadowlab train --arch cnn --defense gaussian --sigma 0.25 --epochs 6 --lr 0.02 --seed 2 --init smooth-sigma0.25
	# CROWN-IBP (see README): no crop and flip; 2/255 trains at 1.1x eps with beta 1 -> 0 over the first quarter of
	# the eps ramp, 8/255 at 1.0x eps with beta over the first 5% (1.1x with a quarter was worse at 8/255, README).
	# cnn-4layer adds batch norm, the IBP initialisation and the warm-up regulariser of Shi et al. 2021.
	for arch in 'cnn-4layer {"width":1,"linear_size":512,"batch_norm":true} $(SHI)' \
	            'cnn-2layer {"width":4,"linear_size":256}'; do \
	  set -- $$arch; arch=$$1 kwargs=$$2; shift 2; \
	  $(PY) -m shadowlab train --arch $$arch --arch-kwargs "$$kwargs" --defense crown-ibp --eps 2/255 $(CROWN_IBP) \
	    --train-eps-factor 1.1 --beta-frac 0.25 "$$@" || exit 1; \
	  $(PY) -m shadowlab train --arch $$arch --arch-kwargs "$$kwargs" --defense crown-ibp --eps 8/255 $(CROWN_IBP) \
	    --train-eps-factor 1.0 --beta-frac 0.05 "$$@" || exit 1; \
	done

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $(BENCH_STAMP)

# The Shadow Attack against ART, attack step and certification against bare throughput, bound timings:
# writes data/results/bench.json and bench.md and the tables of the README (80 minutes on one CPU thread, most of
# it ART).
bench: $(BENCH_STAMP)
	$(PY) -m shadowlab bench

clean-venv:
	rm -rf $(VENV)
