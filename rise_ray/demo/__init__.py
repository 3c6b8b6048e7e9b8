"""The embedded demo that `rise run` runs with no config: a tiny Llama-style model and character
tokenizer built locally (tiny.py), the sorted-list search task (rise_ray.envs.search), the warm-up
SFT that turns the random model into a base model (warmup.py), and its config (default.yaml)."""
