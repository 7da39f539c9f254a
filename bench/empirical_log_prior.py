"""How the Monte Carlo error of an empirical NNGP kernel moves log P(f): log P(f) (EP) from kernels of M draws,
several seeds each.

--arch fcn (default): an FCN 784-512-512-1 (width 512, depth 2) on n MNIST-like inputs with linear-rule labels,
    against the analytic arc-cosine kernel's value.
--arch cnn: the CNN of ``flatfast reproduce --arch cnn`` on S u E of its default run (the digits as 8x8 images,
    |S| = 500, |E| = 797, n = 1297), for the true labelling and one with 20 % of E flipped (probit likelihood):
    the spread of each over seeds, and of their difference -- what separates two trained networks, since one run
    uses one kernel.

    python bench/empirical_log_prior.py                      # n = 200, M = 8..256 (about 1 minute on 2 cores)
    python bench/empirical_log_prior.py --arch cnn --seeds 3 # M = 32..1024 (about 5 minutes on 2 cores)
    python bench/empirical_log_prior.py --arch bert --seeds 3 # a BERT-style encoder on token sequences
    python bench/empirical_log_prior.py --arch lstm --seeds 3 # an LSTM classifier on token sequences

--arch bert / lstm: n = 200 random token sequences (vocabulary 100, 16 tokens, the last 4 padding in a third of
    them), labelled by whether the first token is below 50, and the same labelling with 20 % flipped; a
    BertForSequenceClassification built from a config (width 64, 2 layers, 4 heads; transformers needed) or an
    embedding -> LSTM(64) -> linear classifier; probit likelihood, as for the CNN.

--out FILE appends one JSON line per (M, seed), which bench/results_pages.py turns into the results page's tables
(docs/results/empirical-kernels/ holds the stored lines).
"""
import argparse
import json
import warnings

import numpy as np
import torch

import flatfast


def log_evidence(K, f):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flatfast.ep_log_evidence(K, f, likelihood="probit", check_psd=False)


def fcn(args):
    rng = np.random.default_rng(0)
    X = rng.random((args.n, 784))
    y = np.where(X[:, :392].sum(1) > X[:, 392:].sum(1), 1, -1)
    analytic = flatfast.log_prior(X, y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, args.width), torch.nn.ReLU(),
                              torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
                              torch.nn.Linear(args.width, 1)).double()
    print(f"n = {args.n}, width {args.width}: analytic-kernel log P(f) = {analytic:.3f}")
    print(f"{'M':>5} {'mean log P(f)':>14} {'spread (sd over seeds)':>23} {'mean - analytic':>16}")
    for M in args.draws or [8, 16, 32, 64, 128, 256]:
        values = []
        for seed in range(args.seeds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values.append(flatfast.log_prior(X, y, model=net, kernel_samples=M, seed=seed))
        values = np.array(values)
        print(f"{M:>5} {values.mean():>14.3f} {values.std(ddof=1):>23.3f} {values.mean() - analytic:>16.3f}",
              flush=True)
        for seed, value in enumerate(values):
            _append(args.out, dict(arch="fcn", n=args.n, width=args.width, M=M, seed=seed, log_p=float(value),
                                   analytic=float(analytic)))


def cnn(args):
    from flatfast.experiments import IMAGE_SHAPES, Config, kernel_draws, make_cnn

    config = Config(arch="cnn")
    X_pool, y_pool, X_test, y_test = config.load_data()
    X = np.concatenate([X_pool[: config.n_train], X_test])
    f_true = 2 * np.concatenate([y_pool[: config.n_train], y_test]) - 1
    flipped = config.n_train + np.random.default_rng(0).choice(len(y_test), len(y_test) // 5, replace=False)
    f_flipped = f_true.copy()
    f_flipped[flipped] *= -1
    net = make_cnn(IMAGE_SHAPES[config.data], config.channels, seed=0)
    print(f"CNN ({config.channels} channels) on the digits, n = {len(X)} (|S| = {config.n_train}, "
          f"|E| = {len(y_test)}); the authors' M = n/10 = {kernel_draws(config, len(X))}; {args.seeds} seeds per M")
    print(f"{'M':>5} {'log P(f_true)':>14} {'sd':>6} {'log P(f_20%)':>13} {'sd':>6} {'difference':>11} {'sd':>6}")
    for M in args.draws or [32, 64, 128, 256, 512, 1024]:
        true, other = [], []
        for seed in range(args.seeds):
            K = flatfast.empirical_nngp_kernel(net, X, kernel_samples=M, seed=seed, progress=False)
            true.append(log_evidence(K, f_true))
            other.append(log_evidence(K, f_flipped))
            _append(args.out, dict(arch="cnn", n=len(X), M=M, seed=seed, log_p_true=float(true[-1]),
                                   log_p_flipped=float(other[-1])))
        true, other = np.array(true), np.array(other)
        diff = true - other
        print(f"{M:>5} {true.mean():>14.2f} {true.std(ddof=1):>6.2f} {other.mean():>13.2f} "
              f"{other.std(ddof=1):>6.2f} {diff.mean():>11.2f} {diff.std(ddof=1):>6.2f}", flush=True)


def sequence_problem(n=200, length=16, vocab=100):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 3, length - 4:] = 0
    f_true = np.where(ids[:, 0].numpy() < vocab // 2, 1, -1)
    f_flipped = f_true.copy()
    f_flipped[np.random.default_rng(0).choice(n, n // 5, replace=False)] *= -1
    return ids * mask, mask, f_true, f_flipped


class LSTMClassifier(torch.nn.Module):
    def __init__(self, vocab=100, width=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width, padding_idx=0)
        self.rnn = torch.nn.LSTM(width, width, batch_first=True)
        self.head = torch.nn.Linear(width, 2)

    def forward(self, input_ids, attention_mask):
        states = self.rnn(self.embed(input_ids))[0]
        last = attention_mask.sum(1) - 1  # the last real token of each sequence
        return self.head(states[torch.arange(len(states)), last])


def sequences(args):
    ids, mask, f_true, f_flipped = sequence_problem()
    torch.manual_seed(0)
    if args.arch == "bert":
        import transformers

        config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=16, num_labels=2)
        net = transformers.BertForSequenceClassification(config).double()
    else:
        net = LSTMClassifier().double()
    X = {"input_ids": ids, "attention_mask": mask}
    print(f"{args.arch} on n = {len(ids)} token sequences; {args.seeds} seeds per M")
    print(f"{'M':>5} {'log P(f_true)':>14} {'sd':>6} {'log P(f_20%)':>13} {'sd':>6} {'difference':>11} {'sd':>6}")
    for M in args.draws or [16, 32, 64, 128, 256]:
        true, other = [], []
        for seed in range(args.seeds):
            K = flatfast.empirical_nngp_kernel(net, X, kernel_samples=M, seed=seed, progress=False)
            true.append(log_evidence(K, f_true))
            other.append(log_evidence(K, f_flipped))
            _append(args.out, dict(arch=args.arch, n=len(ids), M=M, seed=seed, log_p_true=float(true[-1]),
                                   log_p_flipped=float(other[-1])))
        true, other = np.array(true), np.array(other)
        diff = true - other
        print(f"{M:>5} {true.mean():>14.2f} {true.std(ddof=1):>6.2f} {other.mean():>13.2f} "
              f"{other.std(ddof=1):>6.2f} {diff.mean():>11.2f} {diff.std(ddof=1):>6.2f}", flush=True)


def _append(out, record):
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["fcn", "cnn", "bert", "lstm"], default="fcn")
    parser.add_argument("--n", type=int, default=200, help="fcn: number of inputs")
    parser.add_argument("--width", type=int, default=512, help="fcn: hidden width")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--draws", type=int, nargs="*", help="the values of M")
    parser.add_argument("--out", default=None, help="append one JSON line per (M, seed) to this file")
    args = parser.parse_args(argv)
    {"fcn": fcn, "cnn": cnn, "bert": sequences, "lstm": sequences}[args.arch](args)


if __name__ == "__main__":
    main()
