# vdsmlite: two commands matter - `make run` and `make test`.
# Both install what they need on a fresh Debian machine (apt packages when
# missing, a virtualenv, the package) before doing their job.

PYTHON   ?= python3
VENV     ?= .venv
STAMPS   := .stamps
PY       := $(VENV)/bin/python
PIP      := $(VENV)/bin/pip
# Extra arguments for `make run`, e.g. RUN_ARGS="--port 54322".
RUN_ARGS ?=
# Extra arguments for pytest, e.g. PYTEST_ARGS="-k rpc -x".
PYTEST_ARGS ?=

# Debian packages, checked against what a minimal Debian 12 (debootstrap minbase, the
# debian:12 image) lacks and what the code and tests execute or dlopen.
# - The virtualenv: python3 and python3-venv (minimal Debian has neither; without
#   python3-venv `python3 -m venv` fails for want of ensurepip). Every dependency in
#   setup.cfg ships manylinux wheels for CPython 3.11 (cffi, lxml, aiohttp, PyYAML).
# - The package's C modules (vdsmlite/ovf/_tarscan.c and vdsmlite/http/_chunked.c, the
#   OVF_STORE upload's hot loops; setup.py) build with gcc, libc6-dev and python3-dev.
#   They are optional: without them the same work runs in Python, slower (the tests
#   insist on them being built).
# - Libraries loaded at run time: libudev1 (pyudev), libblkid1 (blkid.py, cffi),
#   libsanlock-client1 (locking/sanlock.py, cffi).
# - The agent runs qemu-img (qemu-utils), qemu-system-x86_64 under systemd-run
#   (qemu-system-x86, systemd), mount/umount/losetup (mount), and for block and shared
#   domains LVM (lvm2), sanlock, mkfs -t ext3 for the master LV (util-linux, e2fsprogs),
#   iscsiadm (open-iscsi) and mount.nfs (nfs-common).
# - The tests also run qemu-io (qemu-utils), mkfs.ext4 (e2fsprogs), blkid, lsblk,
#   findmnt, setpriv, unshare (util-linux), openssl and curl.
APT_BASE := python3 python3-venv gcc libc6-dev python3-dev libudev1 libblkid1 util-linux \
            mount
APT_RUN  := $(APT_BASE) qemu-utils qemu-system-x86 systemd lvm2 sanlock \
            libsanlock-client1 e2fsprogs
APT_TEST := $(APT_RUN) open-iscsi nfs-common openssl curl
# Benchmarks also need a load generator faster than the servers it measures.
APT_BENCH := $(APT_TEST) wrk

.PHONY: run test test-unit bench lint venv apt-run apt-test apt-bench clean help

help:
	@echo "make run    - install what the daemon needs and run it in the foreground"
	@echo "make test   - install everything the suite needs and run lint + the whole suite"
	@echo "make test-unit - the pure modules only (no root, no daemons), in seconds"
	@echo "make bench  - run the benchmarks in bench/ (prints ratios against peers)"
	@echo "make clean  - remove the virtualenv and runtime state"

run: apt-run venv
	$(VENV)/bin/vdsmlite $(RUN_ARGS)

# Three workers, a module each at a time (module-scoped domains stay in one
# process); each worker has a udev database of its own (tests/conftest.py).
# Three on two cores: the suite mostly waits (sanlock's timeouts, daemons
# starting; ~55% CPU), so a third worker uses the idle time. Measured on 2
# cores: 9:07-9:18 with two workers, 6:27-6:35 with three.
test: apt-test venv lint
	$(PY) -m pytest -n 3 --dist loadfile $(PYTEST_ARGS)

# The modules marked `unit` (pytest.ini_options markers): parsers, schema types,
# dispatcher, jobs, config, on-disk formats. No root, no daemon, no storage.
test-unit: venv
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

bench: apt-bench venv
	$(PY) bench/run_all.py

# ruff everywhere; mypy on the package (its settings in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check vdsmlite tests fake_storage bench
	$(VENV)/bin/mypy

venv: $(STAMPS)/venv

$(STAMPS)/venv: setup.cfg pyproject.toml setup.py vdsmlite/ovf/_tarscan.c \
               vdsmlite/http/_chunked.c
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[storage,test]'
	@touch $@

# Install only the packages that are missing; `apt-get update` runs at most once.
define apt_install
	@missing=""; for p in $(1); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" \
	        || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

apt-run:
	$(call apt_install,$(APT_RUN))

apt-test:
	$(call apt_install,$(APT_TEST))

apt-bench:
	$(call apt_install,$(APT_BENCH))

clean:
	rm -rf $(VENV) $(STAMPS) var .pytest_cache .ruff_cache *.egg-info
