"""Models: students and teachers assembled from :mod:`occdistill.nn` blocks; outputs are typed."""
