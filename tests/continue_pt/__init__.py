"""Tests of the ``continue_pt`` package."""
