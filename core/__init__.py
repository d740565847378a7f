"""The torch-free core that ``model/`` and ``app/`` both import, and that imports neither.

``contract``: the ONNX file's input/output names and metadata; ``preprocess``: the one evaluation
preprocessing; ``errors``: failures of images and model files, each carrying its HTTP status.
"""
