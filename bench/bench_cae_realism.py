"""Realism of the cycle autoencoder's samples with the Compare suite, beside the noise floor, on
the splits of ``bench_dp_nmf_realism.py`` (Kang by donor, pbmc3k by cell; half held out).

The CAE samples by decoding training cells in their own contexts (condition and cell type on
Kang, cell type on pbmc3k), so its realism is that of its reconstructions. Prints one JSON
object.

    python bench/bench_cae_realism.py [--datasets kang_by_donor,pbmc3k_by_cells]
        [--set name=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_dp_nmf_realism import LABEL_KEY, SEED, evaluate_sample, prepare_split  # noqa: E402


def main() -> None:
    import anndata as ad

    from engine.generators.base import config_from_dict
    from engine.generators.cae import CAEConfig, CAEGenerator

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", default="kang_by_donor,pbmc3k_by_cells")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    from engine.cli import _config_from_args

    overrides = _config_from_args(argparse.Namespace(config=None, set=args.set))
    results = {}
    for name in args.datasets.split(","):
        with tempfile.TemporaryDirectory() as folder:
            split = prepare_split(name, Path(folder))
            train = ad.read_h5ad(Path(folder) / "train.h5ad")
            test = ad.read_h5ad(Path(folder) / "test.h5ad")
        fields = ",".join(f for f in ("condition", LABEL_KEY) if f in train.obs)
        model = CAEGenerator(config_from_dict(CAEConfig, {"fields": fields, "seed": SEED,
                                                          **overrides}))
        started = time.perf_counter()
        model.fit(train)
        synthetic = model.sample(seed=SEED)
        seconds = round(time.perf_counter() - started, 1)
        results[name] = {"split": split, "fields": fields, "seconds_fit_sample": seconds,
                         **evaluate_sample(name, train, test, synthetic)}
    print(json.dumps({"generator": "cae", "overrides": overrides, "results": results},
                     indent=1))


if __name__ == "__main__":
    main()
