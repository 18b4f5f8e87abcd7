# Semantic FPN, DAT-T (v1, 96..768 channels), ADE20K, 512x512 crops, 40k
# iterations at batch 32: the DAT++ Semantic FPN recipe (PVT's 80k schedule
# run at batch 32: lr 2e-4, 40k iterations, AdamW weight decay 1e-4, poly
# 0.9; LeapLabTHU/DAT-Segmentation configs/dat/fpn_*_80k_*.py), which the DAT
# codebase used for both versions. Those released configs set the drop path per
# size (0.4/0.4/0.7 for T/S/B) for DAT++ only; with no v1 value published, the
# same rates are used here.
_base_ = './fpn_datpp-t_8xb4-40k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='dat-t', drop_path_rate=0.4, init_cfg=dict(checkpoint='checkpoints/dat-t_in1k_converted.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
