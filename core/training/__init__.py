"""Training-time use: :class:`~layerscope.training.monitor.Monitor` follows a live model through
training; the Keras and PyTorch Lightning callbacks are built on it. May import the engine and
everything it imports.
"""
