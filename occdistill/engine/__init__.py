"""Training engine: the readable loop, evaluation, checkpoints, distributed helpers, history.

Import the parts from their modules (``occdistill.engine.loop.train``,
``occdistill.engine.evaluate.evaluate``, ...); importing this package loads nothing heavy.
"""
