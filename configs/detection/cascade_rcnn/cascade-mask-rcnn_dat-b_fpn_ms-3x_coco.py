# Cascade Mask R-CNN, DAT-B (v1, 128..1024 channels), 3x: the DAT-T recipe;
# drop path 0.3 as in Swin-B's Cascade config.
_base_ = './cascade-mask-rcnn_dat-t_fpn_ms-3x_coco.py'

model = dict(
    backbone=dict(arch='dat-b', drop_path_rate=0.3, init_cfg=dict(checkpoint='checkpoints/dat-b_in1k_converted.pth')),
    neck=dict(in_channels=[128, 256, 512, 1024]),
)
