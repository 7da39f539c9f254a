"""Tests that can fail: each mutation below breaks flatfast the way a named test is there to catch, and this script
checks that the test then fails. It edits one source file at a time and always restores it.

    python tests/check_mutations.py            # every mutation (about two minutes on 2 cores)
    python tests/check_mutations.py c h        # some of them, by key

Each entry: (key, file, text to replace, replacement, the test that must now fail). A MISSED line is a test that
cannot see the defect it was written for.
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

MUTATIONS = [
    ("a", "flatfast/curvature/hessian.py", 'r"""Spectral density of the Hessian', '"""Spectral density of the Hessian',
     "tests/test_docs.py::test_public_docstrings_hold_no_control_characters"),
    ("b", "flatfast/curvature/operator.py", "        if self.constant_entries is not None:  # H -> M H M", "        if False:  # H -> M H M",
     "tests/test_architectures.py::test_embedding_padding_rows_are_constant_and_the_operator_symmetric"),
    ("c", "flatfast/models/modes.py", "    _load_jvp_decompositions()\n", "",
     "tests/test_architectures.py::test_no_torch_deprecation_warning_on_the_first_forward_over_reverse_product"),
    ("d", "flatfast/curvature/generic_hvp.py", "    return isinstance(exc, NotImplementedError) or any(", "    return False and any(",
     "tests/test_architectures.py::test_products_move_to_the_second_route_where_torch_has_no_double_backward"),
    ("e", "flatfast/curvature/estimators.py", "nodes[p], weights[p] = theta, S[0, :] ** 2", "nodes[p], weights[p] = theta, abs(S[0, :]) / abs(S[0, :]).sum()",
     "tests/test_architectures.py::test_trace_eigenvalues_and_products_match_the_dense_hessian"),
    ("f", "flatfast/kernel/empirical.py", "k.mul_(sigma_w2 / features.shape[1]).add_(sigma_b2)", "k.mul_(sigma_w2 / features.shape[1])",
     "tests/test_empirical.py::test_a_kernel_whose_draws_are_all_equal_is_the_one_draw_formula"),
    ("g", "flatfast/measures/flatness.py", "    common = dict(loss_fn=loss_fn, params=params, batch_fn=batch_fn, mode=mode, seed=seed, progress=progress)",
     "    common = dict(loss_fn=loss_fn, params=params, batch_fn=batch_fn, mode=\"eval\", seed=seed, progress=progress)",
     "tests/test_architectures.py::test_eval_mode_by_default_train_mode_on_request_and_both_restored"),
    ("h", "flatfast/models/modes.py", "            yield\n        finally:\n", "            yield\n        except BaseException:\n            raise\n        else:\n",
     "tests/test_architectures.py::test_the_backends_and_modes_are_restored_after_a_call_that_succeeds_and_one_that_fails"),
]
MUTATIONS += [
    ("i", "flatfast/curvature/operator.py", "        if asymmetry > tolerance:", "        if False:",
     "tests/test_behaviour.py::test_a_custom_function_whose_second_derivative_torch_drops_is_refused"),
    ("p1", "flatfast/models/probe.py", "    size = inputs.size\n    if size <= 1:\n        return None", "    size = inputs.size\n    if True:\n        return None",
     "tests/test_behaviour.py"),
    ("p2", "flatfast/models/probe.py", "        first, where = _watched_pass(model, inputs)\n    if where is None:", "        first, where = _watched_pass(model, inputs)\n    return first\n    if where is None:",
     "tests/test_behaviour.py"),
    ("p3", "flatfast/models/batches.py", "    elif isinstance(batch, (list, tuple)) and len(batch) == 2:\n        inputs, targets = batch", "    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:\n        inputs, targets = batch[:2]",
     "tests/test_behaviour.py::test_sample_weights_are_never_dropped_and_the_documented_way_weights_the_loss"),
]
MUTATIONS += [  # the measures
    ("q1", "flatfast/curvature/operator.py", "        self._held = held\n", "",
     "tests/test_measures.py::test_ascent_replays_the_batches_it_read_once"),
    ("q2", "flatfast/measures/pac_bayes.py", "    value = 1.0 / sigma ** 2\n",
     "    value = 1.0 / sigma ** 2\n    value_stderr = 2.0 * value * math.log(hi / lo)  # the bracket's width\n",
     "tests/test_predictors.py::test_pac_bayes_stderr_is_the_spread_over_fresh_draws"),
    ("q3", "flatfast/measures/ranking.py", "    shifted = np.asarray(values) - (np.mean(values) - value)\n",
     "    shifted = np.asarray(values)\n",
     "tests/test_predictors.py::test_bootstrap_interval_is_shifted_by_the_statistic_s_bias"),
    ("q4", "flatfast/measures/invariant.py", "directional = inputs.size * (slope * along)",
     "directional = (slope * along)",
     "tests/test_predictors.py::test_fisher_rao_norm_is_the_mean_squared_directional_derivative"),
    ("q5", "flatfast/measures/invariant.py", "    if abs(together - alone) <= tolerance",
     "    if True or abs(together - alone) <= tolerance",
     "tests/test_predictors.py::test_fisher_rao_norm_takes_one_pass_for_a_batch_mean_and_each_example_otherwise"),
]
MUTATIONS += [  # the docs
    ("r1", "flatfast/kernel/empirical.py", ":class:`~flatfast.models.batches.ModelInputs`", ":class:`ModelInputs`",
     "tests/test_docs.py::test_cross_references_lead_somewhere"),
]


def main(only):
    missed = 0
    for key, path, old, new, test in MUTATIONS:
        if only and key not in only:
            continue
        file = ROOT / path
        source = file.read_text()
        if old not in source:
            raise SystemExit(f"{key}: the text to mutate is no longer in {path}; update this script")
        file.write_text(source.replace(old, new, 1))
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                                  cwd=ROOT, capture_output=True, text=True, timeout=900)
        finally:
            file.write_text(source)
        last = (done.stdout.strip().splitlines() or [done.stderr[-200:]])[-1]
        missed += done.returncode == 0
        print(f"{key}: {'caught' if done.returncode else 'MISSED'} by {test} -- {last}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
