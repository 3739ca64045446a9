"""Data layer: class tables, dataset readers, the Sample/Batch contract, augmentation, synthetic world."""
