# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv when missing,
# installs torch==2.13.0 (CPU build) first and then SegXAILib with its test and slicer extras; the stamp
# file makes a second run skip the installs unless pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.segxai-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_OUT ?= demo-output

.PHONY: demo test install clean benchmark

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,slicer,viewer,batch]'
	# test oracles for Grad-CAM / Grad-CAM++ and LRP; their torchvision dependency cannot sit
	# beside the pinned CPU torch (PyPI's torchvision is a CUDA build) and is not needed for 3D
	$(PY) -m pip install --quiet --no-deps grad-cam==1.5.7 ttach==0.0.3 zennit==0.5.1
	# nnU-Net v2 (model-card format nnunetv2, the extra "nnunet"): its dependency timm pulls
	# torchvision, whose PyPI wheels are CUDA builds that replace the pinned CPU torch; its other
	# dependencies install beside torch==2.13.0, nnunetv2 and its network library without theirs
	# (timm is needed only by nnU-Net's Primus / Eva architectures)
	$(PY) -m pip install --quiet acvl_utils==0.2.6 'batchgenerators>=0.25.1' 'batchgeneratorsv2>=0.3.2' pandas \
		graphviz tifffile requests nibabel seaborn imagecodecs yacs 'blosc2>=3.3.2' einops torch==2.13.0
	$(PY) -m pip install --quiet --no-deps nnunetv2==2.8.1 dynamic_network_architectures==0.4.4
	# the browser tests drive Debian's chromium through Playwright's executable_path
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/segxai demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest Testing -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
