"""Clustering on device: spherical k-means with rows split over devices (`kmeans`)."""

from ssl_jax.clustering.kmeans import (KMeansResult, initial_indices, own_rows,
                                       spherical_kmeans, spherical_kmeans_replicated)

__all__ = ['KMeansResult', 'initial_indices', 'own_rows', 'spherical_kmeans',
           'spherical_kmeans_replicated']
