# Two entry points (see README): `make demo` runs the whole pipeline on the embedded phantom
# dataset; `make test` runs the test suite. Both create ./.venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: demo test install

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tsgm demo --work_dir $(DEMO_DIR)

test: install
	$(PY) -m pytest -q tests

# Optional: MONAI Label (bundles/vejp_anomaly/docs/README.md). The constraints keep the CPU torch, numpy >= 2 and
# jsonschema >= 4; monailabel and pydicom-seg go in without their dependencies (pydicom-seg pins numpy < 2 and
# jsonschema < 4; numpymaxflow and sam2 serve only scribbles and SAM2 apps), then a .pth hook lets the PyPI
# torchvision (a CUDA build) import next to the CPU torch (bundles/vejp_anomaly/monailabel_app/tsgm_torchvision_cpu_fix.py).
.PHONY: install-monailabel
install-monailabel: install
	$(PY) -m pip install -q -c constraints/monailabel.txt -e ".[test,monailabel]"
	$(PY) -m pip install -q -c constraints/monailabel.txt --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
	$(PY) bundles/vejp_anomaly/monailabel_app/tsgm_torchvision_cpu_fix.py --install
