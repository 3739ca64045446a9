"""``occdistill <command>``: thin argument parsing over the library layers."""
