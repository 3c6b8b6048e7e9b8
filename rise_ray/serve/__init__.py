"""Ray Serve for trained models: Ray Serve LLM's OpenAI API (vLLM's serving code) and RISE's
multi-turn solve.

`rise_ray.serve.deploy` builds and runs it (`build_app`, `make_app`, `serve_command`);
`rise_ray.serve.app` is the ingress (RiseIngress); `rise_ray.serve.llm_config` maps a run's config
onto Ray Serve LLM's `LLMConfig`.
"""
