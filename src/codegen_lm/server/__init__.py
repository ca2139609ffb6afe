"""The HTTP server (`codegen-lm serve`): OpenAI-compatible completions, the editor ecosystem's routes,
metrics and a playground page, over one engine."""

from .app import create_app
from .context import ServerContext

__all__ = ["ServerContext", "create_app"]
