"""Test and benchmark support, kept out of the product packages: small run and ensemble directories, a
server on a free port (testkit.artifacts), synthetic member predictions (testkit.synthetic).

Not installed with the product; tests and scripts import it from the repository root.
"""
