# Semantic FPN, DAT-S++ (96..768 channels), ADE20K 40k at batch 32: the
# DAT-T++ recipe, drop path 0.4 (LeapLabTHU/DAT-Segmentation
# configs/dat/fpn_small_80k_dp04_lr2.py).
_base_ = './fpn_datpp-t_8xb4-40k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        arch='datpp-s', drop_path_rate=0.4, init_cfg=dict(checkpoint='checkpoints/datpp-s_in1k_converted.pth')
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
