"""Ray Serve endpoint for a trained model: OpenAI-compatible chat and RISE's multi-turn solve.

Imports are lazy so `import rise_ray.serve` does not import Ray Serve or FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app", "majority_answer", "make_app", "serve_command"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rise_ray.serve import app

        return getattr(app, name)
    raise AttributeError(name)
