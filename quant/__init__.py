"""The quantization scheme and the methods that reach it. Imports torch and torchao only (never
executorch), so it runs on a training machine that has no ExecuTorch."""
