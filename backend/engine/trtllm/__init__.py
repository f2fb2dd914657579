"""The `tensorrt_llm` engine: TensorRT-LLM's LLM API (PyTorch backend) behind `Engine`.

Only `load.py` imports `tensorrt_llm` (and `availability.py`, to check that it
imports), and only when this engine is chosen: the package needs an NVIDIA
GPU and its CUDA driver to import. Everything that translates Tollgate's
config, requests, outputs and load figures to and from the LLM API lives in
modules that never import it (`args`, `checkpoint`, `outputs`, `stats`), so
it is unit-tested on any machine.
"""
