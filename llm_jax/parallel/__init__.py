"""Devices, meshes and hosts: the one sharding rules table, multi-host start-up, Orbax
checkpoints and the one run loader, the accelerator table and host memory settings.
"""
