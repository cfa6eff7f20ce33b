"""Tests of the ``bundles`` package."""
