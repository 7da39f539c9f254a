"""Generalization predictors built on the parts below, on one footing: the flatness measures that a rescaling
fools (epsilon-sharpness, Frobenius norm, the flatness report), those it cannot (adaptive sharpness, relative
flatness, the Fisher-Rao norm, magnitude-aware PAC-Bayes flatness, the path norm), the Laplace evidence, the
alpha-rescaling itself, the function a classifier expresses, the PAC-Bayes bound, and the metrics that say how well
a measure ranks networks (Kendall tau, granulated Kendall, conditional mutual information, robust sign error).

Public through ``flatfast``; the measures take (model, loader) with the conventions of :func:`flatfast.hvp`."""
