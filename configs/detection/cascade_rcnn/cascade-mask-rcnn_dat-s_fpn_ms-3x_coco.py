# Cascade Mask R-CNN, DAT-S (v1, 96..768 channels), 3x: the DAT-T recipe;
# drop path 0.2 as in Swin-S's Cascade config.
_base_ = './cascade-mask-rcnn_dat-t_fpn_ms-3x_coco.py'

model = dict(
    backbone=dict(arch='dat-s', drop_path_rate=0.2, init_cfg=dict(checkpoint='checkpoints/dat-s_in1k_converted.pth'))
)
