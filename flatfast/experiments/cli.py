"""``flatfast reproduce`` (the main experiment): the command line's options turned into a Config, and what Ctrl-C
leaves."""
import json
import os
import sys
import time
from pathlib import Path

from flatfast.experiments.config import Config
from flatfast.experiments.grid import merge, run
from flatfast.experiments.table import interrupted_message


def parse_shard(text):
    """"i/N", or "auto": Slurm's job array (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT tasks, ids from 0)."""
    if text == "auto":
        try:
            return int(os.environ["SLURM_ARRAY_TASK_ID"]), int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError):
            raise ValueError("--shard: auto reads SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, which are not set "
                             "(run it inside a Slurm job array, or give i/N)") from None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected i/N (e.g. 0/4), got {text!r}") from None
    return index, count


def _with_e3_settings(overrides, quick):
    """The authors' CIFAR-10 (E3) settings for every one not given on the command line (with --quick, not |S|
    and |A|: the reduced run keeps its own), and one line saying which were applied."""
    from flatfast.experiments.config import CIFAR10_E3

    applied = {k: v for k, v in CIFAR10_E3.items() if k not in overrides
               and not (quick and k in ("n_train", "attack_sizes"))}
    if applied:
        print("flatfast reproduce: --data cifar10 takes the authors' E3 settings: " + ", ".join(
            f"{k} = {v[0]}..{v[-1]} by {v[1] - v[0]}" if isinstance(v, list) else f"{k} = {v}"
            for k, v in applied.items()), flush=True)
    return {**applied, **overrides}


def main(args) -> int:
    temporal_only = [flag for field, flag in (("post_epochs", "--post-epochs"), ("every", "--every"))
                     if getattr(args, field, None) is not None]
    if temporal_only:
        print(f"flatfast reproduce: {', '.join(temporal_only)} apply to --experiment temporal only", file=sys.stderr)
        return 2
    try:
        if getattr(args, "merge", None):
            t0 = time.perf_counter()
            merge(args.merge, args.out or "flatfast-results", log=lambda s: print(s, flush=True))
            print(f"done in {time.perf_counter() - t0:.0f} s")
            return 0
        overrides = {}
        for field in ("data", "data_dir", "arch", "channels", "kernel_samples", "trace_method", "n_train", "n_test",
                      "attack_sizes", "seeds", "successful_runs", "max_seeds", "optimizers", "max_epochs",
                      "train_precision", "lr", "likelihood", "out", "sharpness_method", "sharpness_epochs",
                      "measures"):
            value = getattr(args, field, None)
            if value is not None:
                overrides[field] = value
        if getattr(args, "shard", None):
            overrides["shard_index"], overrides["shard_count"] = parse_shard(args.shard)
        jobs = getattr(args, "jobs", None) or 1
        if jobs < 1:
            raise ValueError(f"--jobs: must be >= 1, got {jobs}")
        saved = Path(args.out or Config.out) / "config.json"
        if args.resume and saved.exists() and not args.quick:
            # continue with the settings the run was made with; only options typed now count as changes (and
            # a change is refused by prepare_output, naming it)
            config = Config(**{**json.loads(saved.read_text()), **overrides})
        else:
            if overrides.get("data") == "cifar10":
                overrides = _with_e3_settings(overrides, args.quick)
            config = Config.quick(**overrides) if args.quick else Config(**overrides)
        t0 = time.perf_counter()
        run(config, resume=args.resume, log=lambda s: print(s, flush=True), jobs=jobs)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"flatfast reproduce: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = args.out or Config.out
        print(interrupted_message(Path(out) / "results.csv", out), file=sys.stderr)
        return 130
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0
