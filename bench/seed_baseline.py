"""The seed's generator, without DP: a baseline for bench/bench_dp_nmf_realism.py.

A re-implementation of the CAMDA 2025 blue team's "SingleCellNMFGenerator"
(``src/generators/models/nmf_sampler.py`` with ``--dp none``, ``sampling_method: poisson``),
the algorithm that DP-NMF replaced:

1. ``MiniBatchNMF(n_components=20, random_state=seed)`` fitted on the **raw count matrix** of the
   training cells (no normalisation, no log) by one ``partial_fit`` pass over row batches of
   1000 cells (the seed's ``nmf_batch_size``), then W = ``transform`` of every training cell.
2. ``KMeans(n_clusters=number of cell types, random_state=seed)`` on the rows of W (unscaled, so
   clusters follow library size as much as composition).
3. For each cluster, the mean count vector of its cells.
4. Each synthetic cell: a cluster drawn in proportion to cluster size, then Poisson(mean) per
   gene.

One deliberate difference: the seed labelled synthetic cells with a random forest on their NMF
embedding; here a cell takes its cluster's majority training cell type (the label a reader of the
benchmark expects, and the one DP-NMF uses). Sampling is vectorised rather than a per-cell loop,
which draws from the same distribution. Counts are kept sparse (the seed densified them first:
the NMF result is the same up to floating-point order).

    from seed_baseline import seed_baseline  # with bench/ on sys.path
    synthetic = seed_baseline(train, n_cells=train.n_obs, seed=0)
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import MiniBatchNMF

N_COMPONENTS = 20
NMF_BATCH_SIZE = 1000
SAMPLE_BLOCK = 512  # cells drawn at once, bounding the dense block's memory
LABEL_KEY = "cell_type"


def seed_baseline(train: ad.AnnData, n_cells: int, seed: int,
                  label_key: str = LABEL_KEY) -> ad.AnnData:
    """Fit the seed's NMF + k-means + Poisson model on ``train`` and draw ``n_cells`` cells.

    Returns integer counts (CSR, int32) with ``train``'s genes and ``obs[label_key]`` set to the
    majority training label of each cell's cluster.
    """
    counts = sp.csr_matrix(train.X, dtype=np.float64)
    labels = train.obs[label_key].astype(str).to_numpy()
    n_clusters = max(1, min(len(np.unique(labels)), train.n_obs))

    nmf = MiniBatchNMF(n_components=min(N_COMPONENTS, *counts.shape), random_state=seed)
    for start in range(0, counts.shape[0], NMF_BATCH_SIZE):
        nmf.partial_fit(counts[start:start + NMF_BATCH_SIZE])
    w = nmf.transform(counts)

    clusters = KMeans(n_clusters=n_clusters, random_state=seed).fit_predict(w)
    sizes = np.bincount(clusters, minlength=n_clusters)
    means = np.zeros((n_clusters, counts.shape[1]))
    cluster_labels = np.empty(n_clusters, dtype=object)
    for cluster in range(n_clusters):
        members = clusters == cluster
        if members.any():
            means[cluster] = np.asarray(counts[members].mean(axis=0)).ravel()
            cluster_labels[cluster] = pd.Series(labels[members]).value_counts().index[0]
        else:
            cluster_labels[cluster] = ""

    rng = np.random.default_rng(seed)
    drawn = rng.choice(n_clusters, size=n_cells, p=sizes / sizes.sum())
    blocks = [sp.csr_matrix(rng.poisson(means[drawn[start:start + SAMPLE_BLOCK]])
                            .astype(np.int32))
              for start in range(0, n_cells, SAMPLE_BLOCK)]
    x = sp.vstack(blocks, format="csr") if blocks else \
        sp.csr_matrix((0, counts.shape[1]), dtype=np.int32)
    obs = pd.DataFrame({label_key: pd.Categorical(cluster_labels[drawn].astype(str)),
                        "cluster": pd.Categorical(drawn.astype(str))},
                       index=[f"seed_{i}" for i in range(n_cells)])
    return ad.AnnData(sp.csr_matrix(x, dtype=np.int32), obs=obs,
                      var=pd.DataFrame(index=train.var_names.copy()))
