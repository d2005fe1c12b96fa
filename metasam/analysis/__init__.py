"""Sharpness diagnostics: Hessian eigenvalues, loss landscapes, gradient alignment and training curves."""

from metasam.analysis.alignment import gradient_cosine
from metasam.analysis.curves import plot_alignment, plot_runs, read_metrics
from metasam.analysis.hessian import hessian_eigenvalues, hessian_vector_product, model_loss_fn
from metasam.analysis.landscape import filter_normalized_direction, loss_landscape, plot_landscape
from metasam.analysis.meta_loss import meta_loss_fn

__all__ = [
    "filter_normalized_direction",
    "gradient_cosine",
    "hessian_eigenvalues",
    "hessian_vector_product",
    "loss_landscape",
    "meta_loss_fn",
    "model_loss_fn",
    "plot_alignment",
    "plot_landscape",
    "plot_runs",
    "read_metrics",
]
