"""vLLM's own OpenAI server with the CPU build's torchvision hidden: rise_ray first, then the module.

    python bench/vllm_server.py --model DIR --dtype float32 --port 8001 ...
(`python -m vllm.entrypoints.openai.api_server` would import the CUDA-linked torchvision.)
"""

import runpy

import rise_ray  # hides the mismatched media packages in this process and its children

if __name__ == "__main__":
    rise_ray.inspect_models_in_process()  # a fresh inspection process would import them
    # alter_sys=False: __main__ stays this file, which the spawned engine process runs first
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=False)
