"""Ray Serve endpoint for a trained model: OpenAI-compatible chat and RISE's multi-turn solve.

`rise_ray.serve.deploy` builds and runs it (`build_app`, `make_app`, `serve_command`);
`rise_ray.serve.app` is the deployment itself.
"""
