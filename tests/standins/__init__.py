"""Stand-ins for ``torch_tensorrt`` and ``tensorrt`` that record what they are asked to build and run
it in PyTorch / ONNX Runtime on the CPU, so the TensorRT plumbing is tested without a GPU.

They are strict where the real packages are: an ``Input`` without shape or dtype, an unknown compile
option, a builder flag the emulated TensorRT version does not have, an unaligned or unknown tensor
address, executing on another device than the engine's all fail as they would on a GPU.
"""
