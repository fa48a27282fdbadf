#!/usr/bin/env bash
# rlhf's PPO step beside trl 0.11.4's (see benchmarks/ppo_vs_trl.py). Builds trl 0.11.4 in its own venv once, with
# this environment's torch version installed first (so the trl pins do not pull another; where pip's default index
# would give the CUDA build, point PIP_EXTRA_INDEX_URL at the CPU wheels), then runs the comparison with this rlhf.
#   bash benchmarks/ppo_vs_trl.sh [ppo_vs_trl.py options]      TRL_VENV=DIR to put the venv elsewhere
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${TRL_VENV:-${RLHF_CACHE:-$HOME/.cache/rlhf}/trl-0.11.4-venv}"
# The blog's stack had bitsandbytes (for 8-bit); with it installed, peft loads it on both sides, as it does here, so
# that peak memory compares like with like. Same version as this environment's.
bnb="$(python -c 'import bitsandbytes; print(bitsandbytes.__version__)')"
torch_version="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import rich, torch, trl, bitsandbytes as b; assert trl.__version__ == '0.11.4' and b.__version__ == '$bnb' and torch.__version__.split('+')[0] == '$torch_version'" 2>/dev/null; then
  python -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_version"
  # rich: trl 0.11.4 imports it without declaring it.
  "$venv/bin/pip" install -q trl==0.11.4 transformers==4.46.3 peft==0.13.2 accelerate==1.1.1 rich "bitsandbytes==$bnb"
fi
exec python "$here/ppo_vs_trl.py" --trl-python "$venv/bin/python" "$@"
