"""Tools for the test suite that also help a user debugging on a machine without a GPU."""
