# Semantic FPN, DAT-B++ (128..1024 channels), ADE20K 40k at batch 32: the
# DAT-T++ recipe with drop path 0.7 (LeapLabTHU/DAT-Segmentation
# configs/dat/fpn_base_80k_dp07_lr2.py).
_base_ = './fpn_datpp-t_8xb4-40k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        arch='datpp-b', drop_path_rate=0.7, init_cfg=dict(checkpoint='checkpoints/datpp-b_in1k_converted.pth')
    ),
    neck=dict(in_channels=[128, 256, 512, 1024]),
)
