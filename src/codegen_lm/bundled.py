"""Models that ship inside the package, so that everything works offline out of the box."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"

# codegen-lm-mini: 10.5M parameters, trained on the CPython standard library by
# scripts/train_default_model.sh (configs/default-model.toml); see the README's "Default model".
DEFAULT_MODEL = "codegen-lm-mini"


def bundled_models() -> dict[str, Path]:
    """Name -> folder of every model in the package."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "config.json").is_file()}


def bundled_model_dir(name: str) -> Path | None:
    return bundled_models().get(str(name))
