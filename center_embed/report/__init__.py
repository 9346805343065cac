"""The evaluation report of a model: metrics.json, index.html and plots (needs torch, onnx).

build   computes the figures from a model, a dataset and a run folder
plots   the matplotlib figures
html    the self-contained HTML page
"""
