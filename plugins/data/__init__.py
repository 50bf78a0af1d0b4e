"""Built-in data sources: digits (scikit-learn's bundled set), npz files, synthetic Gaussians."""
