"""Sampling: the flow-matching sampler shared by every architecture family."""
