# Semantic FPN, DAT-B (v1, 128..1024 channels), ADE20K 40k at batch 32: the
# DAT-T recipe with drop path 0.7.
_base_ = './fpn_dat-t_8xb4-40k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='dat-b', drop_path_rate=0.7, init_cfg=dict(checkpoint='checkpoints/dat-b_in1k_converted.pth')),
    neck=dict(in_channels=[128, 256, 512, 1024]),
)
