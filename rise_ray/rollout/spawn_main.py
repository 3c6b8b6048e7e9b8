"""The `__main__` that vLLM's spawned engine processes run first (rise_ray.serve.llm_config.setup_worker names it): importing
it imports rise_ray, which hides the CUDA-linked media packages before vLLM imports transformers."""

import rise_ray  # noqa: F401
