"""The embedded demo that `rise run` runs with no config: a tiny Llama-style model and character
tokenizer built locally (tiny.py), the sorted-list search task (rise_ray.envs.search), the settings
of the warm-up SFT that turns the random model into a base model (warmup.py; the warm-up itself is
rise_ray.train.warmup), and its config (default.yaml)."""
