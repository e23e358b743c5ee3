"""Backends and the factory that builds one from a spec string or a config.

Spec strings: `local:PATH`, `vllm:PATH`, `openai:MODEL@BASE_URL` (e.g. `openai:teacher@http://127.0.0.1:8000/v1`);
a bare path means `local:PATH`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from steptune.backends.base import (
    BackendError,
    ChatBackend,
    Conversation,
    GenerationConfig,
)


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # what a pipeline stage's key leaves out (steptune.pipeline.run.config_for_key): settings that change no reply,
    # and settings added after runs existed, at the default that does what those runs did
    speed_only: ClassVar[frozenset[str]] = frozenset({"prefix_cache_gb"})
    added_defaults: ClassVar[dict[str, Any]] = {"dtype": "auto"}

    kind: Literal["local", "vllm", "openai"] = "local"
    model: str  # a path (local, vllm) or the served model name (openai)
    base_url: str | None = None  # openai only
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name; the key itself never enters a config file
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 4
    max_batch_size: int = 32
    device: str | None = None
    adapter: str | None = None  # a LoRA adapter directory (local only)
    prefix_cache_gb: float = Field(2.0, ge=0)  # local: keys and values kept for prompts' reuse, at most this much
    # local, vllm: the weights' dtype; auto: bf16 on a GPU, fp32 on a CPU (bfloat16 is faster on a CPU with native
    # bf16 matmuls: steptune.models.precision)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


def parse_backend_spec(spec: str) -> BackendConfig:
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("local", "vllm", "openai"):
        return BackendConfig(kind="local", model=spec)
    if kind == "openai":
        model, at, url = rest.partition("@")
        if not at or not model or not url:
            raise ValueError(f"openai backend spec must be 'openai:MODEL@BASE_URL', got {spec!r}")
        return BackendConfig(kind="openai", model=model, base_url=url)
    return BackendConfig(kind=kind, model=rest)


def make_backend(spec: str | BackendConfig) -> ChatBackend:
    cfg = parse_backend_spec(spec) if isinstance(spec, str) else spec
    if cfg.kind == "local":
        from steptune.backends.local import LocalBackend

        return LocalBackend(cfg.model, device=cfg.device, dtype=cfg.dtype, max_batch_size=cfg.max_batch_size,
                            adapter=cfg.adapter, prefix_cache_gb=cfg.prefix_cache_gb)
    if cfg.kind == "vllm":
        from steptune.backends.vllm import VLLMBackend

        return VLLMBackend(cfg.model, dtype=cfg.dtype)
    from steptune.backends.openai_compat import OpenAICompatBackend

    if not cfg.base_url:
        raise ValueError("the openai backend needs base_url")
    return OpenAICompatBackend(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env,
                               max_concurrency=cfg.max_concurrency, timeout_s=cfg.timeout_s,
                               max_retries=cfg.max_retries)


__all__ = ["BackendConfig", "BackendError", "ChatBackend", "Conversation", "GenerationConfig", "make_backend",
           "parse_backend_spec"]
