# Mask R-CNN, DAT-S++ (96..768 channels), 1x: the DAT-T++ recipe with drop
# path 0.1 (LeapLabTHU/DAT-Detection configs/dat/mrcn_small_1x_4n_dp01_lr4.py).
_base_ = './mask-rcnn_datpp-t_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        arch='datpp-s', drop_path_rate=0.1, init_cfg=dict(checkpoint='checkpoints/datpp-s_in1k_converted.pth')
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
