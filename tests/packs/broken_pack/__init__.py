"""Fails to import: it needs a package that is not installed."""

import loom_test_package_that_is_not_installed  # noqa: F401

NODE_CLASS_MAPPINGS = {}
