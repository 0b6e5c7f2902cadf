"""Privacy: empirical membership-inference audits of synthetic data."""
