"""Torch's OpenMP threads wait passively once steptune is imported first (steptune/threads.py).

Each check runs a fresh Python process: OpenMP reads its settings once, when torch loads it. libgomp prints the
settings it runs with when OMP_DISPLAY_ENV=VERBOSE; GOMP_SPINCOUNT is how long an idle thread spins (0: it sleeps
at once; OpenMP's default spins 300000 rounds first).
"""

import os
import re
import subprocess
import sys

import pytest

from steptune.threads import THREAD_WAIT_DEFAULTS, set_thread_wait_defaults

OURS = [*THREAD_WAIT_DEFAULTS, "GOMP_SPINCOUNT", "STEPTUNE_THREAD_DEFAULTS"]


def runtime_spin_count(code: str, **env: str) -> int:
    """The spin count libgomp runs with in a fresh process running `code`, from a clean environment plus `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in OURS}
    done = subprocess.run([sys.executable, "-c", f"{code}; torch.ones(2)"], capture_output=True, text=True,
                          env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    m = re.search(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr)
    if m is None:
        pytest.skip("torch does not run on GNU OpenMP here (no GOMP_SPINCOUNT in OMP_DISPLAY_ENV)")
    return int(m.group(1))


def test_importing_steptune_before_torch_makes_idle_threads_sleep():
    assert runtime_spin_count("import steptune, torch") == 0
    # the same process without steptune spins: the setting above is what changed it
    assert runtime_spin_count("import torch") > 0


def test_the_cli_module_sets_it_before_torch_loads():
    assert runtime_spin_count("import steptune.cli, steptune.training.sft, torch") == 0


def test_a_setting_the_user_made_wins():
    assert runtime_spin_count("import steptune, torch", OMP_WAIT_POLICY="ACTIVE") > 300000
    assert runtime_spin_count("import steptune, torch", GOMP_SPINCOUNT="5000") == 5000


def test_opting_out_keeps_openmp_defaults():
    assert runtime_spin_count("import steptune, torch", STEPTUNE_THREAD_DEFAULTS="0") == 300000


def test_set_thread_wait_defaults_reports_only_what_it_added():
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_thread_wait_defaults(environ) == {"KMP_BLOCKTIME": "0"}
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "0"}
    assert set_thread_wait_defaults({"STEPTUNE_THREAD_DEFAULTS": "0"}) == {}


def test_models_loaded_after_importing_steptune_fetch_no_hub_kernels(tmp_path):
    # transformers kernelizes a model that trains on a GPU with kernels fetched from the Hub whenever the `kernels`
    # package is installed; offline that raised at model.train() on an H200 (benchmarks/gpu_check.py)
    pytest.importorskip("kernels")
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    load = ("from transformers import AutoModelForCausalLM; "
            f"print(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).use_kernels)")
    clean = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}

    def use_kernels(code: str, **env: str) -> str:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env},
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()[-1]

    assert use_kernels(f"import steptune; {load}") == "False"
    assert use_kernels(load) == "True"  # transformers' own default: what steptune turns off
    assert use_kernels(f"import steptune; {load}", USE_HUB_KERNELS="1") == "True"  # the user's choice wins
