"""steptune: STeP — self-reflected trajectories and partial masking for small LLM agents."""

import os

from steptune.threads import set_thread_wait_defaults

set_thread_wait_defaults()  # before anything imports torch: see steptune/threads.py

# With the `kernels` package installed (transformers 5.25 depends on it), transformers swaps a model's layers for
# kernels it fetches from the Hugging Face Hub when the model starts training on a GPU: offline (HF_HUB_OFFLINE=1)
# that raises at model.train() (seen on an H200: benchmarks/gpu_check.py), online it runs code that no config pins.
# Off unless the user sets USE_HUB_KERNELS.
os.environ.setdefault("USE_HUB_KERNELS", "0")

__version__ = "0.1.0"
