"""Keypoint-guided masked-autoencoder pre-training (METHOD.md §4)."""
