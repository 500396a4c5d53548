# make setup  - create .venv and install everything (scripts/setup.sh; fast when nothing changed)
# make ask    - answer QUESTION from the files in CORPUS with the embedded SmolLM2 model
# make test   - run the test suite, then the core tests again on the lowest transformers we allow
# Override either variable: make ask QUESTION="..." CORPUS="notes/ paper.txt"

# Nine distinct licences that every Debian machine has: about 32K SmolLM2 tokens, four times the
# model's 8K trained context. The answer to QUESTION (Mozilla Foundation, section 10.1) is in
# MPL-2.0 only; no other file mentions Mozilla or a license steward.
CORPUS ?= $(addprefix /usr/share/common-licenses/,\
	Apache-2.0 Artistic BSD CC0-1.0 GFDL-1.3 GPL-2 GPL-3 LGPL-2.1 MPL-2.0)
QUESTION ?= Who is the license steward of the Mozilla Public License 2.0?
# A single-fact question: the `retrieval` preset keeps the one best chunk (the paper's K=1 setting
# for retrieval tasks) of 2048-token chunks, which a small model reads best and a CPU prefills
# fastest (README, Performance). `parallelcomp ask --help` for more.
ASK_FLAGS ?= --preset retrieval
# Extra flags for one run (the main-job benchmark adds --json --dtype ...).
ASK_EXTRA ?=

.PHONY: setup ask test

setup:
	bash scripts/setup.sh

ask: setup
	HF_HUB_OFFLINE=1 .venv/bin/parallelcomp ask $(ASK_FLAGS) $(ASK_EXTRA) "$(QUESTION)" $(CORPUS)

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q
	bash scripts/test-floor.sh
