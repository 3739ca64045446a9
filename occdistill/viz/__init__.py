"""Visual checks: GT voxels projected over camera images, and BEV label maps."""
