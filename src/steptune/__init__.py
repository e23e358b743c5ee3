"""steptune: STeP — self-reflected trajectories and partial masking for small LLM agents."""

from steptune.threads import set_thread_wait_defaults

set_thread_wait_defaults()  # before anything imports torch: see steptune/threads.py

__version__ = "0.1.0"
