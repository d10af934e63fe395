# Two commands for a newcomer: `make test` and `make reproduce` (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast browser browser-if-possible reproduce lab site assignments slides slides-notes lint models bench clean-venv lirpa lirpa-if-wheel

# glibc keeps freed memory instead of handing it back to the OS after every large tensor: the attack's CPU steps
# ran about 25% faster with these (measured on the Shadow Attack, 2 processes side by side, with and without).
# They reach every process make starts (tests, notebooks); `python -m shadowlab` run directly gets the same from
# shadowlab/allocator.py (keep_freed_memory, called by the command line).
export MALLOC_TRIM_THRESHOLD_ ?= 10000000000
export MALLOC_MMAP_THRESHOLD_ ?= 10000000000

# (Re)install when the venv is missing or requirements changed.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Everything, the real-browser tests and the seven notebooks and their worked solutions (notebooks/solutions/, nbval
# recurses) included. Installs Chromium first where it can (`browser-if-possible`); without root the browser tests
# skip and the summary (-rs) says why and what to run. SHADOWLAB_REQUIRE_BROWSER=1 (CI) turns that skip into a failure.
test: $(STAMP) browser-if-possible lirpa-if-wheel
	$(PY) -m ruff check shadowlab tests
	$(PY) -m pytest -q -rs tests
	$(PY) -m pytest -q --nbval-lax --nbval-current-env notebooks

# The edit loop: lint and the unit tests without the notebooks, the browser test or the slow tests (about a minute).
test-fast: $(STAMP)
	$(PY) -m ruff check shadowlab tests
	$(PY) -m pytest -q -m "not slow and not browser" tests

# auto_LiRPA, the optional bound backend (shadowlab/certify/lirpa.py, alpha-CROWN): from the wheel $(AUTO_LIRPA_WHEEL) when
# set, else the pinned upstream commit (PyPI's 0.3 does not import on torch 2.x). --no-deps: its metadata pins
# torch<2.9 and test tools; its runtime imports are installed next to it.
LIRPA_UPSTREAM := auto_LiRPA @ git+https://github.com/Verified-Intelligence/auto_LiRPA@a050a3d
lirpa: $(STAMP)
	$(PY) -m pip install -q --no-deps "$(or $(AUTO_LIRPA_WHEEL),$(LIRPA_UPSTREAM))"
	$(PY) -m pip install -q graphviz appdirs pyyaml packaging

# `make test` installs auto_LiRPA only when AUTO_LIRPA_WHEEL names a wheel (CI); without it its tests skip and say
# how to install it
lirpa-if-wheel: $(STAMP)
	$(if $(AUTO_LIRPA_WHEEL),$(MAKE) lirpa,@true)

# Debian's chromium and chromium-driver for tests/test_browser.py: apt-get as root, sudo where available, else a
# message saying what to run.
browser:
	scripts/install-browser

browser-if-possible:
	@scripts/install-browser || echo "make test: going on without Chromium; the browser tests will skip (see above)"

reproduce: $(STAMP)
	$(PY) -m shadowlab evaluate
	$(PY) -m shadowlab reproduce all --overwrite
	mkdir -p outputs/notebooks
	for nb in notebooks/*.ipynb; do \
	  $(VENV)/bin/papermill --cwd notebooks $$nb outputs/notebooks/$$(basename $$nb) || exit 1; \
	done

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

# The executed lessons and their worked solutions as a static HTML site in outputs/site/ (docs/site.md).
site: $(STAMP)
	$(PY) -m shadowlab.lab.site --out outputs/site

# Student and instructor builds of every lesson for otter-grader in outputs/assignments/ (docs/assignments.md):
# student-package.zip to hand out (student notebooks, the package and its data, no solutions, no key),
# <lesson>/autograder/ (solutions, hidden tests, the grading zip) to keep.
assignments: $(STAMP)
	@$(PY) -c "import otter" 2>/dev/null || { echo "error: make assignments needs otter-grader: $(PY) -m pip install 'otter-grader>=7.0' (make test installs it from requirements.txt)" >&2; exit 2; }
	$(PY) -m shadowlab.lab.assignments build --out outputs/assignments

# Lecture mode: the executed lessons as reveal.js decks in outputs/slides/ that work offline (reveal.js from the
# sphinx-revealjs package), with outputs/slides/slides.json (seconds and slides per lesson); `make slides-notes`
# then rewrites docs/lecture-notes.md (measured timings, discussion prompts) from it. docs/slides.md.
slides: $(STAMP)
	$(PY) -m shadowlab.lab.slides build --out outputs/slides

slides-notes: $(STAMP)
	$(PY) -m shadowlab.lab.slides notes outputs/slides/slides.json --out docs/lecture-notes.md

lint: $(STAMP)
	$(PY) -m ruff check shadowlab tests

# CROWN-IBP (see README): no crop and flip; batch norm before every hidden ReLU, the IBP initialisation and the
# warm-up regulariser of Shi et al. 2021. 2/255 trains at 1.1x eps (cnn-4layer: 1.2x) with beta 1 -> 0 over the
# first quarter of the eps ramp, 8/255 at 1.0x eps with beta over the first 5%. The natural-loss weight kappa ends at
# 0.25 or 0.5, per model; cnn-4layer at 8/255 and cnn-2layer at 8/255 train 30 epochs, and cnn-4layer at 2/255 is
# three times as wide (conv widths 12/12/24/24): whichever measured better (README). Seed 0, except cnn-4layer at
# 2/255: seed 1, the better of its two seeds (README).
CROWN_IBP := --defense crown-ibp --optimizer adam --lr 1e-3 --weight-decay 0 --batch-size 128 --no-augment \
  --warmup-reg 0.5 --init-scheme ibp
# 1 epoch at eps 0, a 12-epoch eps ramp, then 7 (20 epochs) or 17 (30 epochs) epochs at the full eps
EPOCHS20 := --epochs 20 --warmup-frac 0.05 --ramp-frac 0.6
EPOCHS30 := --epochs 30 --warmup-frac 0.0333 --ramp-frac 0.4
# 2/255 at a given training-eps factor: $(call EPS2,FACTOR)
EPS2 = --eps 2/255 --train-eps-factor $(1) --beta-frac 0.25
EPS8 := --eps 8/255 --train-eps-factor 1.0 --beta-frac 0.05
# cnn-4layer at a given width: $(call CNN4,WIDTH)
CNN4 = --arch cnn-4layer --arch-kwargs '{"width":$(1),"linear_size":512,"batch_norm":true}'
CNN2 := --arch cnn-2layer --arch-kwargs '{"width":4,"linear_size":256,"batch_norm":true}'

# Retrain the committed model zoo (about 3.5 hours on 2 CPU cores; needs the JPEG copy or official CIFAR-10).
# --force: each line replaces the committed checkpoint of its name (train refuses an existing name without it).
models: $(STAMP)
	$(PY) -m shadowlab train --force --arch cnn --defense none --epochs 15 --seed 0
	$(PY) -m shadowlab train --force --arch cnn --defense gaussian --sigma 0.12 --epochs 6 --seed 0 --init cnn-undefended
	$(PY) -m shadowlab train --force --arch cnn --defense gaussian --sigma 0.25 --epochs 12 --seed 0 --init cnn-undefended
	$(PY) -m shadowlab train --force --arch cnn --defense gaussian --sigma 0.25 --epochs 6 --lr 0.1 --seed 1 --init smooth-sigma0.25
	$(PY) -m shadowlab train --force --arch cnn --defense gaussian --sigma 0.50 --epochs 10 --seed 0 --init smooth-sigma0.25
	$(PY) -m shadowlab train --force --arch cnn --defense gaussian --sigma 1.00 --epochs 10 --seed 0 --init smooth-sigma0.50
	$(PY) -m shadowlab train --force --arch cnn --defense gaussian --sigma 0.25 --epochs 6 --lr 0.02 --seed 2 --init smooth-sigma0.25
	$(PY) -m shadowlab train --force $(call CNN4,3) $(CROWN_IBP) $(EPOCHS20) $(call EPS2,1.2) --kappa-end 0.5 --seed 1
	$(PY) -m shadowlab train --force $(call CNN4,1) $(CROWN_IBP) $(EPOCHS30) $(EPS8) --kappa-end 0.25 --seed 0
	$(PY) -m shadowlab train --force $(CNN2) $(CROWN_IBP) $(EPOCHS20) $(call EPS2,1.1) --kappa-end 0.25 --seed 0
	$(PY) -m shadowlab train --force $(CNN2) $(CROWN_IBP) $(EPOCHS30) $(EPS8) --kappa-end 0.25 --seed 0

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $(BENCH_STAMP)

# The Shadow Attack against ART, attack step and certification against bare throughput, bound timings:
# writes data/results/bench.json and bench.md (80 minutes on one CPU thread, most of it ART); add
# `--readme docs/results.md` to the command to rewrite the benchmark block there as well.
bench: $(BENCH_STAMP)
	$(PY) -m shadowlab bench

clean-venv:
	rm -rf $(VENV)
