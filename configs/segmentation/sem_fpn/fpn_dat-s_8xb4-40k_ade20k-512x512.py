# Semantic FPN, DAT-S (v1, 96..768 channels), ADE20K 40k at batch 32: the
# DAT-T recipe, drop path 0.4.
_base_ = './fpn_dat-t_8xb4-40k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='dat-s', drop_path_rate=0.4, init_cfg=dict(checkpoint='checkpoints/dat-s_in1k_converted.pth'))
)
