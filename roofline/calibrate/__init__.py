"""Measuring this machine for the planner: kernel curves, the runtime's fixed costs, a saved hardware profile.

It runs real kernels and engine parts; the planner (roofline/planner/) stays pure arithmetic over what it
saves.
"""
