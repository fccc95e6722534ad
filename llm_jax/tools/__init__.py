"""Tools around training: ahead-of-time planning, benchmarks, config sweeps and scaling-law
fits.
"""
