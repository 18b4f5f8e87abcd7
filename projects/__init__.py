"""Namespace for the OpenMMLab-style projects of this repository."""
