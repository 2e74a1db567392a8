"""Oracles the tests check the library against, apart from the tests themselves:
float64 NumPy references of the model (`reference`), its quantization formats
(`quant_reference`) and the sampler (`sampling_reference`), and writers of checkpoint
files (`pth_writer`, `safetensors_writer`) for hand-made and hostile inputs."""
