"""The context-conditioned cycle autoencoder (CAE): an additive, interpretable model of how each
metadata field shapes expression, used for counterfactuals ("these cells, but stimulated").

The model (:class:`CAEModule`)::

    x̂ = h W  +  Σ_f  s · D_f( M_{f, c_f}( E_f(x) ) ),      h = x Wᵀ,  W ≥ 0

- a **base head**: a tied-weight linear autoencoder without biases whose weights are kept
  non-negative (projected after every step);
- one **head per metadata field** f (condition, cell type, donor, …): a field-shared encoder
  E_f (genes → latent), a pool of context maps M_{f,c} (latent → latent, one per value c of
  the field) of which a cell passes only through its own, and an untied decoder D_f
  (latent → genes) scaled by s (``metadata_decoder_scale``, 0.0159 as in the original);
- an **interaction** (``interaction_field``, the condition by default): that field's head also
  adds ``g_{c} ⊙ stop_grad(x̂ − its own output)``, one gain per value and gene, so its effect
  may depend on the rest of the cell's decoded expression. Without it the condition's change
  was the same vector for every cell type (correlation 1.000 between types on Kang).

Training (per minibatch): the source contexts are the cells' own; a target context is drawn per
cell for **every** field (the research code re-drew them on a fresh copy per field, so only the
last field ever changed). Cycle 1 decodes source → target and a metadata classifier scores the
result against the target contexts (cross-entropy; the classifier is not updated by this term,
so this is not a GAN); cycle 2 decodes target → source. The loss is reconstruction (of the
cells and of the cycle), integration (each head's hidden state is the same before and after the
context change), target consistency, the classifier's supervised loss on real cells, and
target means: the mean of the cells decoded into a combination of contexts against the mean of
real training cells of that combination (a combination without real cells, e.g. a held-out
one, has no such term). The classifier alone left the size of a change free: on Kang the
decoded stimulation effect was 0.6-0.7 of the real one.

**Ensemble** (``ensemble_size`` K): K such models (members), member k trained with seed
``seed + k`` (its own initialisation, target draws and batch order), and the model is their
mean. Every head is additive, so the mean is itself one model of the same form::

    x̂ = mean_k base_k(x)  +  Σ_f mean_k head_{f,k}(x, c_f)

and everything that reads the model (decoding, sampling, counterfactuals, each head's part in
a change, per-gene context contributions, head norms) reads these means (:class:`CAEEnsemble`).
On Kang the spread between seeds was larger than the margin over the baselines (B cells: 5 of
8 single models below the mean-shift baseline's top-DE R² of 0.934); ensembles of four beat
both baselines on every held-out cell type (see ``bench/bench_cae_counterfactual.py``).
DP-SGD trains one member: each further member would spend the privacy budget again.

Expression is modelled as log1p of counts normalised to ``target_sum`` per cell, with squared
error, instead of squared error on raw counts: raw-count MSE is dominated by a few highly
expressed genes and by library size. Counts are drawn back as Poisson around
``expm1(x̂) · library / target_sum``, with the source cell's own library size.

Optional DP-SGD (per-cell gradients clipped, Gaussian noise, Poisson subsampling; accounted by
the run's accountant) makes the *weights* private; decoding real cells still reads them, so
samples and counterfactuals of training cells are labelled not private (see
:meth:`CAEGenerator.privacy_label`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.errors import DataError, UserFacingError
from engine.generators.base import Capabilities, Generator, Progress, no_progress
from engine.generators.registry import register

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DP_CHOICES = ("none", "dp-sgd")
MIN_MEAN_CELLS = 5  # a combination of contexts with fewer real cells has no target mean


@dataclass
class CAEConfig:
    """Options of the cycle autoencoder (form metadata in each field)."""

    fields: str = field(default="", metadata={
        "label": "Context fields",
        "help": "Comma-separated metadata columns, one head each (e.g. condition, cell_type, "
        "donor). Empty: the dataset's condition and cell-type columns."})
    n_genes: int = field(default=2000, metadata={
        "label": "Highly variable genes", "min": 0, "max": 50000,
        "help": "Model this many highly variable genes (0: every gene)."})
    latent_dim: int = field(default=16, metadata={
        "label": "Latent size", "min": 2, "max": 512,
        "help": "Size of the base head's and each field head's hidden state (16 predicted "
        "held-out stimulated Kang cells better than 32: top-DE R² 0.85 vs 0.82 on average)."})
    map_hidden: int = field(default=64, metadata={
        "label": "Context-map width", "min": 2, "max": 1024,
        "help": "Hidden units of each context's feed-forward map."})
    ensemble_size: int = field(default=4, metadata={
        "label": "Ensemble members", "min": 1, "max": 32,
        "help": "Train this many models (member k with seed + k) and use the mean of their "
        "outputs; the heads are additive, so the mean is one model with the same heads. "
        "Held-out stimulated Kang cells, top-DE R² (mean-shift baseline: CD14+ Monocytes "
        "0.498, CD4 T cells 0.901, B cells 0.934): single models ranged 0.597-0.626, "
        "0.928-0.945, 0.929-0.939, a seed spread larger than the margin on B cells (5 of 8 "
        "below it); ensembles of 4 (seeds 0-3, 10-13) gave 0.611/0.619, 0.939/0.939, "
        "0.937/0.937, above both baselines on every type. Training time grows with the "
        "number of members (B cells: 32 s for one, 112-124 s for four). Under DP-SGD one "
        "member is trained, whatever this says: each further member would spend the privacy "
        "budget again."})
    epochs: int = field(default=60, metadata={
        "label": "Epochs", "min": 1, "max": 5000, "help": "Passes over the training cells."})
    batch_size: int = field(default=128, metadata={
        "label": "Batch size", "min": 8, "max": 65536, "help": "Cells per minibatch."})
    learning_rate: float = field(default=2e-3, metadata={
        "label": "Learning rate", "min": 1e-6, "max": 1.0, "step": 1e-4,
        "help": "Adam step size (SGD under DP-SGD keeps Adam too)."})
    metadata_decoder_scale: float = field(default=0.0159, metadata={
        "label": "Field-decoder scale", "min": 1e-6, "max": 10.0, "step": 0.001,
        "help": "Multiplies every field head's output; 0.0159 in the original, where it kept "
        "the heads from dominating the base head."})
    w_reconstruction: float = field(default=1.0, metadata={
        "label": "Weight: reconstruction", "min": 0.0, "max": 100.0,
        "help": "Squared error of the cells decoded in their own contexts."})
    w_cycle: float = field(default=1.0, metadata={
        "label": "Weight: cycle", "min": 0.0, "max": 100.0,
        "help": "Squared error of the cells after source → target → source."})
    w_integration: float = field(default=1.0, metadata={
        "label": "Weight: integration", "min": 0.0, "max": 100.0,
        "help": "Each head's hidden state before vs after the context change."})
    w_target: float = field(default=0.1, metadata={
        "label": "Weight: target consistency", "min": 0.0, "max": 100.0,
        "help": "Classifier cross-entropy of the decoded cells against their target contexts."})
    w_classifier: float = field(default=1.0, metadata={
        "label": "Weight: classifier", "min": 0.0, "max": 100.0,
        "help": "The metadata classifier's supervised loss on real cells."})
    w_means: float = field(default=10.0, metadata={
        "label": "Weight: target means", "min": 0.0, "max": 1000.0,
        "help": "Squared error between the mean of the cells decoded into a combination of "
        "contexts and the mean of the real training cells of that combination (those with at "
        "least 5 cells). Without it the size of a counterfactual change is not pinned down: "
        "the classifier is satisfied by a partial change (on Kang, 0.6-0.7 of the real "
        "stimulation effect). Off under DP-SGD."})
    interaction_field: str = field(default="auto", metadata={
        "label": "Interacting field",
        "help": "This field's head also scales, per gene and per value, the rest of the "
        "cell's decoded expression (the base and the other heads), so its effect can depend "
        "on the cell's baseline (e.g. stimulation moves a gene differently in a cell type that "
        "expresses it highly). "
        "auto: the condition column when it is a field, else the first field; none: off."})
    balance_contexts: bool = field(default=True, metadata={
        "label": "Balance contexts",
        "help": "Weight each cell's loss by 1 / the number of training cells in its "
        "combination of contexts, so rare cell types and conditions count as much as "
        "common ones."})
    counterfactual_mode: str = field(default="decoded", metadata={
        "label": "Counterfactual expression", "choices": ("decoded", "residual"),
        "help": "decoded: the model's output in the new contexts; residual: the cell plus the "
        "model's change (keeps detail the autoencoder does not reconstruct). Measured on "
        "Kang, decoded is closer to real held-out cells."})
    target_sum: float = field(default=1e4, metadata={
        "label": "Normalised library size", "min": 1.0, "max": 1e7,
        "help": "Counts are scaled to this total per cell, then log1p."})
    max_reference_cells: int = field(default=20000, metadata={
        "label": "Reference cells kept", "min": 100, "max": 2_000_000,
        "help": "Training cells kept with the model to decode in new contexts (sampling)."})
    chunk_size: int = field(default=8192, metadata={
        "label": "Cells per chunk read", "min": 256, "max": 1_000_000,
        "help": "Large data is read in chunks of this many cells, prefetched in the "
        "background; small data stays in memory."})
    device: str = field(default="auto", metadata={
        "label": "Device", "choices": DEVICE_CHOICES,
        "help": "auto: CUDA when present, else the CPU."})
    seed: int = field(default=0, metadata={"label": "Seed", "min": 0})
    condition_key: str = field(default="", metadata={"label": "Condition column"})
    cell_type_key: str = field(default="", metadata={"label": "Cell-type column"})
    donor_key: str = field(default="", metadata={"label": "Donor column"})
    # The DP-SGD settings sit in the training form: the Privacy page sets DP-NMF's stages.
    dp: str = field(default="none", metadata={
        "label": "Differential privacy", "choices": DP_CHOICES,
        "help": "dp-sgd: per-cell (or per-donor) clipped gradients with Gaussian noise."})
    epsilon: float = field(default=8.0, metadata={
        "label": "ε (DP-SGD)", "min": 0.05, "max": 100.0, "step": 0.1,
        "help": "Total ε of the training; the noise is calibrated to it."})
    delta: float = field(default=0.0, metadata={
        "label": "δ", "min": 0.0, "max": 1e-2, "step": 1e-6,
        "help": "0: 1 / (10 · number of privacy units)."})
    max_cells_per_unit: int = field(default=20, metadata={
        "label": "Cells per donor (cap)", "min": 1, "max": 100000,
        "help": "With a donor column, each donor's gradient sums at most this many of its "
        "cells (chosen at random) before clipping."})
    max_grad_norm: float = field(default=1.0, metadata={
        "label": "Gradient clip (L2)", "min": 1e-4, "max": 100.0,
        "help": "Each unit's gradient is clipped to this L2 norm before noise."})


# --------------------------------------------------------------------------------- the module
def _torch() -> Any:
    import torch

    return torch


@functools.cache
def _module_class() -> type:
    """Define the torch modules lazily, so importing the registry does not import torch."""
    torch = _torch()
    nn = torch.nn

    class TiedBase(nn.Module):
        """The base head: h = x Wᵀ, x̂ = h W with one non-negative W; returns [h, x̂] as one
        tensor (one output, so DP-SGD can take its per-cell gradients)."""

        def __init__(self, n_genes: int, latent: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(latent, n_genes) / math.sqrt(n_genes))

        def forward(self, x: Any) -> Any:
            hidden = x @ self.weight.T
            return torch.cat([hidden, hidden @ self.weight], dim=1)

    class ContextMaps(nn.Module):
        """A pool of feed-forward maps (latent → latent), one per value of a field."""

        def __init__(self, n_contexts: int, latent: int, hidden: int) -> None:
            super().__init__()
            self.maps = nn.ModuleList(
                nn.Sequential(nn.Linear(latent, hidden), nn.ELU(), nn.Linear(hidden, latent))
                for _ in range(n_contexts)
            )
            self.calls = [0] * n_contexts  # cells each map has seen (the grouping tests)
            # DP-SGD needs every layer to see the whole batch for per-cell gradients: there
            # each map runs on all cells and a mask keeps each cell's own map's output.
            self.masked = False

        def forward(self, z: Any, codes: Any) -> Any:
            if self.masked:
                out = torch.zeros_like(z)
                for context, layer in enumerate(self.maps):
                    mask = (codes == context).to(z.dtype).unsqueeze(1)
                    out = out + mask * layer(z)
                return out
            # Group the batch by context, run only the maps needed, reassemble in order.
            out = torch.zeros_like(z)
            for context in torch.unique(codes).tolist():
                rows = torch.nonzero(codes == context, as_tuple=True)[0]
                self.calls[context] += int(rows.numel())
                out = out.index_copy(0, rows, self.maps[context](z.index_select(0, rows)))
            return out

    class FieldHead(nn.Module):
        """Encoder E_f (genes → latent), context maps, untied decoder D_f (latent → genes)."""

        def __init__(self, n_genes: int, n_contexts: int, latent: int, hidden: int) -> None:
            super().__init__()
            self.encoder = nn.Linear(n_genes, latent)
            self.maps = ContextMaps(n_contexts, latent, hidden)
            self.decoder = nn.Linear(latent, n_genes)

    class ContextGain(nn.Module):
        """One gain per value and gene: returns ``weight[codes] * others`` (the rest of the
        decoded expression scaled per gene by the cell's value of the interacting field)."""

        def __init__(self, n_contexts: int, n_genes: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(n_contexts, n_genes))

        def forward(self, others: Any, codes: Any) -> Any:
            return self.weight.index_select(0, codes) * others

    class CAEModule(nn.Module):
        """Base tied linear autoencoder plus one additive head per field, and the metadata
        classifier (one output layer per field on a shared trunk). Heads are kept in lists in
        field order, since field names may hold characters a ModuleDict key may not."""

        def __init__(self, n_genes: int, categories: dict[str, list[str]], latent: int,
                     hidden: int, scale: float, interaction_field: str | None = None) -> None:
            super().__init__()
            self.fields = list(categories)
            self.interaction_field = interaction_field if len(categories) > 1 else None
            self.gain = (ContextGain(len(categories[interaction_field]), n_genes)
                         if self.interaction_field else None)
            self.scale = float(scale)
            self.latent = int(latent)
            self.base = TiedBase(n_genes, latent)
            self.heads = nn.ModuleList(
                FieldHead(n_genes, len(cats), latent, hidden) for cats in categories.values())
            self.classifier_trunk = nn.Linear(n_genes, 128)
            self.classifier_out = nn.ModuleList(
                nn.Linear(128, len(cats)) for cats in categories.values())

        @property
        def base_weight(self) -> Any:
            """The base head's non-negative weights W (latent × genes)."""
            return self.base.weight

        def set_masked(self, masked: bool) -> None:
            """Run every context map on the whole batch, masked (for DP-SGD), or grouped."""
            for head in self.heads:
                head.maps.masked = masked

        def head(self, field_name: str) -> Any:
            """Return the head of ``field_name``."""
            return self.heads[self.fields.index(field_name)]

        def forward(self, x: Any, codes: dict[str, Any]) -> tuple[Any, dict[str, Any],
                                                                 dict[str, Any]]:
            """Return (x̂, hidden states by head, each head's additive output by head)."""
            both = self.base(x)
            hidden = {"base": both[:, : self.latent]}
            outputs = {"base": both[:, self.latent:]}
            for f, head in zip(self.fields, self.heads, strict=True):
                z = head.encoder(x)
                hidden[f] = z
                outputs[f] = self.scale * head.decoder(head.maps(z, codes[f]))
            if self.gain is not None:
                f = self.interaction_field
                # The gain scales the rest of the cell's expression (base and other heads),
                # the baseline an effect depends on; detached, so the gain trains only itself
                # and the other heads keep their meaning (what their field adds).
                others = sum(out.detach() for g, out in outputs.items() if g != f)
                outputs[f] = outputs[f] + self.gain(others, codes[f])
            x_hat = sum(outputs.values())
            return x_hat, hidden, outputs

        def classify(self, x: Any, *, frozen: bool = False) -> dict[str, Any]:
            """Return logits per field; ``frozen`` uses detached weights, so the loss on these
            logits trains what produced ``x`` but not the classifier."""
            if not frozen:  # through the modules, so DP-SGD sees these layers' inputs
                trunk = torch.relu(self.classifier_trunk(x))
                return {f: out(trunk)
                        for f, out in zip(self.fields, self.classifier_out, strict=True)}
            linear = nn.functional.linear
            layer = self.classifier_trunk
            trunk = torch.relu(linear(x, layer.weight.detach(), layer.bias.detach()))
            return {f: linear(trunk, out.weight.detach(), out.bias.detach())
                    for f, out in zip(self.fields, self.classifier_out, strict=True)}

        def project(self) -> None:
            """Keep the base weights non-negative (projected gradient)."""
            with torch.no_grad():
                self.base_weight.clamp_(min=0.0)

    class CAEEnsemble(nn.Module):
        """Members of the same fields and genes used as one model: every output is the mean
        of the members' (each head is additive, so the mean model is additive too). Members
        are trained one by one, each through its own :class:`CAEModule`; this module is for
        using them."""

        def __init__(self, members: Sequence[Any]) -> None:
            super().__init__()
            if not members:
                raise ValueError("an ensemble needs at least one member")
            self.members = nn.ModuleList(members)
            first = members[0]
            self.fields = list(first.fields)
            self.interaction_field = first.interaction_field
            self.latent = first.latent
            self.scale = first.scale

        def __len__(self) -> int:
            return len(self.members)

        def set_masked(self, masked: bool) -> None:
            """Set every member's context maps masked (DP-SGD) or grouped."""
            for member in self.members:
                member.set_masked(masked)

        def project(self) -> None:
            """Keep every member's base weights non-negative."""
            for member in self.members:
                member.project()

        def forward(self, x: Any, codes: dict[str, Any]) -> tuple[Any, dict[str, Any],
                                                                 dict[str, Any]]:
            """Return (mean x̂, hidden states by head, mean additive output by head). The
            members' latent spaces are unrelated, so a head's hidden state is the members'
            states side by side (cells × members·latent), not a mean."""
            results = [member(x, codes) for member in self.members]
            k = float(len(results))
            x_hat = sum(r[0] for r in results) / k
            hidden = {h: torch.cat([r[1][h] for r in results], dim=1) for h in results[0][1]}
            outputs = {h: sum(r[2][h] for r in results) / k for h in results[0][2]}
            return x_hat, hidden, outputs

        def classify(self, x: Any, *, frozen: bool = False) -> dict[str, Any]:
            """Return the members' mean logits per field."""
            logits = [member.classify(x, frozen=frozen) for member in self.members]
            return {f: sum(lg[f] for lg in logits) / float(len(logits)) for f in self.fields}

    CAEModule.TiedBase = TiedBase
    CAEModule.ContextGain = ContextGain
    CAEModule.Ensemble = CAEEnsemble
    return CAEModule


def _tied_base_grad_sample(layer: Any, activations: list[Any], backprops: Any) -> dict[Any, Any]:
    """Per-cell gradients of the tied base head for Opacus: with h = W x and output [h, WᵀW x],
    the gradient of g·output is (g_h + W g_x̂) xᵀ + h g_x̂ᵀ for each cell."""
    torch = _torch()
    x = activations[0].to(backprops.dtype)
    weight = layer.weight
    latent = weight.shape[0]
    g_hidden, g_out = backprops[:, :latent], backprops[:, latent:]
    hidden = x @ weight.T
    per_cell = (torch.einsum("bl,bg->blg", g_hidden + g_out @ weight.T, x)
                + torch.einsum("bl,bg->blg", hidden, g_out))
    return {weight: per_cell}


def _context_gain_grad_sample(layer: Any, activations: list[Any], backprops: Any
                              ) -> dict[Any, Any]:
    """Per-cell gradients of a :class:`ContextGain` for Opacus: cell i's gradient is
    ``g_i * others_i`` in the row of its own value, zero elsewhere."""
    torch = _torch()
    others, codes = activations[0].to(backprops.dtype), activations[1].long()
    per_cell = torch.zeros(backprops.shape[0], *layer.weight.shape, dtype=backprops.dtype,
                           device=backprops.device)
    per_cell[torch.arange(backprops.shape[0], device=backprops.device), codes] = (
        backprops * others)
    return {layer.weight: per_cell}


def cae_module(n_genes: int, categories: dict[str, list[str]], *, latent: int, hidden: int,
               scale: float, interaction_field: str | None = None) -> Any:
    """Return a new :class:`CAEModule` (torch ``nn.Module``) for these genes and fields;
    ``interaction_field`` (one of the fields) gets the per-value gains on the other heads."""
    return _module_class()(n_genes, categories, latent, hidden, scale, interaction_field)


def cae_ensemble(members: Sequence[Any]) -> Any:
    """Return a :class:`CAEEnsemble` (torch ``nn.Module``) whose outputs are the means of
    ``members`` (:class:`CAEModule` of the same genes and fields)."""
    return _module_class().Ensemble(members)


def _set_order(loader: Any, seed: int, epoch: int) -> Any:
    """Point ``loader`` at epoch ``epoch`` of the batch order of ``seed`` (its order is drawn
    from ``(seed, epoch)``) and return it. One loader serves every member with its own order,
    so in-memory cells are not copied once per member."""
    loader.seed = int(seed)
    loader.set_epoch(epoch)
    return loader


def interaction_field(config: CAEConfig, fields: Sequence[str]) -> str | None:
    """Return the field whose head scales the other heads (``config.interaction_field``:
    ``auto`` is the condition column when it is a field, else the first field), or None
    (``none``, or a single field)."""
    wanted = config.interaction_field.strip()
    if wanted.lower() == "none" or len(fields) < 2:
        return None
    if wanted.lower() in ("", "auto"):
        return config.condition_key if config.condition_key in fields else fields[0]
    if wanted not in fields:
        raise UserFacingError(f"The interacting field {wanted!r} is not one of the context "
                              f"fields ({', '.join(fields)}).")
    return wanted


def draw_targets(codes: dict[str, np.ndarray], n_contexts: dict[str, int],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Return a target context per cell for **every** field: a value other than the cell's own
    drawn uniformly (a field with one value keeps it)."""
    targets = {}
    for f, source in codes.items():
        k = n_contexts[f]
        if k < 2:
            targets[f] = source.copy()
            continue
        shift = rng.integers(1, k, size=source.shape[0])
        targets[f] = (source + shift) % k
    return targets


def _context_weights(codes: dict[str, np.ndarray]) -> np.ndarray:
    """Return per-cell weights 1 / (cells in the same combination of contexts), scaled to
    mean 1."""
    joint = np.stack(list(codes.values()), axis=1)
    _, inverse, counts = np.unique(joint, axis=0, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse.ravel()]
    return (weights / weights.mean()).astype(np.float32)


# ------------------------------------------------------------------------------ the data side
def log_normalise(counts: sp.csr_matrix, library: np.ndarray, target_sum: float) -> np.ndarray:
    """Return dense float32 ``log1p(counts / library · target_sum)`` (rows of ``counts``)."""
    scale = (target_sum / np.maximum(library, 1.0)).astype(np.float32)
    dense = counts.toarray().astype(np.float32, copy=False)
    dense *= scale[:, None]
    return np.log1p(dense)


def _field_list(config: CAEConfig, obs_columns: Sequence[str]) -> list[str]:
    names = [s.strip() for s in config.fields.split(",") if s.strip()] if config.fields else [
        c for c in (config.condition_key, config.cell_type_key) if c]
    if not names:
        raise UserFacingError(
            "The cycle autoencoder needs at least one metadata field to condition on: name "
            "the columns under 'Context fields' (e.g. condition, cell_type), or map a condition "
            "or cell-type column on the Data page.")
    missing = [n for n in names if n not in obs_columns]
    if missing:
        raise DataError(
            f"The training cells have no column {', '.join(map(repr, missing))}; the columns "
            f"are: {', '.join(map(str, obs_columns))}.")
    return list(dict.fromkeys(names))


@contextmanager
def numba_single_thread() -> Iterator[None]:
    """Run numba-parallel code (scanpy's statistics) on one thread. After a parallel region
    on two threads, numba's pool kept a thread busy for the rest of the process: the torch
    training that followed in the same process ran 10-30x slower (measured: 40 diffusion
    steps took 24-37 s after scanpy's gene choice, 0.6 s with this)."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def torch_device(wanted: str) -> Any:
    """Return the torch device for a config's ``device`` choice: ``auto`` is CUDA when
    present, else the CPU; ``cuda`` without a GPU gets a sentence."""
    torch = _torch()
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserFacingError("This machine has no CUDA GPU; choose the device 'auto' or 'cpu'.")
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


@contextmanager
def capped_torch_threads() -> Iterator[None]:
    """Run torch on at most half the cores: on this project's two-core machines two torch
    threads next to any other busy process were 4-24x slower per step than one (27 ms vs
    120-640 ms for the CAE; 180 ms vs 7 ms for a small diffusion network)."""
    torch = _torch()
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _select_genes(source: Any, n_genes: int, target_sum: float, *, max_cells: int = 50_000,
                  seed: int = 0) -> np.ndarray:
    """Return the positions of the ``n_genes`` most variable genes (scanpy's ``seurat``
    dispersion ranking on log-normalised counts of at most ``max_cells`` random cells, read
    chunk by chunk); every gene when ``n_genes`` is 0 or not below the number of genes."""
    import scanpy as sc

    n_total = len(source.var_names)
    if n_genes <= 0 or n_genes >= n_total:
        return np.arange(n_total)
    rng = np.random.default_rng(seed)
    keep_share = min(1.0, max_cells / max(1, source.n_obs))
    pieces = []
    for i in range(source.n_chunks):
        batch = source.read_chunk(i)
        rows = np.flatnonzero(rng.random(batch.X.shape[0]) < keep_share)
        pieces.append(sp.csr_matrix(batch.X[rows], dtype=np.float32))
    counts = sp.vstack(pieces).tocsr()
    adata = ad.AnnData(counts)
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    with numba_single_thread():
        table = sc.pp.highly_variable_genes(adata, n_top_genes=n_genes, flavor="seurat",
                                            inplace=False)
    chosen = np.flatnonzero(table["highly_variable"].to_numpy())
    return np.sort(chosen)


# ------------------------------------------------------------------------------- the generator
@register
class CAEGenerator(Generator):
    """Cycle autoencoder with one interpretable additive head per metadata field."""

    name = "cae"
    label = "Cycle autoencoder (counterfactual)"
    description = (
        "Learns how each metadata field (condition, cell type, donor, …) adds to expression, "
        "through one head per field, with cycle-consistent training. Generates counterfactuals: "
        "these cells, but stimulated or of another type. Sampling decodes training cells in "
        "their own or chosen contexts."
    )
    config_class = CAEConfig
    capabilities = Capabilities(conditional=True, counterfactual=True,
                                dp_mechanisms=("dp-sgd",), accelerated=True,
                                streams_from_disk=True)

    def __init__(self, config: CAEConfig | None = None) -> None:
        super().__init__(config)
        self.module: Any = None
        self.gene_names: np.ndarray | None = None
        self.categories: dict[str, list[str]] = {}
        self.history: list[dict[str, float]] = []
        self.reference: ad.AnnData | None = None
        self.n_train_cells = 0
        self.device_used = "cpu"
        self.accountant: Any = None
        self.delta_used = 0.0
        self.unit_name = "cell"
        self._cell_weights: np.ndarray | None = None
        self._target_means: dict[int, Any] = {}

    # ---------------------------------------------------------------- privacy
    @property
    def privacy_label(self) -> str:
        if self.config.dp == "none":
            return "not private"
        spend = self.privacy_spend()
        return (f"weights (ε = {spend.get('epsilon', float('nan')):.2f}, "
                f"δ = {spend.get('delta', 0):.1e}) per {self.unit_name}, one model (DP-SGD "
                "trains no ensemble); cells decoded from training cells are not private")

    @property
    def n_members(self) -> int:
        """The number of trained members whose mean is the model (0 before fitting)."""
        return len(self.module.members) if self.module is not None else 0

    def members_to_train(self) -> int:
        """Return how many members :meth:`fit` trains: ``ensemble_size``, but one under
        DP-SGD (each member would spend the privacy budget again; the accountant counts one
        training)."""
        return 1 if self.config.dp != "none" else max(1, int(self.config.ensemble_size))

    def privacy_spend(self) -> dict[str, Any]:
        if self.accountant is None or not self.accountant.releases:
            return {}
        return {**self.accountant.spend(self.delta_used), "unit": self.unit_name,
                "scope": "model weights only"}

    # ---------------------------------------------------------------- fitting
    def _device(self) -> Any:
        return torch_device(self.config.device)

    def fit(self, train: ad.AnnData | str | Path | None, *,
            progress: Progress = no_progress) -> None:
        """Train on ``train`` (an AnnData, or a path to a large ``.h5ad`` / ``.zarr`` / folder of
        ``.npz`` chunks, read chunk by chunk with background prefetch): sets :attr:`module`
        (an ensemble of :meth:`members_to_train` members), :attr:`history` (one record per
        epoch), the genes, contexts and reference cells, and under DP-SGD the accountant."""
        from engine.data.chunks import TwoLevelLoader, open_chunk_source

        if train is None:
            raise UserFacingError("The cycle autoencoder learns from real cells: choose a "
                                  "split first.")
        cfg = self.config
        in_memory = isinstance(train, ad.AnnData) and not train.isbacked
        # Small data stays in memory as one chunk; files are read chunk by chunk.
        chunk_size = max(1, train.n_obs) if in_memory else cfg.chunk_size
        source = open_chunk_source(train, chunk_size=chunk_size)
        fields = _field_list(cfg, list(source.obs_columns))
        obs = source.obs(fields)
        if obs.isna().any().any():
            bad = [f for f in fields if obs[f].isna().any()]
            raise DataError(f"Some training cells have no value in {', '.join(bad)}; remove "
                            "them or fill the column before training.")
        self.categories = {f: sorted(map(str, pd.unique(obs[f].astype(str)))) for f in fields}
        codes_all = {f: pd.Categorical(obs[f].astype(str), categories=cats).codes
                     .astype(np.int64) for f, cats in self.categories.items()}
        private = cfg.dp != "none"
        self._cell_weights = (_context_weights(codes_all)
                              if cfg.balance_contexts and not private else None)
        progress(0.02, "choosing highly variable genes")
        # Under DP every gene is modelled: choosing variable genes would read private data.
        genes = _select_genes(source, 0 if private else cfg.n_genes, cfg.target_sum,
                              seed=cfg.seed)
        self.gene_names = np.asarray(source.var_names[genes], dtype=object)
        self.n_train_cells = int(source.n_obs)
        device = self._device()
        self.device_used = device.type
        self.module = self._new_members(len(genes), interaction_field(cfg, fields),
                                        self.members_to_train(), device)
        if private and cfg.ensemble_size > 1:
            progress(0.03, f"DP-SGD trains one model, not an ensemble of {cfg.ensemble_size}: "
                     "each further member would spend the privacy budget again")
        loader = TwoLevelLoader(source, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed)
        # Under DP the means would be an unaccounted release of the private cells.
        self._target_means = (self._combination_means(source, codes_all, genes, device)
                              if cfg.w_means > 0 and not private else {})
        with capped_torch_threads():
            if cfg.dp != "none":
                self._fit_dp(source, codes_all, genes, device, progress)
            else:
                self._fit_plain(loader, codes_all, genes, device, progress)
        progress(0.97, "keeping reference cells")
        self.reference = self._reference_cells(source, genes, fields)

    def _new_members(self, n_genes: int, interacting: str | None, size: int, device: Any
                     ) -> Any:
        """Return a :class:`CAEEnsemble` of ``size`` new members on ``device``, member k
        initialised from torch seed ``seed + k`` and projected to non-negative base weights."""
        torch = _torch()
        cfg = self.config
        members = []
        for k in range(size):
            torch.manual_seed(cfg.seed + k)
            members.append(cae_module(n_genes, self.categories, latent=cfg.latent_dim,
                                      hidden=cfg.map_hidden, scale=cfg.metadata_decoder_scale,
                                      interaction_field=interacting))
        ensemble = cae_ensemble(members).to(device)
        ensemble.project()
        return ensemble

    def _batches(self, loader: Any, codes_all: dict[str, np.ndarray], genes: np.ndarray,
                 device: Any) -> Iterator[tuple[Any, dict[str, np.ndarray], np.ndarray | None]]:
        """Yield (log-normalised expression tensor, context codes, per-cell loss weights or
        None) per minibatch of cells with counts."""
        torch = _torch()
        for batch in loader:
            counts = sp.csr_matrix(batch.X)
            library = np.asarray(counts.sum(axis=1)).ravel()
            # Cells without counts (RNA not measured, e.g. ATAC-only cells of a bridge
            # design) carry no expression to learn from.
            measured = library > 0
            if not measured.any():
                continue
            rows = batch.rows[measured]
            x = log_normalise(counts[measured][:, genes], library[measured],
                              self.config.target_sum)
            codes = {f: c[rows] for f, c in codes_all.items()}
            weights = self._cell_weights[rows] if self._cell_weights is not None else None
            yield torch.from_numpy(x).to(device), codes, weights

    def _combination_keys(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        """Return one integer per cell for its combination of contexts (mixed radix)."""
        key = np.zeros(len(next(iter(codes.values()))), dtype=np.int64)
        for f, cats in self.categories.items():
            key = key * len(cats) + codes[f]
        return key

    def _combination_means(self, source: Any, codes_all: dict[str, np.ndarray],
                           genes: np.ndarray, device: Any) -> dict[int, Any]:
        """Return, per combination of contexts with at least ``MIN_MEAN_CELLS`` measured
        training cells, their mean log-normalised expression (a tensor on ``device``), keyed
        by :meth:`_combination_keys`; one pass over the chunks."""
        torch = _torch()
        keys_all = self._combination_keys(codes_all)
        sums: dict[int, np.ndarray] = {}
        counts: dict[int, int] = {}
        for i in range(source.n_chunks):
            batch = source.read_chunk(i)
            matrix = sp.csr_matrix(batch.X)
            library = np.asarray(matrix.sum(axis=1)).ravel()
            measured = library > 0
            x = log_normalise(matrix[measured][:, genes], library[measured],
                              self.config.target_sum)
            keys = keys_all[batch.rows[measured]]
            for key in np.unique(keys).tolist():
                rows = keys == key
                sums[key] = sums.get(key, 0.0) + x[rows].sum(axis=0)
                counts[key] = counts.get(key, 0) + int(rows.sum())
        return {k: torch.as_tensor(sums[k] / counts[k], dtype=torch.float32, device=device)
                for k in sums if counts[k] >= MIN_MEAN_CELLS}

    def losses(self, x: Any, codes: dict[str, np.ndarray], rng: np.random.Generator,
               weights: np.ndarray | None = None, *, module: Any = None) -> dict[str, Any]:
        """Return the loss terms of one minibatch (tensors) for ``module`` (one member;
        default: :attr:`module`): reconstruction, cycle, integration, target consistency,
        classifier (each a mean over cells, weighted by ``weights`` when given) and, when the
        fit kept combination means, target means (the mean over the combinations in the batch
        of the squared error between the weighted mean of the cells decoded into the
        combination and its real mean). Draws the targets from ``rng``."""
        torch = _torch()
        functional = torch.nn.functional
        module = self.module if module is None else module
        device = x.device
        weight = (torch.as_tensor(weights / weights.mean(), dtype=x.dtype, device=device)
                  if weights is not None else torch.ones(x.shape[0], device=device))

        def mse(a: Any, b: Any) -> Any:
            return ((a - b) ** 2).mean(dim=1).mul(weight).mean()

        def cross_entropy(logits: Any, labels: Any) -> Any:
            return functional.cross_entropy(logits, labels, reduction="none").mul(weight).mean()

        n_contexts = {f: len(c) for f, c in self.categories.items()}
        targets = draw_targets(codes, n_contexts, rng)
        source_t = {f: torch.as_tensor(c, device=device) for f, c in codes.items()}
        target_t = {f: torch.as_tensor(c, device=device) for f, c in targets.items()}
        x_rec, hidden_source, _ = module(x, source_t)
        x_target, _, _ = module(x, target_t)                      # cycle 1: source → target
        x_back, hidden_target, _ = module(x_target, source_t)     # cycle 2: target → source
        integration = sum(mse(hidden_target[k], hidden_source[k]) for k in hidden_source)
        logits_target = module.classify(x_target, frozen=True)
        logits_real = module.classify(x)
        target = sum(cross_entropy(logits_target[f], target_t[f]) for f in module.fields)
        classifier = sum(cross_entropy(logits_real[f], source_t[f]) for f in module.fields)
        terms = {}
        if self._target_means:
            keys = self._combination_keys(targets)
            gaps = []
            for key in np.unique(keys).tolist():
                if key not in self._target_means:
                    continue  # a combination without (enough) real cells has no mean to match
                rows = torch.as_tensor(np.flatnonzero(keys == key), device=device)
                w = weight.index_select(0, rows)
                mean = (x_target.index_select(0, rows) * w[:, None]).sum(0) / w.sum()
                gaps.append(((mean - self._target_means[key]) ** 2).mean())
            terms["means"] = torch.stack(gaps).mean() if gaps else x.sum() * 0.0
        return {
            **terms,
            "reconstruction": mse(x_rec, x),
            "cycle": mse(x_back, x),
            "integration": integration,
            "target": target,
            "classifier": classifier,
        }

    def _total(self, terms: dict[str, Any]) -> Any:
        cfg = self.config
        return (cfg.w_reconstruction * terms["reconstruction"] + cfg.w_cycle * terms["cycle"]
                + cfg.w_integration * terms["integration"] + cfg.w_target * terms["target"]
                + cfg.w_classifier * terms["classifier"]
                + cfg.w_means * terms.get("means", 0.0))

    def _fit_plain(self, loader: Any, codes_all: dict[str, np.ndarray], genes: np.ndarray,
                   device: Any, progress: Progress) -> None:
        """Train every member of :attr:`module`, member k with its own Adam, target draws
        (``default_rng(seed + k)``) and batch order (loader seed ``seed + k``). Members take
        turns epoch by epoch, so each epoch's record in :attr:`history` is the ensemble's at
        that epoch: the loss terms are the members' mean, the head norms those of the mean
        model's head outputs. A member's training does not depend on the others'."""
        torch = _torch()
        cfg = self.config
        members = list(self.module.members)
        size = len(members)
        optimizers = [torch.optim.Adam(m.parameters(), lr=cfg.learning_rate) for m in members]
        rngs = [np.random.default_rng(cfg.seed + k) for k in range(size)]
        self.history = []
        started = time.time()
        for epoch in range(cfg.epochs):
            sums: dict[str, float] = {}
            for k, (member, optimizer, rng) in enumerate(zip(members, optimizers, rngs,
                                                             strict=True)):
                member_sums: dict[str, float] = {}
                n_batches = 0
                member.train()
                for x, codes, weights in self._batches(_set_order(loader, cfg.seed + k, epoch),
                                                       codes_all, genes, device):
                    terms = self.losses(x, codes, rng, weights, module=member)
                    loss = self._total(terms)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    member.project()
                    for name, value in terms.items():
                        member_sums[name] = member_sums.get(name, 0.0) + float(value.detach())
                    member_sums["loss"] = member_sums.get("loss", 0.0) + float(loss.detach())
                    n_batches += 1
                for name, value in member_sums.items():
                    sums[name] = sums.get(name, 0.0) + value / max(1, n_batches) / size
                if size > 1:
                    progress(0.05 + 0.9 * (epoch * size + k + 1) / (cfg.epochs * size),
                             f"epoch {epoch + 1}/{cfg.epochs}, member {k + 1}/{size}: loss "
                             f"{member_sums.get('loss', 0.0) / max(1, n_batches):.4f}")
            record = {"epoch": epoch + 1, **sums,
                      **self._head_norms(loader, codes_all, genes, device),
                      "seconds": round(time.time() - started, 3)}
            self.history.append(record)
            what = f" (mean of {size} members)" if size > 1 else ""
            progress(0.05 + 0.9 * (epoch + 1) / cfg.epochs,
                     f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}{what}",
                     metrics={name: float(v) for name, v in record.items() if name != "seconds"})

    def _head_norms(self, loader: Any, codes_all: dict[str, np.ndarray], genes: np.ndarray,
                    device: Any, max_cells: int = 512) -> dict[str, float]:
        """Return the mean L2 norm, over up to ``max_cells`` cells, of each head's output in
        the mean model (``norm_<head>``): how much each field adds to the cells' expression.
        The same cells every epoch (the first of one fixed order), so the curves show the
        model changing, not the cells."""
        torch = _torch()
        totals: dict[str, float] = {}
        seen = 0
        self.module.eval()
        with torch.no_grad():
            for x, codes, _ in self._batches(_set_order(loader, self.config.seed, 0),
                                             codes_all, genes, device):
                source_t = {f: torch.as_tensor(c, device=device) for f, c in codes.items()}
                _, _, outputs = self.module(x, source_t)
                for head, out in outputs.items():
                    totals[head] = totals.get(head, 0.0) + float(out.norm(dim=1).sum())
                seen += x.shape[0]
                if seen >= max_cells:
                    break
        self.module.train()
        return {f"norm_{head}": total / max(1, seen) for head, total in totals.items()}

    def _fit_dp(self, source: Any, codes_all: dict[str, np.ndarray], genes: np.ndarray,
                device: Any, progress: Progress) -> None:
        """DP-SGD: per step, each privacy unit (donor, or cell) joins the batch with
        probability q (Poisson sampling); Opacus gives per-cell gradients of the summed loss;
        a unit's gradient (the sum over its at most ``max_cells_per_unit`` cells) is clipped
        to ``max_grad_norm``; Gaussian noise of std σ·clip is added to the sum, which is
        divided by the expected number of units; Adam steps on that (post-processing). σ is
        calibrated so the accountant's total over all steps is the configured ε at δ.

        The cells are held in memory (restricted to the model's genes). Nothing else is read
        from the private data: every gene is modelled, contexts are not re-weighted, and no
        per-epoch loss or head norm is recorded (each would be an unaccounted release)."""
        from opacus import GradSampleModule
        from opacus.grad_sample import register_grad_sampler

        from engine.privacy.accountant import Accountant, default_delta
        from engine.privacy.dp_sgd import cells_by_unit, draw_step, noisy_gradients, plan_dp_sgd

        torch = _torch()
        cfg = self.config
        module = self.module.members[0]  # one member: see members_to_train
        register_grad_sampler(module.TiedBase)(_tied_base_grad_sample)
        register_grad_sampler(module.ContextGain)(_context_gain_grad_sample)
        rng = np.random.default_rng(cfg.seed)
        if cfg.donor_key:
            donors = source.obs([cfg.donor_key])[cfg.donor_key].astype(str).to_numpy()
            unit_of_cell = pd.factorize(donors)[0]
            self.unit_name = f"donor ({cfg.donor_key})"
            cap = cfg.max_cells_per_unit
        else:
            unit_of_cell = np.arange(source.n_obs)
            self.unit_name = "cell"
            cap = 1
        keep = np.zeros(source.n_obs, dtype=bool)
        for unit_cells in pd.Series(np.arange(source.n_obs)).groupby(unit_of_cell).indices \
                .values():
            keep[rng.permutation(unit_cells)[:cap]] = True
        pieces = []
        for i in range(source.n_chunks):
            batch = source.read_chunk(i)
            library = np.asarray(batch.X.sum(axis=1)).ravel()
            keep[batch.rows[library <= 0]] = False  # no counts: nothing to learn from
            rows = np.flatnonzero(keep[batch.rows])
            counts = batch.X[rows]
            pieces.append(log_normalise(counts[:, genes], library[rows], cfg.target_sum))
        x_all = np.concatenate(pieces)
        kept = np.flatnonzero(keep)
        units = pd.factorize(unit_of_cell[kept])[0]
        codes_kept = {f: c[kept] for f, c in codes_all.items()}
        self.delta_used = cfg.delta or default_delta(int(units.max()) + 1)
        plan = plan_dp_sgd(kept=kept, units=units, unit_name=self.unit_name,
                           batch_size=cfg.batch_size, epochs=cfg.epochs, epsilon=cfg.epsilon,
                           delta=self.delta_used)
        self.accountant = Accountant()
        self.accountant.gaussian("dp-sgd", noise_multiplier=plan.sigma, count=plan.steps,
                                 sampling_rate=plan.rate)
        module.set_masked(True)
        wrapped = GradSampleModule(module, batch_first=True, loss_reduction="sum")
        optimizer = torch.optim.Adam(module.parameters(), lr=cfg.learning_rate)
        params = [p for p in module.parameters() if p.requires_grad]
        members = cells_by_unit(plan)
        self.history = []
        started = time.time()

        def summed_loss(rows: np.ndarray) -> Any:
            x = torch.from_numpy(x_all[rows]).to(device)
            codes = {f: c[rows] for f, c in codes_kept.items()}
            return self._total(self.losses(x, codes, rng, module=module)) * x.shape[0]

        try:
            for step in range(plan.steps):
                rows = draw_step(plan, members, rng)
                noisy_gradients(wrapped, params, plan, rows, summed_loss,
                                clip=cfg.max_grad_norm, device=device)
                optimizer.step()
                module.project()
                if (step + 1) % max(1, plan.steps // 50) == 0 or step + 1 == plan.steps:
                    epoch = (step + 1) * plan.rate
                    self.history.append({"epoch": round(epoch, 3),
                                         "seconds": round(time.time() - started, 3)})
                    progress(0.05 + 0.9 * (step + 1) / plan.steps,
                             f"DP-SGD step {step + 1}/{plan.steps} (σ = {plan.sigma:.2f})")
        finally:
            wrapped._close()
            module.set_masked(False)

    def _reference_cells(self, source: Any, genes: np.ndarray, fields: list[str]) -> ad.AnnData:
        """Return up to ``max_reference_cells`` random training cells (counts of the model's
        genes, their total library size in ``obs['library_size']`` and their contexts)."""
        rng = np.random.default_rng(self.config.seed + 1)
        keep_share = min(1.0, self.config.max_reference_cells / max(1, source.n_obs))
        pieces, frames = [], []
        for i in range(source.n_chunks):
            batch = source.read_chunk(i, columns=fields)
            measured = np.asarray(batch.X.sum(axis=1)).ravel() > 0
            rows = np.flatnonzero((rng.random(batch.X.shape[0]) < keep_share) & measured)
            counts = sp.csr_matrix(batch.X[rows])
            frame = batch.obs.iloc[rows].copy()
            frame["library_size"] = np.asarray(counts.sum(axis=1)).ravel()
            pieces.append(counts[:, genes].astype(np.float32))
            frames.append(frame)
        obs = pd.concat(frames)
        for f in fields:
            obs[f] = pd.Categorical(obs[f].astype(str), categories=self.categories[f])
        obs.index = obs.index.astype(str)
        return ad.AnnData(sp.vstack(pieces).tocsr(), obs=obs,
                          var=pd.DataFrame(index=[str(g) for g in self.gene_names]))

    # ------------------------------------------------------------- decoding
    def _require_fit(self) -> None:
        if self.module is None or self.gene_names is None:
            raise UserFacingError("Train the cycle autoencoder before using it.")

    def codes_for(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Return integer context codes per field for the rows of ``frame``; a value the model
        never saw gives a sentence naming the field and the known values."""
        codes = {}
        for f, cats in self.categories.items():
            if f not in frame:
                raise UserFacingError(f"Say which {f} the cells are in (column {f!r}).")
            values = frame[f].astype(str).to_numpy()
            unknown = sorted(set(values) - set(cats))
            if unknown:
                raise UserFacingError(
                    f"The model never saw {f} = {', '.join(unknown)}; known values: "
                    f"{', '.join(cats)}.")
            codes[f] = pd.Categorical(values, categories=cats).codes.astype(np.int64)
        return codes

    def cell_matrix(self, cells: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
        """Return (log-normalised expression of the model's genes, library sizes) of
        ``cells``; library sizes from ``obs['library_size']`` when present (reference cells)
        else from all of the cells' genes."""
        self._require_fit()
        counts = cells.X if sp.issparse(cells.X) else sp.csr_matrix(cells.X)
        counts = sp.csr_matrix(counts, dtype=np.float32)
        if "library_size" in cells.obs:
            library = cells.obs["library_size"].to_numpy(dtype=np.float64)
        else:
            library = np.asarray(counts.sum(axis=1)).ravel()
        position = pd.Index(cells.var_names.astype(str)).get_indexer(
            [str(g) for g in self.gene_names])
        if (position < 0).any():
            missing = int((position < 0).sum())
            raise DataError(f"{missing} of the model's {len(self.gene_names)} genes are not in "
                            "these cells; use cells of the same gene set as the training data.")
        return log_normalise(counts[:, position], library, self.config.target_sum), library

    def decode(self, x: np.ndarray, codes: dict[str, np.ndarray], *, batch_size: int = 4096,
               member: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Return (x̂, each head's additive output) for log-normalised ``x`` in ``codes``,
        as float32 arrays (cells × genes): the members' means, or member ``member``'s own
        (to see the spread between members)."""
        self._require_fit()
        torch = _torch()
        module = self.module if member is None else self.module.members[member]
        device = next(module.parameters()).device
        module.eval()
        pieces: list[np.ndarray] = []
        heads: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                stop = start + batch_size
                xb = torch.from_numpy(np.ascontiguousarray(x[start:stop])).to(device)
                cb = {f: torch.as_tensor(c[start:stop], device=device) for f, c in codes.items()}
                x_hat, _, outputs = module(xb, cb)
                pieces.append(x_hat.cpu().numpy())
                for head, out in outputs.items():
                    heads.setdefault(head, []).append(out.cpu().numpy())
        return (np.concatenate(pieces) if pieces else np.zeros((0, len(self.gene_names)),
                                                                np.float32),
                {h: np.concatenate(v) for h, v in heads.items()})

    def counterfactual_expression(self, cells: ad.AnnData, changes: dict[str, str] | None
                                  = None, *, contexts: pd.DataFrame | None = None
                                  ) -> dict[str, Any]:
        """Predict ``cells`` in new contexts: ``changes`` sets fields to one value for every
        cell (``{"condition": "stim"}``), or ``contexts`` gives a value per cell.

        Returns log-normalised arrays ``source`` (the cells as observed), ``reconstructed``
        (decoded in their own contexts), ``decoded`` (decoded in the new contexts),
        ``predicted`` (``decoded``, or with ``counterfactual_mode="residual"`` the cells plus
        the model's change from their own to the new contexts; clipped at 0), the heads'
        outputs before and after, the library sizes, and the source and target context
        frames."""
        source_frame = cells.obs[list(self.categories)].astype(str).reset_index(drop=True)
        target_frame = source_frame.copy()
        for f, value in (changes or {}).items():
            if f not in self.categories:
                raise UserFacingError(f"The model has no field {f!r}; its fields are "
                                      f"{', '.join(self.categories)}.")
            target_frame[f] = str(value)
        if contexts is not None:
            for f in contexts.columns:
                if f in self.categories:
                    target_frame[f] = contexts[f].astype(str).to_numpy()
        x, library = self.cell_matrix(cells)
        reconstructed, heads_source = self.decode(x, self.codes_for(source_frame))
        decoded, heads_target = self.decode(x, self.codes_for(target_frame))
        if self.config.counterfactual_mode == "residual":
            predicted = np.maximum(x + decoded - reconstructed, 0.0)
        else:
            predicted = np.maximum(decoded, 0.0)
        return {"source": x, "reconstructed": reconstructed, "decoded": decoded,
                "predicted": predicted, "heads_source": heads_source,
                "heads_target": heads_target, "library": library,
                "source_contexts": source_frame, "target_contexts": target_frame}

    def to_counts(self, expression: np.ndarray, library: np.ndarray, seed: int) -> sp.csr_matrix:
        """Return Poisson counts around ``expm1(expression) · library / target_sum``."""
        rng = np.random.default_rng(seed)
        mean = np.expm1(np.maximum(expression, 0.0)) * (library / self.config.target_sum)[:, None]
        return sp.csr_matrix(rng.poisson(mean).astype(np.float32))

    def counterfactual(self, cells: ad.AnnData, changes: dict[str, str], *, seed: int = 0
                       ) -> ad.AnnData:
        """Return the counterfactual cells as AnnData: Poisson counts in ``X``, the predicted
        log-normalised expression in ``layers['predicted']``, the new contexts in ``obs``
        (the old ones as ``source_<field>``), and the model's provenance in ``uns``."""
        result = self.counterfactual_expression(cells, changes)
        obs = result["target_contexts"].copy()
        for f in self.categories:
            obs[f"source_{f}"] = result["source_contexts"][f].to_numpy()
        obs.index = [f"{name}_cf" for name in cells.obs_names.astype(str)]
        out = ad.AnnData(self.to_counts(result["predicted"], result["library"], seed), obs=obs,
                         var=pd.DataFrame(index=[str(g) for g in self.gene_names]))
        out.layers["predicted"] = result["predicted"].astype(np.float32)
        out.uns["counterfactual"] = {"changes": json.dumps(changes), "seed": int(seed),
                                     "privacy_label": "not private (decoded real cells)"}
        return out

    def sample(self, n: int | None = None, *, contexts: pd.DataFrame | None = None,
               seed: int = 0, progress: Progress = no_progress) -> ad.AnnData:
        """Decode ``n`` random reference (training) cells, in their own contexts or in the
        ones ``contexts`` gives (one row, or one per cell; columns are field names)."""
        self._require_fit()
        reference = self.reference
        n = self.n_train_cells if n is None else int(n)
        if contexts is not None and len(contexts) not in (1, n):
            raise UserFacingError("Give one row of contexts, or one per synthetic cell.")
        rng = np.random.default_rng(seed)
        rows = rng.choice(reference.n_obs, size=n, replace=n > reference.n_obs)
        cells = reference[np.sort(rows)]
        table = None
        if contexts is not None:
            table = contexts if len(contexts) == n else pd.concat([contexts] * n,
                                                                  ignore_index=True)
        chunks, frames = [], []
        step = 8192
        for start in range(0, n, step):
            part = cells[start:start + step]
            part_contexts = table.iloc[start:start + step].reset_index(drop=True) \
                if table is not None else None
            result = self.counterfactual_expression(part, contexts=part_contexts)
            chunks.append(self.to_counts(result["predicted"], result["library"],
                                         seed + start))
            frames.append(result["target_contexts"])
            progress(min(1.0, (start + step) / max(1, n)), f"decoded {min(n, start + step)} "
                     "cells")
        obs = pd.concat(frames, ignore_index=True)
        obs.index = [f"synthetic_{i}" for i in range(n)]
        out = ad.AnnData(sp.vstack(chunks).tocsr(), obs=obs,
                         var=pd.DataFrame(index=[str(g) for g in self.gene_names]))
        out.uns["privacy"] = {"label": self.privacy_label}
        return out

    # --------------------------------------------------------- interpretability
    def head_contributions(self, cells: ad.AnnData, field_name: str) -> pd.DataFrame:
        """Return genes × values of ``field_name``: the mean additive output of that field's
        head over ``cells`` when every cell is put in each value (other fields as observed)."""
        self._require_fit()
        if field_name not in self.categories:
            raise UserFacingError(f"The model has no field {field_name!r}.")
        x, _ = self.cell_matrix(cells)
        frame = cells.obs[list(self.categories)].astype(str).reset_index(drop=True)
        columns = {}
        for value in self.categories[field_name]:
            frame[field_name] = value
            _, heads = self.decode(x, self.codes_for(frame))
            columns[value] = heads[field_name].mean(axis=0)
        return pd.DataFrame(columns, index=[str(g) for g in self.gene_names])

    def history_frame(self) -> pd.DataFrame:
        """Return the per-epoch losses and head norms as a table."""
        return pd.DataFrame(self.history)

    # ------------------------------------------------------------------- state
    def _state(self, folder: Path) -> None:
        """Write ``weights.npz`` (every member's tensors, keyed ``members.<k>.<name>``),
        ``state.json`` and ``reference.h5ad`` into ``folder``."""
        self._require_fit()
        arrays = {k: v.detach().cpu().numpy() for k, v in self.module.state_dict().items()}
        np.savez(folder / "weights.npz", **arrays)
        state = {"gene_names": [str(g) for g in self.gene_names], "categories": self.categories,
                 "history": self.history, "n_train_cells": self.n_train_cells,
                 "device": self.device_used, "unit": self.unit_name, "delta": self.delta_used,
                 "interaction_field": self.module.interaction_field,
                 "ensemble_size": self.n_members,
                 "releases": ([r.__dict__ for r in self.accountant.releases]
                              if self.accountant is not None else []),
                 "method": self.accountant.method if self.accountant is not None else "pld"}
        (folder / "state.json").write_text(json.dumps(state))
        self.reference.write_h5ad(folder / "reference.h5ad", compression="gzip")

    def _restore(self, folder: Path) -> None:
        """Read what :meth:`_state` wrote. A model saved before ensembles (one module's
        tensors, no ``ensemble_size``) loads as a one-member ensemble."""
        torch = _torch()
        from engine.privacy.accountant import Accountant

        state = json.loads((folder / "state.json").read_text())
        self.gene_names = np.asarray(state["gene_names"], dtype=object)
        self.categories = {f: list(v) for f, v in state["categories"].items()}
        self.history = list(state["history"])
        self.n_train_cells = int(state["n_train_cells"])
        self.unit_name = state.get("unit", "cell")
        self.delta_used = float(state.get("delta", 0.0))
        cfg = self.config
        with np.load(folder / "weights.npz", allow_pickle=False) as data:
            weights = {k: torch.from_numpy(data[k]) for k in data.files}
        if not any(k.startswith("members.") for k in weights):  # saved before ensembles
            weights = {f"members.0.{k}": v for k, v in weights.items()}
        members = [cae_module(len(self.gene_names), self.categories, latent=cfg.latent_dim,
                              hidden=cfg.map_hidden, scale=cfg.metadata_decoder_scale,
                              interaction_field=state.get("interaction_field"))
                   for _ in range(int(state.get("ensemble_size", 1)))]
        self.module = cae_ensemble(members)
        self.module.load_state_dict(weights)
        device = self._device() if cfg.device != "cuda" else torch.device("cpu")
        self.module.to(device)
        self.device_used = device.type
        if state.get("releases"):
            self.accountant = Accountant.from_releases(state["releases"],
                                                       method=state.get("method", "pld"))
        self.reference = ad.read_h5ad(folder / "reference.h5ad")
