"""The dense distillation recipe of the distillation benchmark's headline variant (``both``: MFD +
CWD, declared in benchmarks/bench_kd_ablation.py before its runs), as training-config overrides,
shared by that benchmark and the main job so that both distil the same way.

MFD (PKD-normalised) on GT-occupied BEV cells dilated by 1; CWD on per-voxel log-probabilities at
tau 1 over camera-visible voxels; no Hinton KD. What varies per use stays with the caller: the MFD
target (a dense teacher's BEV feature, or a Gaussian teacher's BEV probabilities), the dump source
(compact or seed fp16) and the two loss weights.
"""

MFD_CWD_COMMON: tuple[str, ...] = (
    "distill.dense.mfd_normalize=true", "distill.dense.mfd_dilation=1",
    "distill.dense.tau_cwd=1.0", "distill.dense.cwd_space=log_prob", "distill.dense.camera_mask=true",
    "distill.dense.lambda_kd=0",
)
