"""The model and its kernels: the Llama-style transformer, the platform kernels it calls,
and the formulas for its parameters and FLOPs.
"""
