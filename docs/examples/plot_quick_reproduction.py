"""
A quick reproduction of the paper's experiment
==============================================

``flatfast reproduce`` trains networks on a training set S with a growing attack set A of flipped labels, and
records each network's test error, log P(f) and the flatness of its training loss; the SGD networks are also
α-scaled and measured again. This example runs a small grid through the same code -- the library's
``flatfast.experiments.run`` -- in well under a minute: ``|S| = 100`` digits, ``|A| = 0, 50, 100``, one seed each of SGD
and Adam. ``flatfast reproduce --quick`` runs a larger grid, and ``flatfast reproduce`` the authors' whole grid.
"""

# %%
import json
import os
import tempfile

import matplotlib.image
import matplotlib.pyplot as plt

from flatfast.experiments import Config, run

out = tempfile.mkdtemp()
config = Config(n_train=100, attack_sizes=[0, 50, 100], seeds=1, successful_runs=0, optimizers=["sgd", "adam"],
                max_epochs=3000, sharpness_method="sign-ascent", out=out)
run(config, log=lambda line: print(line) if "done" in line or "Kendall" in line else None)

# %%
# Kendall's τ between test error and each measure over these few networks (flatness as log10): with a handful of
# networks the intervals are wide; the authors' whole grid narrows them (see the results pages).
with open(os.path.join(out, "correlations.json")) as f:
    correlations = json.load(f)["correlations_with_test_error"]
for measure, c in correlations.items():
    print(f"{measure:>16}: tau {c['kendall_tau']:+.2f} over {c['n']} networks")

# %%
# The summary figure the run wrote: test error against log P(f) and against each flatness measure; crosses are
# the α-scaled copies of the SGD networks -- the same test error and log P(f), far sharper.
image = matplotlib.image.imread(os.path.join(out, "summary.png"))
fig, ax = plt.subplots(figsize=(12, 7.2))
ax.imshow(image)
ax.axis("off")
fig.tight_layout()
