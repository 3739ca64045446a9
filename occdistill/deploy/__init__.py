"""Deployment: benchmarks (latency, memory, FLOPs, per-stage profile) and camera rigs.

Import the submodules directly (``occdistill.deploy.bench``, ``occdistill.deploy.rig``); this
package imports nothing on its own so that ``import occdistill`` stays light.
"""
