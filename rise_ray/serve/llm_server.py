"""The LLMServer deployment class of `rise serve`: Ray Serve LLM's own, with /tokenize working.

Ray 2.60's VLLMEngine looks for vLLM's tokenization server as `state.openai_serving_tokenization`;
vLLM 0.32 names it `state.serving_tokenization`, so /tokenize and /detokenize answer "This model
does not support the 'tokenization' task" (docs/serve_llm.md). The engine below takes vLLM's name
when Ray's finds nothing, and changes nothing once a Ray release reads it itself.
"""

from __future__ import annotations

from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm.deployment import LLMServer


class TokenizingVLLMEngine(VLLMEngine):
    async def start(self) -> None:
        await super().start()
        if self._oai_serving_tokenization is None:
            self._oai_serving_tokenization = getattr(self._app_state, "serving_tokenization", None)


class RiseLLMServer(LLMServer):
    _default_engine_cls = TokenizingVLLMEngine
