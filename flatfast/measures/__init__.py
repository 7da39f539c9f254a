"""Generalization predictors built on the parts below: the flatness measures (epsilon-sharpness, Frobenius norm,
the flatness report), the alpha-rescaling that fools them, the function a classifier expresses, and the
PAC-Bayes bound.

Public through ``flatfast``: :func:`flatfast.sharpness`, :func:`flatfast.frobenius_norm`,
:func:`flatfast.flatness_report`, :func:`flatfast.rescale`, :func:`flatfast.function_of`,
:func:`flatfast.pac_bayes_bound`."""
