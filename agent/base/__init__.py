"""Pieces every package may use: metrics, loops, group commit, durable files, phones.

The bottom of the import graph (above only ``agent.errors`` and ``agent.config``):
nothing here imports a package of the agent's, so anything may import it.
"""
