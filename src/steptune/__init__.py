"""steptune: STeP — self-reflected trajectories and partial masking for small LLM agents."""
__version__ = "0.1.0"
