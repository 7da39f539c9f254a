"""log P(f), the prior probability of a labelling under the NNGP: Expectation Propagation (its loop over an
array module, its posterior, its second-order correction) and the two Monte Carlo estimators that put an error
bar on it (minimax tilting and sequential Monte Carlo).

Public through ``flatfast``: :func:`flatfast.log_prior`, :func:`flatfast.ep_log_evidence`."""
