# Mask R-CNN, DAT-S (v1, 96..768 channels), 1x: the DAT-T recipe; drop path
# 0.2 as in Swin-S's Mask R-CNN config.
_base_ = './mask-rcnn_dat-t_fpn_1x_coco.py'

model = dict(
    backbone=dict(arch='dat-s', drop_path_rate=0.2, init_cfg=dict(checkpoint='checkpoints/dat-s_in1k_converted.pth'))
)
